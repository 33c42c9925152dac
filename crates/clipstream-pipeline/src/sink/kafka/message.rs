//! The embeddings topic's messages, in either `[sink.kafka]
//! embeddings_format`. Both carry the same fields; the key is the record id.
//!
//! `json` (the default): one JSON object, `{"id", "source": {"topic",
//! "partition", "offset"}, "image_uri", "image_etag", "text", "attributes",
//! "image_embedding": [...], "text_embedding": [...], "clip_score",
//! "model_id", "event_time_ms", "processed_at_ms"}`.
//!
//! `f32le`: the Kafka header `clipstream.format: f32le`, and a value of
//!
//! ```text
//! bytes 0..4     b"CSE1"
//! bytes 4..8     H, the header's length: u32, little-endian
//! next H bytes   the header: the JSON object above without the two
//!                vectors, plus "dim" (their length) and "vectors" (the names
//!                of the vectors that follow, in order: "image_embedding"
//!                and/or "text_embedding")
//! then           each listed vector: dim float32, little-endian
//! ```
//!
//! With 512-d vectors that is about a quarter of the JSON's bytes, and
//! writing it costs a copy instead of formatting a thousand decimals
//! (`clipstream bench --messages` prints both, side by side). A
//! reader in Python: `h = int.from_bytes(v[4:8], "little");
//! meta = json.loads(v[8:8 + h]); vecs = numpy.frombuffer(v, "<f4",
//! offset=8 + h).reshape(len(meta["vectors"]), meta["dim"])`. A removed
//! product's tombstone (`clipstream snapshot`) has no value and no
//! `clipstream.format` header, in either format.

use serde_json::{Value, json};

use super::config::EmbeddingsFormat;
use crate::record::OutputRow;

/// The first bytes of an `f32le` message.
pub const MAGIC: &[u8; 4] = b"CSE1";

/// The Kafka header naming a message's format (`f32le` messages only).
pub const FORMAT_HEADER: &str = "clipstream.format";

/// Every field of a row's embeddings message but the vectors.
fn fields(row: &OutputRow, model_id: &str) -> serde_json::Map<String, Value> {
    let attributes = row
        .attributes
        .as_deref()
        .and_then(|a| serde_json::from_str::<Value>(a).ok());
    let value = json!({
        "id": row.id,
        "source": {"topic": &*row.source, "partition": row.partition, "offset": row.offset},
        "image_uri": row.image_uri,
        "image_etag": row.image_etag,
        "text": row.text,
        "attributes": attributes,
        "clip_score": row.clip_score,
        "model_id": model_id,
        "event_time_ms": row.event_time_ms,
        "processed_at_ms": row.processed_at_ms,
    });
    match value {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

/// The value of `row`'s embeddings message in `format`; `Err` when its
/// vectors cannot be written as one `dim` (none, or of different lengths).
pub fn embeddings_message(
    row: &OutputRow,
    model_id: &str,
    format: EmbeddingsFormat,
) -> Result<Vec<u8>, String> {
    let mut m = fields(row, model_id);
    match format {
        EmbeddingsFormat::Json => {
            m.insert("image_embedding".into(), json!(row.image_embedding));
            m.insert("text_embedding".into(), json!(row.text_embedding));
            Ok(Value::Object(m).to_string().into_bytes())
        }
        EmbeddingsFormat::F32le => {
            let vectors: Vec<(&str, &[f32])> = [
                ("image_embedding", row.image_embedding.as_deref()),
                ("text_embedding", row.text_embedding.as_deref()),
            ]
            .into_iter()
            .filter_map(|(name, v)| Some((name, v?)))
            .collect();
            let dim = vectors.first().map_or(0, |(_, v)| v.len());
            if dim == 0 || vectors.iter().any(|(_, v)| v.len() != dim) {
                let lengths: Vec<usize> = vectors.iter().map(|(_, v)| v.len()).collect();
                return Err(format!(
                    "f32le needs vectors of one non-zero length; this row's are {lengths:?}"
                ));
            }
            m.insert("dim".into(), json!(dim));
            m.insert(
                "vectors".into(),
                json!(vectors.iter().map(|(n, _)| *n).collect::<Vec<_>>()),
            );
            let header = Value::Object(m).to_string();
            let floats: usize = vectors.iter().map(|(_, v)| v.len()).sum();
            let mut out = Vec::with_capacity(8 + header.len() + 4 * floats);
            out.extend_from_slice(MAGIC);
            let h = u32::try_from(header.len()).unwrap_or(u32::MAX);
            out.extend_from_slice(&h.to_le_bytes());
            out.extend_from_slice(header.as_bytes());
            for (_, v) in &vectors {
                for x in *v {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            Ok(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn row(image: Option<Vec<f32>>, text: Option<Vec<f32>>) -> OutputRow {
        OutputRow {
            id: "sku-1".into(),
            source: Arc::from("events"),
            partition: 2,
            offset: 41,
            image_uri: Some("s3://b/k.jpg".into()),
            image_etag: Some("\"e\"".into()),
            text: Some("a red shoe".into()),
            attributes: Some(r#"{"brand":"x"}"#.into()),
            image_embedding: image,
            text_embedding: text,
            labels: None,
            clip_score: Some(0.25),
            needs_review: None,
            review_reason: None,
            event_time_ms: Some(1_700_000_000_000),
            processed_at_ms: 1_700_000_000_500,
        }
    }

    /// A reader written from the module doc, not from the writer.
    fn read_f32le(v: &[u8]) -> (Value, Vec<Vec<f32>>) {
        assert_eq!(&v[..4], b"CSE1");
        let h = u32::from_le_bytes(v[4..8].try_into().expect("4 bytes")) as usize;
        let meta: Value = serde_json::from_slice(&v[8..8 + h]).expect("header");
        let dim = meta["dim"].as_u64().expect("dim") as usize;
        let body = &v[8 + h..];
        let n = meta["vectors"].as_array().expect("vectors").len();
        assert_eq!(body.len(), n * dim * 4, "nothing after the vectors");
        let vecs = body
            .chunks_exact(dim * 4)
            .map(|c| {
                c.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect()
            })
            .collect();
        (meta, vecs)
    }

    #[test]
    fn both_formats_carry_the_same_fields_and_vectors() {
        let image: Vec<f32> = (0..512).map(|i| (i as f32 * 0.37).sin() / 20.0).collect();
        let text: Vec<f32> = (0..512)
            .map(|i| f32::from_bits(0x3c00_0000 + i * 9973))
            .collect();
        for (img, txt) in [
            (Some(image.clone()), Some(text.clone())),
            (Some(image.clone()), None),
            (None, Some(text.clone())),
        ] {
            let r = row(img.clone(), txt.clone());
            let json: Value = serde_json::from_slice(
                &embeddings_message(&r, "m", EmbeddingsFormat::Json).expect("json"),
            )
            .expect("json");
            let bin = embeddings_message(&r, "m", EmbeddingsFormat::F32le).expect("f32le");
            let (mut meta, vecs) = read_f32le(&bin);
            let names: Vec<String> = meta["vectors"]
                .as_array()
                .expect("vectors")
                .iter()
                .map(|n| n.as_str().expect("name").to_string())
                .collect();
            // Bit for bit the vectors, field for field the rest.
            let mut expected = json.clone();
            for (name, v) in names.iter().zip(&vecs) {
                let from_json: Vec<f32> = json[name]
                    .as_array()
                    .expect("array")
                    .iter()
                    .map(|x| x.as_f64().expect("number") as f32)
                    .collect();
                assert_eq!(
                    from_json.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                    "{name}"
                );
                expected.as_object_mut().expect("object").remove(name);
            }
            for name in ["image_embedding", "text_embedding"] {
                if !names.iter().any(|n| n == name) {
                    assert!(json[name].is_null(), "{name} listed when absent");
                    expected.as_object_mut().expect("object").remove(name);
                }
            }
            let m = meta.as_object_mut().expect("object");
            assert_eq!(m.remove("dim"), Some(json!(512)));
            m.remove("vectors");
            assert_eq!(meta, expected);
            let json_len = embeddings_message(&r, "m", EmbeddingsFormat::Json)
                .expect("json")
                .len();
            assert!(bin.len() * 3 < json_len);
        }
    }

    /// Vectors that cannot share one `dim` are refused, not misdescribed.
    #[test]
    fn vectors_of_different_lengths_are_refused() {
        let r = row(Some(vec![0.5; 512]), Some(vec![0.5; 768]));
        let e = embeddings_message(&r, "m", EmbeddingsFormat::F32le).expect_err("lengths");
        assert!(e.contains("[512, 768]"), "{e}");
        assert!(embeddings_message(&r, "m", EmbeddingsFormat::Json).is_ok());
        let none = row(None, None);
        assert!(embeddings_message(&none, "m", EmbeddingsFormat::F32le).is_err());
    }
}
