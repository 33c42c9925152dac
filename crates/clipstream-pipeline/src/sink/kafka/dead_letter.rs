//! A dead letter as one Kafka message: the original key, value and
//! headers plus `clipstream.*` headers saying why, cut down to fit the
//! topic's size limit without losing what identifies the original.

use rdkafka::message::{Header, OwnedHeaders};

use crate::record::DeadLetter;

/// Room for a message's framing (record batch header, timestamps, headers
/// that are not counted separately).
pub(crate) const MESSAGE_OVERHEAD_BYTES: usize = 512;

/// The SHA-256 of `bytes`, in hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A dead letter as one Kafka message that fits in `budget` bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterMessage {
    /// The original key, unless it was too large to keep.
    pub key: Option<Vec<u8>>,
    /// The original value, whole or truncated.
    pub value: Vec<u8>,
    /// The original headers that were kept, then ours.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl DeadLetterMessage {
    /// Builds the message of `d`: the original key, value and headers plus
    /// `clipstream.*` headers; when that exceeds `budget`, the original
    /// headers are dropped if they take more than half of it, and the value
    /// is truncated to what is left (`clipstream.original.truncated`,
    /// `.bytes` and `.sha256` say so).
    pub fn fit(d: &DeadLetter, budget: usize) -> DeadLetterMessage {
        let o = &d.origin;
        let partition = o.partition.partition.to_string();
        let offset = o.position.offset.to_string();
        // A reason is a sentence; one that quotes huge input is cut.
        let reason: String = d.reason.chars().take(2048).collect();
        let mut ours: Vec<(String, Option<Vec<u8>>)> = vec![
            ("clipstream.stage".into(), Some(d.stage.as_str().into())),
            ("clipstream.kind".into(), Some(d.kind.as_str().into())),
            ("clipstream.reason".into(), Some(reason.into_bytes())),
            (
                "clipstream.source.topic".into(),
                Some(o.partition.source.as_bytes().to_vec()),
            ),
            ("clipstream.source.partition".into(), Some(partition.into())),
            ("clipstream.source.offset".into(), Some(offset.into())),
        ];
        if let Some(id) = &d.id {
            let id: String = id.chars().take(1024).collect();
            ours.push(("clipstream.id".into(), Some(id.into_bytes())));
        }
        let size = |h: &[(String, Option<Vec<u8>>)]| -> usize {
            h.iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 8)
                .sum()
        };
        // A key over a quarter of the budget is dropped (its size and
        // SHA-256 kept): the message must fit whatever the input was.
        let key_too_large = o.key.as_ref().is_some_and(|k| k.len() > budget / 4);
        if let (true, Some(k)) = (key_too_large, &o.key) {
            ours.push((
                "clipstream.original.key_bytes".into(),
                Some(k.len().to_string().into_bytes()),
            ));
            ours.push((
                "clipstream.original.key_sha256".into(),
                Some(sha256_hex(k).into_bytes()),
            ));
        }
        let key = if key_too_large {
            0
        } else {
            o.key.as_ref().map_or(0, |k| k.len())
        };
        // 400: the headers added below when the original is cut.
        let room = budget.saturating_sub(MESSAGE_OVERHEAD_BYTES + key + size(&ours) + 400);
        let mut headers: Vec<(String, Option<Vec<u8>>)> = o.headers.to_vec();
        if size(&headers) + o.raw.len() > room && size(&headers) > room / 2 {
            ours.push((
                "clipstream.original.headers_dropped".into(),
                Some(headers.len().to_string().into_bytes()),
            ));
            headers.clear();
        }
        let room = room.saturating_sub(size(&headers));
        let value = if o.raw.len() > room {
            let hex = sha256_hex(&o.raw);
            ours.push((
                "clipstream.original.truncated".into(),
                Some(b"true".to_vec()),
            ));
            ours.push((
                "clipstream.original.bytes".into(),
                Some(o.raw.len().to_string().into_bytes()),
            ));
            ours.push(("clipstream.original.sha256".into(), Some(hex.into_bytes())));
            o.raw[..room].to_vec()
        } else {
            o.raw.to_vec()
        };
        headers.extend(ours);
        DeadLetterMessage {
            key: (!key_too_large)
                .then(|| o.key.as_deref().map(<[u8]>::to_vec))
                .flatten(),
            value,
            headers,
        }
    }

    pub(super) fn headers(&self) -> OwnedHeaders {
        let mut h = OwnedHeaders::new_with_capacity(self.headers.len());
        for (k, v) in &self.headers {
            h = h.insert(Header {
                key: k,
                value: v.as_deref(),
            });
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ack::{PartitionKey, Position};
    use crate::dead_letter::{Kind, Stage};
    use crate::record::Origin;

    fn letter(raw: Vec<u8>, headers: Vec<(String, Option<Vec<u8>>)>) -> DeadLetter {
        let partition = PartitionKey {
            source: "events".into(),
            partition: 3,
        };
        Origin {
            partition,
            position: Position { seq: 0, offset: 42 },
            key: Some(Arc::from(&b"k"[..])),
            headers: Arc::from(headers),
            raw: Arc::from(raw),
            event_time_ms: None,
        }
        .dead_letter(
            Some("id-1".into()),
            Stage::Output,
            Kind::OutputRejected,
            "too large".into(),
        )
    }

    fn header<'a>(m: &'a DeadLetterMessage, name: &str) -> Option<&'a [u8]> {
        m.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn size(m: &DeadLetterMessage) -> usize {
        m.value.len()
            + m.key.as_ref().map_or(1, Vec::len)
            + m.headers
                .iter()
                .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len) + 8)
                .sum::<usize>()
    }

    /// A key too large for the topic is dropped, its size and SHA-256
    /// kept: no original makes a dead letter that cannot be sent.
    #[test]
    fn a_huge_key_is_dropped_and_the_dead_letter_still_fits() {
        let mut d = letter(b"x".to_vec(), vec![]);
        d.origin.key = Some(Arc::from(vec![b'k'; 2_000_000]));
        for budget in [1_000_000usize, 4_096] {
            let m = DeadLetterMessage::fit(&d, budget);
            assert!(
                size(&m) + MESSAGE_OVERHEAD_BYTES <= budget,
                "{budget}: {}",
                size(&m)
            );
            assert_eq!(m.key, None);
            assert_eq!(
                header(&m, "clipstream.original.key_bytes"),
                Some(&b"2000000"[..])
            );
            assert_eq!(
                header(&m, "clipstream.original.key_sha256").map(<[u8]>::len),
                Some(64)
            );
        }
        let small = letter(b"x".to_vec(), vec![]);
        assert_eq!(
            DeadLetterMessage::fit(&small, 4_096).key.as_deref(),
            Some(&b"k"[..])
        );
    }

    #[test]
    fn a_small_dead_letter_is_sent_whole() {
        let d = letter(
            b"{\"id\": 1}".to_vec(),
            vec![("trace".into(), Some(b"x".to_vec()))],
        );
        let m = DeadLetterMessage::fit(&d, 1_000_000);
        assert_eq!(m.value, b"{\"id\": 1}");
        assert_eq!(header(&m, "trace"), Some(&b"x"[..]));
        assert_eq!(header(&m, "clipstream.kind"), Some(&b"output_rejected"[..]));
        assert_eq!(header(&m, "clipstream.source.offset"), Some(&b"42"[..]));
        assert_eq!(header(&m, "clipstream.original.truncated"), None);
    }

    /// Whatever the original's size and headers, the dead letter fits the
    /// budget, and a truncated one says so with the original's size and
    /// SHA-256.
    #[test]
    fn a_dead_letter_always_fits() {
        let raw: Vec<u8> = (0..3_000_000u32).map(|i| i as u8).collect();
        let many: Vec<(String, Option<Vec<u8>>)> = (0..20_000)
            .map(|i| (format!("h{i}"), Some(vec![b'v'; 40])))
            .collect();
        for budget in [1_000_000usize, 100_000, 4_096] {
            for headers in [vec![], many.clone()] {
                let d = letter(raw.clone(), headers.clone());
                let m = DeadLetterMessage::fit(&d, budget);
                assert!(
                    size(&m) + MESSAGE_OVERHEAD_BYTES <= budget,
                    "{budget}: {}",
                    size(&m)
                );
                assert_eq!(
                    header(&m, "clipstream.original.truncated"),
                    Some(&b"true"[..])
                );
                assert_eq!(
                    header(&m, "clipstream.original.bytes"),
                    Some(&b"3000000"[..])
                );
                assert_eq!(m.value[..], raw[..m.value.len()]);
                let sha = header(&m, "clipstream.original.sha256").expect("sha");
                assert_eq!(sha.len(), 64);
                if !headers.is_empty() {
                    assert_eq!(
                        header(&m, "clipstream.original.headers_dropped"),
                        Some(&b"20000"[..])
                    );
                }
            }
        }
        // The SHA-256 of a known value.
        let d = letter(b"abc".repeat(1000), vec![]);
        let m = DeadLetterMessage::fit(&d, 2_000);
        // hashlib.sha256(b"abc" * 1000).hexdigest()
        assert_eq!(
            header(&m, "clipstream.original.sha256"),
            Some(&b"328de8f1895f8bb09f6e6b4c2012ef2b2a6f067cd002794b750aa040a6f6d8bd"[..])
        );
    }
}
