//! One graph edit, made once when a vision tower is loaded: its float
//! `pixel_values` input becomes a uint8 `pixel_bytes` input of the same
//! shape, and rescaling and normalisation run inside the graph.
//!
//! The edit prepends three nodes: `Cast` (uint8 to int32), `Add` (channel
//! `c` gets `256 * c`, so each channel has its own 256 entries) and `Gather`
//! from a table of `3 * 256` values, the very values host preprocessing
//! writes for each byte of each channel ([`crate::ImagePreprocessor::lut`]).
//! So the tower sees bit for bit the floats it saw before, while the host
//! writes one byte per value instead of four and does no float work, and a
//! GPU gets a quarter of the bytes.
//!
//! ONNX files are protobuf: this module reads just enough of it (the model's
//! graph, the graph's inputs) and writes the new graph around the old
//! fields, copied byte for byte. Field numbers are those of `onnx.proto3`.

/// The uint8 input the edit adds.
pub const BYTES_INPUT: &str = "pixel_bytes";

/// ONNX `TensorProto.DataType` values used here.
const FLOAT: u64 = 1;
const UINT8: u64 = 2;
const INT32: u64 = 6;
const FLOAT16: u64 = 10;

/// One field of a protobuf message.
struct Field<'a> {
    number: u64,
    /// The whole field (tag included), to copy it unchanged.
    raw: &'a [u8],
    /// A length-delimited field's payload (empty for others).
    payload: &'a [u8],
    /// A varint field's value.
    value: u64,
}

fn varint(buf: &[u8], pos: &mut usize) -> Result<u64, String> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos).ok_or("truncated varint")?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("varint longer than 10 bytes".into())
}

/// The fields of a message, in order.
fn fields(buf: &[u8]) -> Result<Vec<Field<'_>>, String> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < buf.len() {
        let start = pos;
        let tag = varint(buf, &mut pos)?;
        let (number, wire) = (tag >> 3, tag & 7);
        let (payload, value) = match wire {
            0 => (&buf[0..0], varint(buf, &mut pos)?),
            1 => {
                pos += 8;
                (&buf[0..0], 0)
            }
            2 => {
                let len = usize::try_from(varint(buf, &mut pos)?).map_err(|e| e.to_string())?;
                let end = pos.checked_add(len).filter(|e| *e <= buf.len());
                let end = end.ok_or("length past the end of the message")?;
                let p = &buf[pos..end];
                pos = end;
                (p, 0)
            }
            5 => {
                pos += 4;
                (&buf[0..0], 0)
            }
            w => return Err(format!("unsupported wire type {w}")),
        };
        if pos > buf.len() {
            return Err("field past the end of the message".into());
        }
        out.push(Field {
            number,
            raw: &buf[start..pos],
            payload,
            value,
        });
    }
    Ok(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, number: u64, bytes: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

fn put_uint(out: &mut Vec<u8>, number: u64, v: u64) {
    put_varint(out, number << 3);
    put_varint(out, v);
}

/// `NodeProto`: inputs (1), outputs (2), name (3), op_type (4), an int
/// attribute (5: `AttributeProto` name 1, i 3, type 20 = INT).
fn node(inputs: &[&str], output: &str, name: &str, op: &str, attr: Option<(&str, u64)>) -> Vec<u8> {
    let mut n = Vec::new();
    for i in inputs {
        put_bytes(&mut n, 1, i.as_bytes());
    }
    put_bytes(&mut n, 2, output.as_bytes());
    put_bytes(&mut n, 3, name.as_bytes());
    put_bytes(&mut n, 4, op.as_bytes());
    if let Some((key, v)) = attr {
        let mut a = Vec::new();
        put_bytes(&mut a, 1, key.as_bytes());
        put_uint(&mut a, 3, v);
        put_uint(&mut a, 20, 2);
        put_bytes(&mut n, 5, &a);
    }
    n
}

/// `TensorProto`: dims (1), data_type (2), name (8), raw_data (9).
fn tensor(name: &str, dims: &[u64], data_type: u64, raw: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    for d in dims {
        put_uint(&mut t, 1, *d);
    }
    put_uint(&mut t, 2, data_type);
    put_bytes(&mut t, 8, name.as_bytes());
    put_bytes(&mut t, 9, raw);
    t
}

/// The element type and the shape (its `TensorShapeProto` bytes) of a
/// `ValueInfoProto`.
fn tensor_type(value_info: &[u8]) -> Result<(u64, Vec<u8>), String> {
    let ty = fields(value_info)?
        .into_iter()
        .find(|f| f.number == 2)
        .ok_or("the input has no type")?;
    let tensor = fields(ty.payload)?
        .into_iter()
        .find(|f| f.number == 1)
        .ok_or("the input is not a tensor")?;
    let (mut elem, mut shape) = (0, Vec::new());
    for f in fields(tensor.payload)? {
        match f.number {
            1 => elem = f.value,
            2 => shape = f.payload.to_vec(),
            _ => {}
        }
    }
    Ok((elem, shape))
}

fn name_of(value_info: &[u8]) -> Result<&[u8], String> {
    Ok(fields(value_info)?
        .into_iter()
        .find(|f| f.number == 1)
        .map_or(&[][..], |f| f.payload))
}

/// `model` (a serialised `ModelProto`) with its graph input `input` (a
/// float or float16 image batch) replaced by the uint8 [`BYTES_INPUT`] of
/// the same shape, mapped through `lut` (per channel: the value of each
/// byte) inside the graph.
pub fn uint8_pixels(model: &[u8], input: &str, lut: &[[f32; 256]; 3]) -> Result<Vec<u8>, String> {
    let top = fields(model)?;
    let graph = top
        .iter()
        .find(|f| f.number == 7)
        .ok_or("the model has no graph")?;
    let graph_fields = fields(graph.payload)?;
    let mut found = None;
    for f in graph_fields.iter().filter(|f| f.number == 11) {
        if name_of(f.payload)? == input.as_bytes() {
            found = Some(tensor_type(f.payload)?);
        }
        if name_of(f.payload)? == BYTES_INPUT.as_bytes() {
            return Err(format!("the graph already has an input `{BYTES_INPUT}`"));
        }
    }
    let (elem, shape) = found.ok_or_else(|| format!("the graph has no input `{input}`"))?;
    let table: Vec<u8> = match elem {
        FLOAT => lut.iter().flatten().flat_map(|v| v.to_le_bytes()).collect(),
        FLOAT16 => lut
            .iter()
            .flatten()
            .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
            .collect(),
        other => {
            return Err(format!(
                "input `{input}` has element type {other}; float or float16 expected"
            ));
        }
    };
    let offsets: Vec<u8> = [0i32, 256, 512]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();

    let mut g = Vec::new();
    // The new nodes first: ONNX lists nodes in topological order.
    put_bytes(
        &mut g,
        1,
        &node(
            &[BYTES_INPUT],
            "clipstream_pixel_index0",
            "clipstream_cast",
            "Cast",
            Some(("to", INT32)),
        ),
    );
    put_bytes(
        &mut g,
        1,
        &node(
            &["clipstream_pixel_index0", "clipstream_channel_offsets"],
            "clipstream_pixel_index",
            "clipstream_channel_offsets_add",
            "Add",
            None,
        ),
    );
    put_bytes(
        &mut g,
        1,
        &node(
            &["clipstream_pixel_lut", "clipstream_pixel_index"],
            input,
            "clipstream_pixel_lut_gather",
            "Gather",
            Some(("axis", 0)),
        ),
    );
    for f in &graph_fields {
        if f.number == 11 && name_of(f.payload)? == input.as_bytes() {
            // The new input, in the old one's place.
            let mut tensor_ty = Vec::new();
            put_uint(&mut tensor_ty, 1, UINT8);
            put_bytes(&mut tensor_ty, 2, &shape);
            let mut ty = Vec::new();
            put_bytes(&mut ty, 1, &tensor_ty);
            let mut vi = Vec::new();
            put_bytes(&mut vi, 1, BYTES_INPUT.as_bytes());
            put_bytes(&mut vi, 2, &ty);
            put_bytes(&mut g, 11, &vi);
        } else {
            g.extend_from_slice(f.raw);
        }
    }
    put_bytes(
        &mut g,
        5,
        &tensor("clipstream_pixel_lut", &[768], elem, &table),
    );
    put_bytes(
        &mut g,
        5,
        &tensor("clipstream_channel_offsets", &[1, 3, 1, 1], INT32, &offsets),
    );

    let mut out = Vec::with_capacity(model.len() + g.len() - graph.payload.len() + 16);
    for f in &top {
        if f.number == 7 {
            put_bytes(&mut out, 7, &g);
        } else {
            out.extend_from_slice(f.raw);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_round_trip_and_bad_bytes_are_errors() {
        let mut m = Vec::new();
        put_uint(&mut m, 1, 300);
        put_bytes(&mut m, 7, b"abc");
        let f = fields(&m).expect("fields");
        assert_eq!((f[0].number, f[0].value), (1, 300));
        assert_eq!((f[1].number, f[1].payload), (7, &b"abc"[..]));
        let raw: Vec<u8> = f.iter().flat_map(|f| f.raw.to_vec()).collect();
        assert_eq!(raw, m);
        // A length past the end, a truncated varint, an unknown wire type.
        for bad in [&[0x3a, 0x05, b'a'][..], &[0x08, 0x80][..], &[0x0b][..]] {
            assert!(fields(bad).is_err(), "{bad:?}");
        }
        let lut = [[0f32; 256]; 3];
        assert!(uint8_pixels(&m, "pixel_values", &lut).is_err());
        assert!(uint8_pixels(&[0xff, 0xff], "pixel_values", &lut).is_err());
    }
}
