//! The Arrow schema of a result row, and record batches of rows.

use std::sync::Arc;

use arrow_array::builder::{FixedSizeListBuilder, Float32Builder};
use arrow_array::{
    ArrayRef, Float32Array, Int32Array, Int64Array, ListArray, RecordBatch, StringArray,
    StructArray, TimestampMillisecondArray,
};
use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

use crate::record::OutputRow;

/// The Arrow schema of result rows for embeddings of width `dim`.
pub fn schema(dim: usize) -> SchemaRef {
    let embedding = DataType::FixedSizeList(
        Arc::new(Field::new("item", DataType::Float32, true)),
        dim as i32,
    );
    let ts = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
        Field::new("image_uri", DataType::Utf8, true),
        Field::new("image_etag", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, true),
        Field::new("attributes", DataType::Utf8, true),
        Field::new("image_embedding", embedding.clone(), true),
        Field::new("text_embedding", embedding, true),
        Field::new(
            "labels",
            DataType::List(Arc::new(Field::new("item", label_type(), true))),
            true,
        ),
        Field::new("clip_score", DataType::Float32, true),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("event_time", ts.clone(), true),
        Field::new("processed_at", ts, false),
        // Added after the first release: files without them read as null
        // (`clipstream snapshot` fills them in when it carries rows over).
        Field::new("needs_review", DataType::Boolean, true),
        Field::new("review_reason", DataType::Utf8, true),
    ]))
}

fn label_fields() -> Fields {
    Fields::from(vec![
        Field::new("label", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
    ])
}

fn label_type() -> DataType {
    DataType::Struct(label_fields())
}

/// Builds a record batch of `rows`.
pub fn to_batch(
    schema: &SchemaRef,
    dim: usize,
    model_id: &str,
    rows: &[OutputRow],
) -> anyhow::Result<RecordBatch> {
    let strings = |f: &dyn Fn(&OutputRow) -> Option<&str>| -> ArrayRef {
        Arc::new(rows.iter().map(f).collect::<StringArray>())
    };
    let embeddings = |f: &dyn Fn(&OutputRow) -> Option<&Vec<f32>>| -> anyhow::Result<ArrayRef> {
        let mut b = FixedSizeListBuilder::with_capacity(
            Float32Builder::with_capacity(rows.len() * dim),
            dim as i32,
            rows.len(),
        );
        for r in rows {
            match f(r) {
                Some(v) => {
                    anyhow::ensure!(
                        v.len() == dim,
                        "embedding of width {} in a file of width {dim}",
                        v.len()
                    );
                    b.values().append_slice(v);
                    b.append(true);
                }
                None => {
                    b.values().append_nulls(dim);
                    b.append(false);
                }
            }
        }
        Ok(Arc::new(b.finish()))
    };
    let mut offsets = vec![0i32];
    let mut names = Vec::new();
    let mut scores = Vec::new();
    let mut valid = Vec::with_capacity(rows.len());
    for r in rows {
        if let Some(labels) = &r.labels {
            for l in labels {
                names.push(l.label.as_str());
                scores.push(l.score);
            }
        }
        valid.push(r.labels.is_some());
        offsets.push(names.len() as i32);
    }
    let label_values = StructArray::new(
        label_fields(),
        vec![
            Arc::new(StringArray::from(names)) as ArrayRef,
            Arc::new(Float32Array::from(scores)),
        ],
        None,
    );
    let labels = ListArray::new(
        Arc::new(Field::new("item", label_type(), true)),
        arrow_buffer::OffsetBuffer::new(offsets.into()),
        Arc::new(label_values),
        Some(valid.into()),
    );
    let columns: Vec<ArrayRef> = vec![
        strings(&|r| Some(r.id.as_str())),
        strings(&|r| Some(&*r.source)),
        Arc::new(rows.iter().map(|r| r.partition).collect::<Int32Array>()),
        Arc::new(rows.iter().map(|r| r.offset).collect::<Int64Array>()),
        strings(&|r| r.image_uri.as_deref()),
        strings(&|r| r.image_etag.as_deref()),
        strings(&|r| r.text.as_deref()),
        strings(&|r| r.attributes.as_deref()),
        embeddings(&|r| r.image_embedding.as_ref())?,
        embeddings(&|r| r.text_embedding.as_ref())?,
        Arc::new(labels),
        Arc::new(rows.iter().map(|r| r.clip_score).collect::<Float32Array>()),
        Arc::new(StringArray::from(vec![model_id; rows.len()])),
        Arc::new(
            TimestampMillisecondArray::from(
                rows.iter().map(|r| r.event_time_ms).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            TimestampMillisecondArray::from(
                rows.iter().map(|r| r.processed_at_ms).collect::<Vec<_>>(),
            )
            .with_timezone("UTC"),
        ),
        Arc::new(
            rows.iter()
                .map(|r| r.needs_review)
                .collect::<arrow_array::BooleanArray>(),
        ),
        strings(&|r| r.review_reason.as_deref()),
    ];
    Ok(RecordBatch::try_new(Arc::clone(schema), columns)?)
}
