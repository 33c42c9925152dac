//! `[s3]`: the S3 client, and `s3://bucket/prefix` URLs.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::file::{HOUR_MS, Problems};

/// `[s3]`: the S3 client. Credentials come from the standard AWS chain
/// (environment, profile, web identity, instance metadata).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Endpoint URL for S3-compatible stores (MinIO, Ceph, ...). Default:
    /// AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Region. Default: from the environment, else `us-east-1`.
    #[serde(default)]
    pub region: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`), which most
    /// S3-compatible stores need. Default false.
    #[serde(default)]
    pub force_path_style: bool,
    /// Time limit of one request attempt, in ms. Default 10000.
    #[serde(default = "default_s3_timeout")]
    pub request_timeout_ms: u64,
    /// Attempts per request (throttling, 5xx and timeouts are retried with
    /// exponential backoff and jitter). Default 5.
    #[serde(default = "default_s3_attempts")]
    pub max_attempts: u32,
    /// First backoff, in ms; doubles per attempt. Default 100.
    #[serde(default = "default_s3_backoff")]
    pub backoff_ms: u64,
}

fn default_s3_timeout() -> u64 {
    10_000
}
fn default_s3_attempts() -> u32 {
    5
}
fn default_s3_backoff() -> u64 {
    100
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            force_path_style: false,
            request_timeout_ms: default_s3_timeout(),
            max_attempts: default_s3_attempts(),
            backoff_ms: default_s3_backoff(),
        }
    }
}

impl S3Config {
    /// Time limit of one request attempt.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    pub(crate) fn check(&self, p: &mut Problems) {
        if self.max_attempts == 0 {
            p.bad("s3.max_attempts", "must be at least 1");
        }
        // At most an hour each, so that no deadline or backoff computed
        // from them (ten times the timeout for a whole transfer; the
        // backoff doubled per attempt, with jitter) can overflow.
        if self.request_timeout_ms == 0 || self.request_timeout_ms > HOUR_MS {
            p.bad(
                "s3.request_timeout_ms",
                format!(
                    "{} must be between 1 and {HOUR_MS} (one hour)",
                    self.request_timeout_ms
                ),
            );
        }
        if self.backoff_ms > HOUR_MS {
            p.bad(
                "s3.backoff_ms",
                format!("{} must be at most {HOUR_MS} (one hour)", self.backoff_ms),
            );
        }
        if let Some(e) = &self.endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            p.bad(
                "s3.endpoint",
                format!("{e:?} must start with http:// or https://"),
            );
        }
    }
}

/// Splits `s3://bucket/prefix` into bucket and prefix (no leading or
/// trailing slash; may be empty).
pub fn parse_s3_url(url: &str) -> Result<(String, String), String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{url:?} is not an s3://bucket/prefix URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("{url:?} has no bucket"));
    }
    Ok((bucket.to_string(), prefix.trim_matches('/').to_string()))
}
