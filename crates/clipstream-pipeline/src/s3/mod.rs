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
use aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};

pub mod config;
pub mod metrics;

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

    /// Keys under `prefix` (after `start_after`, when given), all pages.
    pub async fn list(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
    ) -> Result<Vec<String>, FetchError> {
        self.list_pages(bucket, prefix, start_after, None, |page| {
            page.contents()
                .iter()
                .filter_map(|o| o.key().map(String::from))
                .collect()
        })
        .await
    }

    /// The "folders" directly under `prefix` (common prefixes with `/`).
    pub async fn list_folders(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<String>, FetchError> {
        self.list_pages(bucket, prefix, None, Some("/"), |page| {
            page.common_prefixes()
                .iter()
                .filter_map(|p| p.prefix().map(String::from))
                .collect()
        })
        .await
    }

    /// Keys under `prefix` with a token that changes when the object does:
    /// `etag:` and its ETag (quotes removed), or, from a server whose
    /// listings carry no ETags, `modified:` with its last-modified time and
    /// size. All pages; and how many pages (requests) that took.
    pub async fn list_change_tokens(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<(Vec<(String, String)>, u64), FetchError> {
        let pages = std::sync::atomic::AtomicU64::new(0);
        let all = self
            .list_pages(bucket, prefix, None, None, |page| {
                pages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                page.contents()
                    .iter()
                    .filter_map(|o| {
                        let token = match o.e_tag() {
                            Some(e) => format!("etag:{}", e.trim_matches('"')),
                            None => {
                                let t = o.last_modified()?;
                                format!(
                                    "modified:{}.{:09}:{}",
                                    t.secs(),
                                    t.subsec_nanos(),
                                    o.size().unwrap_or(-1)
                                )
                            }
                        };
                        Some((o.key()?.to_string(), token))
                    })
                    .collect()
            })
            .await?;
        Ok((all, pages.into_inner()))
    }

    /// Every page of a ListObjectsV2 listing, each page's names taken by `names`.
    async fn list_pages<T>(
        &self,
        bucket: &str,
        prefix: &str,
        start_after: Option<&str>,
        delimiter: Option<&str>,
        names: impl Fn(&ListObjectsV2Output) -> Vec<T>,
    ) -> Result<Vec<T>, FetchError> {
        let what = format!("s3://{bucket}/{prefix}");
        let mut all = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .call(S3Op::ListObjects, || async {
                    self.client
                        .list_objects_v2()
                        .bucket(bucket)
                        .prefix(prefix)
                        .set_start_after(start_after.map(String::from))
                        .set_delimiter(delimiter.map(String::from))
                        .set_continuation_token(token.clone())
                        .send()
                        .await
                        .map_err(|e| classify(&e, &what))
                })
                .await?;
            all.extend(names(&page));
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => return Ok(all),
            }
        }
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
