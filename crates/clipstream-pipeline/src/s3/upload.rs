//! Uploading a Parquet file as a new object: a multipart upload that
//! appears only when complete and never replaces another writer's object.

use std::path::Path;

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use super::{S3, classify};
use crate::dead_letter::Kind;
use crate::retry::FetchError;
use crate::stats::{Direction, S3Op};

/// The user metadata key that names an object's writer.
const WRITER_TAG: &str = "clipstream-writer";

/// Why [`S3::put_new_file`] did not put the object.
#[derive(Debug)]
pub enum PutError {
    /// The key holds another writer's object.
    Exists,
    /// The partition moved on before the object became visible.
    NotOwned,
    /// The store failed (transient: retry; permanent: give up).
    Failed(FetchError),
}

impl S3 {
    /// Uploads `path` as a new object at `key`: a multipart upload tagged
    /// with `tag` (user metadata `clipstream-writer`) and completed with
    /// `If-None-Match: *`, once `owned` still holds. The object appears only
    /// when complete and never replaces one: when `key` is taken by another
    /// writer's object the answer is [`PutError::Exists`]; when it holds
    /// our own (a completion retried after a lost response), success.
    pub async fn put_new_file(
        &self,
        path: &Path,
        bucket: &str,
        key: &str,
        part_bytes: usize,
        tag: &str,
        owned: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), PutError> {
        let what = format!("s3://{bucket}/{key}");
        let data = tokio::fs::read(path).await.map_err(|e| {
            PutError::Failed(FetchError::Transient(format!(
                "cannot read {}: {e}",
                path.display()
            )))
        })?;
        let upload_id = self
            .call(S3Op::CreateMultipartUpload, || async {
                self.client
                    .create_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .content_type("application/vnd.apache.parquet")
                    .metadata(WRITER_TAG, tag)
                    .send()
                    .await
                    .map_err(|e| classify(&e, &what))
            })
            .await
            .map_err(PutError::Failed)?
            .upload_id
            .ok_or_else(|| {
                PutError::Failed(FetchError::Transient(format!(
                    "{what}: no upload id returned"
                )))
            })?;
        let result = self
            .upload_parts(&data, bucket, key, &upload_id, part_bytes, &what, owned)
            .await;
        let result = match result {
            Ok(()) => Ok(()),
            // The completion failed or was refused: the object may be ours
            // (an earlier attempt that succeeded), another writer's, or
            // absent.
            Err(PutError::Failed(e)) => match self.writer_of(bucket, key).await {
                Ok(Some(t)) if t == tag => Ok(()),
                Ok(Some(_)) => Err(PutError::Exists),
                Ok(None) | Err(_) => Err(PutError::Failed(e)),
            },
            Err(other) => Err(other),
        };
        if result.is_err() {
            let _ = self
                .client
                .abort_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
        }
        result?;
        self.stats.s3.bytes(Direction::Written, data.len() as u64);
        Ok(())
    }

    /// The writer tag of an object; `None` when there is no such object.
    async fn writer_of(&self, bucket: &str, key: &str) -> Result<Option<String>, FetchError> {
        let what = format!("s3://{bucket}/{key}");
        let r = self
            .call(S3Op::HeadObject, || async {
                match self
                    .client
                    .head_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                {
                    Ok(h) => Ok(Some(
                        h.metadata()
                            .and_then(|m| m.get(WRITER_TAG).cloned())
                            .unwrap_or_default(),
                    )),
                    Err(e) => match classify(&e, &what) {
                        FetchError::Permanent(Kind::ObjectNotFound, _) => Ok(None),
                        other => Err(other),
                    },
                }
            })
            .await?;
        Ok(r)
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_parts(
        &self,
        data: &[u8],
        bucket: &str,
        key: &str,
        upload_id: &str,
        part_bytes: usize,
        what: &str,
        owned: &(dyn Fn() -> bool + Sync),
    ) -> Result<(), PutError> {
        let mut parts = Vec::new();
        let chunks: Vec<&[u8]> = if data.is_empty() {
            vec![data]
        } else {
            data.chunks(part_bytes.max(1)).collect()
        };
        for (i, chunk) in chunks.into_iter().enumerate() {
            let number = i as i32 + 1;
            let chunk = bytes::Bytes::copy_from_slice(chunk);
            let etag = self
                .call(S3Op::UploadPart, || async {
                    self.client
                        .upload_part()
                        .bucket(bucket)
                        .key(key)
                        .upload_id(upload_id)
                        .part_number(number)
                        .body(ByteStream::from(chunk.clone()))
                        .send()
                        .await
                        .map_err(|e| classify(&e, what))
                })
                .await
                .map_err(PutError::Failed)?
                .e_tag;
            parts.push(
                CompletedPart::builder()
                    .part_number(number)
                    .set_e_tag(etag)
                    .build(),
            );
        }
        let done = CompletedMultipartUpload::builder()
            .set_parts(Some(parts))
            .build();
        // The last moment to find out that the partition moved on: after
        // this the object is visible. Checked before every attempt (a
        // retried completion may come seconds later).
        let result = self
            .call(S3Op::CompleteMultipartUpload, || async {
                if !owned() {
                    return Err(FetchError::Permanent(
                        Kind::FetchFailed,
                        format!("{what}: the partition moved on before the upload completed"),
                    ));
                }
                self.client
                    .complete_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .multipart_upload(done.clone())
                    .if_none_match("*")
                    .send()
                    .await
                    .map_err(|e| classify(&e, what))
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(_) if !owned() => Err(PutError::NotOwned),
            Err(e) => Err(PutError::Failed(e)),
        }
    }
}
