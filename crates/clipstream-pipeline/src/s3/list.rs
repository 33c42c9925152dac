//! Listing: keys under a prefix, folders, and change tokens (ETags) for
//! nightly planning, page by page.

use aws_sdk_s3::operation::list_objects_v2::ListObjectsV2Output;

use super::{S3, classify};
use crate::retry::FetchError;
use crate::stats::S3Op;

impl S3 {
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
}
