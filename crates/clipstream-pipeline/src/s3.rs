//! The S3 client: reading image objects, uploading Parquet files, listing
//! and deleting leftovers.
//!
//! The SDK's own retries are off: every request goes through
//! [`S3::call`], which retries throttling (503 SlowDown, 429), 5xx, timeouts
//! and connection failures with the fetch stage's backoff and jitter
//! ([`with_retries`]), counts each request and retry in the metrics; errors
//! are classified ([`classify`]) so that the fetch stage can tell a dead
//! letter (404, 403, bad key) from a transient fault.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::Region;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

use crate::config::S3Config;
use crate::dead_letter::Kind;
use crate::fetch::{FetchError, with_retries};
use crate::stats::Stats;

/// Sorts an SDK error into transient or permanent, with a message that
/// names the operation and the object.
pub fn classify<E, R>(e: &SdkError<E, R>, what: &str) -> FetchError
where
    E: ProvideErrorMetadata + std::error::Error,
    R: std::fmt::Debug + HasStatus,
{
    match e {
        SdkError::TimeoutError(_) => FetchError::Transient(format!("{what}: timed out")),
        SdkError::DispatchFailure(d) => {
            FetchError::Transient(format!("{what}: cannot reach S3: {:?}", d))
        }
        SdkError::ResponseError(r) => {
            FetchError::Transient(format!("{what}: bad response: {:?}", r))
        }
        SdkError::ServiceError(se) => {
            let status = se.raw().status_code();
            let code = se.err().code().unwrap_or("");
            let msg = se.err().message().unwrap_or("");
            let text = format!("{what}: HTTP {status} {code} {msg}")
                .trim_end()
                .to_string();
            match (status, code) {
                (429, _) | (500..=599, _) => FetchError::Transient(text),
                (_, "SlowDown" | "Throttling" | "RequestTimeout" | "InternalError") => {
                    FetchError::Transient(text)
                }
                (404, _) => FetchError::Permanent(Kind::ObjectNotFound, text),
                (403, _) => FetchError::Permanent(Kind::ObjectForbidden, text),
                (_, "InvalidKey" | "KeyTooLongError" | "InvalidBucketName" | "InvalidArgument") => {
                    FetchError::Permanent(Kind::InvalidUri, text)
                }
                _ => FetchError::Permanent(Kind::FetchFailed, text),
            }
        }
        other => FetchError::Permanent(Kind::FetchFailed, format!("{what}: {other}")),
    }
}

/// The HTTP status of a raw response.
pub trait HasStatus {
    /// The status code.
    fn status_code(&self) -> u16;
}

impl HasStatus for aws_sdk_s3::config::http::HttpResponse {
    fn status_code(&self) -> u16 {
        self.status().as_u16()
    }
}

/// An S3 client with retries and metrics.
#[derive(Clone)]
pub struct S3 {
    client: Client,
    cfg: S3Config,
    stats: Arc<Stats>,
}

impl std::fmt::Debug for S3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3")
            .field("endpoint", &self.cfg.endpoint)
            .finish_non_exhaustive()
    }
}

impl S3 {
    /// A client for `cfg`, credentials from the standard AWS chain.
    pub async fn connect(cfg: &S3Config, stats: Arc<Stats>) -> S3 {
        let region = RegionProviderChain::first_try(cfg.region.clone().map(Region::new))
            .or_default_provider()
            .or_else(Region::new("us-east-1"));
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(region)
            .load()
            .await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(cfg.force_path_style)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .operation_attempt_timeout(Duration::from_millis(cfg.request_timeout_ms))
                    .connect_timeout(Duration::from_millis(cfg.request_timeout_ms.min(5_000)))
                    .build(),
            );
        if let Some(e) = &cfg.endpoint {
            b = b.endpoint_url(e);
        }
        S3 {
            client: Client::from_conf(b.build()),
            cfg: cfg.clone(),
            stats,
        }
    }

    /// Runs `attempt` with [`with_retries`] (`max_attempts`, backoff from
    /// `backoff_ms`), counting every attempt, its time and every retry.
    pub async fn call<T, F, Fut>(&self, op: &'static str, mut attempt: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchError>>,
    {
        let stats = &self.stats;
        let mut n = 0u32;
        with_retries(
            self.cfg.max_attempts,
            Duration::from_millis(self.cfg.backoff_ms),
            || {
                n += 1;
                if n > 1 {
                    stats.s3_retries.with_label_values(&[op]).inc();
                }
                let fut = attempt();
                async move {
                    let started = Instant::now();
                    let r = fut.await;
                    stats
                        .s3_seconds
                        .with_label_values(&[op])
                        .observe(started.elapsed().as_secs_f64());
                    let result = if r.is_ok() { "ok" } else { "error" };
                    stats.s3_requests.with_label_values(&[op, result]).inc();
                    r
                }
            },
        )
        .await
    }

    /// Reads an object: its bytes and ETag. Objects over `max_bytes` are
    /// refused before their body is read.
    pub async fn get(
        &self,
        bucket: &str,
        key: &str,
        max_bytes: u64,
    ) -> Result<(Vec<u8>, Option<String>), FetchError> {
        let what = format!("s3://{bucket}/{key}");
        let r = self
            .call("get_object", || async {
                let resp = self
                    .client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| classify(&e, &what))?;
                let len = resp.content_length().unwrap_or(0).max(0) as u64;
                if len > max_bytes {
                    return Err(FetchError::Permanent(
                        Kind::ObjectTooLarge,
                        format!("{what} is {len} bytes, over the limit of {max_bytes}"),
                    ));
                }
                let etag = resp.e_tag().map(|t| t.trim_matches('"').to_string());
                let body = resp.body.collect().await.map_err(|e| {
                    FetchError::Transient(format!("{what}: reading the body failed: {e}"))
                })?;
                Ok((body.into_bytes().to_vec(), etag))
            })
            .await?;
        self.stats
            .s3_bytes
            .with_label_values(&["read"])
            .inc_by(r.0.len() as u64);
        Ok(r)
    }

    /// Uploads a local file with a multipart upload (parts of `part_bytes`);
    /// the object appears only when the upload completes. Returns its size.
    pub async fn upload_file(
        &self,
        path: &Path,
        bucket: &str,
        key: &str,
        part_bytes: usize,
    ) -> Result<u64, FetchError> {
        let what = format!("s3://{bucket}/{key}");
        let data = tokio::fs::read(path)
            .await
            .map_err(|e| FetchError::Transient(format!("cannot read {}: {e}", path.display())))?;
        let upload_id = self
            .call("create_multipart_upload", || async {
                self.client
                    .create_multipart_upload()
                    .bucket(bucket)
                    .key(key)
                    .content_type("application/vnd.apache.parquet")
                    .send()
                    .await
                    .map_err(|e| classify(&e, &what))
            })
            .await?
            .upload_id
            .ok_or_else(|| FetchError::Transient(format!("{what}: no upload id returned")))?;
        let result = self
            .upload_parts(&data, bucket, key, &upload_id, part_bytes, &what)
            .await;
        if let Err(e) = &result {
            tracing::warn!(object = %what, error = %e, "multipart upload failed; aborting it");
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
        self.stats
            .s3_bytes
            .with_label_values(&["written"])
            .inc_by(data.len() as u64);
        Ok(data.len() as u64)
    }

    async fn upload_parts(
        &self,
        data: &[u8],
        bucket: &str,
        key: &str,
        upload_id: &str,
        part_bytes: usize,
        what: &str,
    ) -> Result<(), FetchError> {
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
                .call("upload_part", || async {
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
                .await?
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
        self.call("complete_multipart_upload", || async {
            self.client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(key)
                .upload_id(upload_id)
                .multipart_upload(done.clone())
                .send()
                .await
                .map_err(|e| classify(&e, what))
        })
        .await?;
        Ok(())
    }

    /// Keys under `prefix`, all pages.
    pub async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<String>, FetchError> {
        let what = format!("s3://{bucket}/{prefix}");
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call("list_objects", || async {
                    self.client
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(prefix)
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| classify(&e, &what))
                })
                .await?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key().map(String::from)),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(keys),
            }
        }
    }

    /// Deletes one object.
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), FetchError> {
        let what = format!("s3://{bucket}/{key}");
        self.call("delete_object", || async {
            self.client
                .delete_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| classify(&e, &what))
        })
        .await?;
        Ok(())
    }

    /// Whether the bucket answers (readiness).
    pub async fn reachable(&self, bucket: &str) -> Result<(), FetchError> {
        let what = format!("s3://{bucket}");
        self.client
            .head_bucket()
            .bucket(bucket)
            .send()
            .await
            .map_err(|e| classify(&e, &what))?;
        Ok(())
    }
}
