//! The S3 client: reading image objects, uploading Parquet files, listing
//! and deleting leftovers.
//!
//! The SDK's own retries are off: every request goes through
//! [`S3::call`], which retries throttling (503 SlowDown, 429), 5xx, timeouts
//! and connection failures with the fetch stage's backoff and jitter
//! ([`with_retries`]), counts each request and retry in the metrics; errors
//! are classified ([`classify`]) so that the fetch stage can tell a dead
//! letter (404, 403, bad key) from a transient fault.
//!
//! Here: the client, requests, reading and deleting; [`upload`] the
//! never-replacing multipart upload ([`S3::put_new_file`]); `list` the
//! listings; [`config`] and [`metrics`] its section and its metrics.

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

pub mod config;
mod list;
pub mod metrics;
pub mod upload;

pub use self::config::{S3Config, parse_s3_url};
use crate::dead_letter::Kind;
use crate::retry::{FetchError, with_retries};
use crate::stats::{Direction, S3Op, Stats};

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
                // Not the object's fault: credentials, clocks, a body cut in
                // transit, a conditional write racing another request, an
                // upload that went away. Retried; never a dead letter.
                (
                    _,
                    "ExpiredToken"
                    | "InvalidAccessKeyId"
                    | "SignatureDoesNotMatch"
                    | "RequestTimeTooSkewed"
                    | "InvalidToken"
                    | "TokenRefreshRequired"
                    | "IncompleteBody"
                    | "BadDigest"
                    | "ConditionalRequestConflict"
                    | "NoSuchUpload",
                ) => FetchError::Transient(text),
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
    pub async fn call<T, F, Fut>(&self, op: S3Op, mut attempt: F) -> Result<T, FetchError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, FetchError>>,
    {
        let m = &self.stats.s3;
        let mut n = 0u32;
        with_retries(
            self.cfg.max_attempts,
            Duration::from_millis(self.cfg.backoff_ms),
            || {
                n += 1;
                if n > 1 {
                    m.retry(op);
                }
                let fut = attempt();
                async move {
                    let started = Instant::now();
                    let r = fut.await;
                    m.request(op, r.is_ok(), started.elapsed());
                    r
                }
            },
        )
        .await
    }

    /// Reads an object: its bytes and ETag. Objects over `max_bytes` are
    /// refused before their body is read when the response says their size,
    /// and as soon as the bytes read pass it when it does not. A body that
    /// stops arriving for `request_timeout_ms` (or takes more than ten times
    /// that in all) is a transient failure, retried like the others.
    pub async fn get(
        &self,
        bucket: &str,
        key: &str,
        max_bytes: u64,
        memory: &tokio::sync::Mutex<crate::budget::Charge>,
    ) -> Result<(Vec<u8>, Option<String>), FetchError> {
        let what = format!("s3://{bucket}/{key}");
        let idle = Duration::from_millis(self.cfg.request_timeout_ms);
        let r = self
            .call(S3Op::GetObject, || async {
                let resp = self
                    .client
                    .get_object()
                    .bucket(bucket)
                    .key(key)
                    .send()
                    .await
                    .map_err(|e| classify(&e, &what))?;
                let declared = resp.content_length().map(|l| l.max(0) as u64);
                if let Some(len) = declared.filter(|&l| l > max_bytes) {
                    return Err(FetchError::Permanent(
                        Kind::ObjectTooLarge,
                        format!("{what} is {len} bytes, over the limit of {max_bytes}"),
                    ));
                }
                let etag = resp.e_tag().map(|t| t.trim_matches('"').to_string());
                // Room in the memory budget before the body is read.
                if let Some(len) = declared {
                    memory
                        .lock()
                        .await
                        .reserve(len, crate::budget::MAX_WAIT)
                        .await;
                }
                let body = read_body(resp.body, declared, max_bytes, idle, &what).await?;
                memory
                    .lock()
                    .await
                    .reserve(body.len() as u64, std::time::Duration::ZERO)
                    .await;
                Ok((body, etag))
            })
            .await?;
        self.stats.s3.bytes(Direction::Read, r.0.len() as u64);
        Ok(r)
    }

    /// Deletes one object.
    pub async fn delete(&self, bucket: &str, key: &str) -> Result<(), FetchError> {
        let what = format!("s3://{bucket}/{key}");
        self.call(S3Op::DeleteObject, || async {
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

/// Reads a body to the end: at most `max_bytes`, each chunk within `idle`,
/// the whole within ten times that.
async fn read_body(
    mut body: ByteStream,
    declared: Option<u64>,
    max_bytes: u64,
    idle: Duration,
    what: &str,
) -> Result<Vec<u8>, FetchError> {
    let deadline = tokio::time::Instant::now() + idle * 10;
    let mut out = Vec::with_capacity(declared.unwrap_or(0).min(max_bytes) as usize);
    loop {
        let wait = idle.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let chunk = match tokio::time::timeout(wait, body.next()).await {
            Err(_) => {
                return Err(FetchError::Transient(format!(
                    "{what}: the body stalled ({} of {} bytes read)",
                    out.len(),
                    declared.map_or("?".to_string(), |d| d.to_string())
                )));
            }
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(FetchError::Transient(format!(
                    "{what}: reading the body failed: {e}"
                )));
            }
            Ok(Some(Ok(c))) => c,
        };
        if (out.len() + chunk.len()) as u64 > max_bytes {
            return Err(FetchError::Permanent(
                Kind::ObjectTooLarge,
                format!(
                    "{what} is over the limit of {max_bytes} bytes (its size was not declared)"
                ),
            ));
        }
        out.extend_from_slice(&chunk);
    }
    if let Some(d) = declared
        && d != out.len() as u64
    {
        return Err(FetchError::Transient(format!(
            "{what}: the body ended after {} of {d} bytes",
            out.len()
        )));
    }
    Ok(out)
}
