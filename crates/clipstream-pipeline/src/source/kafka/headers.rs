//! Kafka headers, read without trusting them.

use std::sync::Arc;

use rdkafka::message::BorrowedMessage;

/// A message's headers. rdkafka's accessors unwrap the conversion of every
/// header name to UTF-8, so one message with a name of other bytes would
/// panic the poll thread (and every worker that takes the partition after
/// it). Here names that are not UTF-8 are kept with the offending bytes
/// escaped (`\xff`), so that a dead letter still shows them; nothing else
/// reads header names.
#[allow(unsafe_code)]
pub fn read(m: &BorrowedMessage<'_>) -> crate::dead_letter::Headers {
    use rdkafka::bindings as rd;
    use std::ffi::{CStr, c_char, c_void};
    let ok = rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR;
    let mut hdrs: *mut rd::rd_kafka_headers_t = std::ptr::null_mut();
    // SAFETY: `m.ptr()` is the live message `m` borrows; the headers it
    // returns are owned by the message and live as long as `m`.
    if unsafe { rd::rd_kafka_message_headers(m.ptr(), &mut hdrs) } != ok || hdrs.is_null() {
        return Arc::from([]);
    }
    // SAFETY: `hdrs` is valid (above).
    let count = unsafe { rd::rd_kafka_header_cnt(hdrs) };
    let mut out = Vec::with_capacity(count);
    for idx in 0..count {
        let mut name: *const c_char = std::ptr::null();
        let mut value: *const c_void = std::ptr::null();
        let mut size = 0usize;
        // SAFETY: `hdrs` is valid and `idx` is below its count; the out
        // pointers are valid for writes.
        let err =
            unsafe { rd::rd_kafka_header_get_all(hdrs, idx, &mut name, &mut value, &mut size) };
        if err != ok || name.is_null() {
            continue;
        }
        // SAFETY: librdkafka's header names are NUL-terminated and live as
        // long as the headers; values are `size` bytes (or null: no value).
        let (name, value) = unsafe {
            (
                CStr::from_ptr(name).to_bytes(),
                (!value.is_null()).then(|| std::slice::from_raw_parts(value.cast::<u8>(), size)),
            )
        };
        out.push((escape_name(name), value.map(<[u8]>::to_vec)));
    }
    Arc::from(out)
}

/// A header name as text: UTF-8 as is, other bytes as `\xNN`.
fn escape_name(name: &[u8]) -> String {
    match std::str::from_utf8(name) {
        Ok(s) => s.to_string(),
        Err(_) => name.utf8_chunks().fold(String::new(), |mut s, chunk| {
            s.push_str(chunk.valid());
            for b in chunk.invalid() {
                s.push_str(&format!("\\x{b:02x}"));
            }
            s
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_that_are_not_utf8_are_escaped() {
        assert_eq!(escape_name(b"trace-id"), "trace-id");
        assert_eq!(escape_name(b"a\xffb\xc3"), "a\\xffb\\xc3");
        assert_eq!(escape_name("é".as_bytes()), "é");
    }
}
