//! The config file as text: `${VAR}` interpolation, path normalisation, and
//! the problems found in it, each with its place.

use std::path::{Path, PathBuf};

/// One hour, in ms: the longest any `_ms` duration may be, so that no
/// deadline or backoff computed from one can overflow.
pub const HOUR_MS: u64 = 3_600_000;

/// A problem found in a config, with its path in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// Dotted path (`engine.vision_batch.max_size`), or `-` for the file.
    pub path: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The problems found so far: every section's `check` adds to one list, so
/// that `clipstream validate` shows all of them at once.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    /// Adds a problem at `path`.
    pub fn bad(&mut self, path: &str, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// `Ok` when nothing was found.
    pub fn into_result(self) -> Result<(), Vec<Problem>> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0)
        }
    }
}

/// Problems of a config file, all of them.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {} problem(s):\n{}", .problems.len(), .problems.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Every problem.
    pub problems: Vec<Problem>,
}

/// Replaces `${VAR}` and `${VAR:-default}` from `env`. A variable that is
/// unset and has no default is a problem (reported by name and line).
pub fn interpolate(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
) -> Result<String, Vec<Problem>> {
    let mut out = String::with_capacity(text.len());
    let mut problems = Problems::default();
    for (lineno, line) in text.split_inclusive('\n').enumerate() {
        let at = format!("line {}", lineno + 1);
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let Some(end) = after.find('}') else {
                problems.bad(&at, "unterminated `${`");
                out.push_str(&rest[start..]);
                rest = "";
                break;
            };
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (inner, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            match (valid, env(name), default) {
                (false, _, _) => problems.bad(
                    &at,
                    format!("`${{{inner}}}` is not a valid variable reference"),
                ),
                (true, Some(v), _) => out.push_str(&v),
                (true, None, Some(d)) => out.push_str(d),
                (true, None, None) => problems.bad(
                    &at,
                    format!("environment variable {name} is not set (use ${{{name}:-default}} for a default)"),
                ),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    problems.into_result().map(|()| out)
}

/// Removes `.` and `dir/..` pairs without touching the file system, so that
/// messages show `out/local` rather than `pipelines/../out/local`; a path
/// that cancels out entirely is `.`.
pub fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !matches!(out.components().next_back(), Some(Component::Normal(_))) || !out.pop()
                {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

/// Makes a relative path absolute against `base`.
pub fn absolute(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = normalize(&base.join(&*p));
    }
}
