//! Dead letters of local runs: one JSON object per line, appended and synced
//! before the record is acknowledged. The same append-only file keeps the
//! records routed to review (`_review.jsonl`, [`DeadLetterFile::append`],
//! synced once before each Parquet file that holds them is published).
//!
//! `{"id", "source", "partition", "offset", "stage", "kind", "reason",
//! "original"}`; `original` is the event's bytes as text, or
//! `original_base64` when they are not UTF-8.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;

use serde::Serialize;

use crate::record::DeadLetter;

/// An append-only dead-letter file.
#[derive(Debug)]
pub struct DeadLetterFile {
    file: File,
}

#[derive(Serialize)]
struct Line<'a> {
    id: Option<&'a str>,
    source: &'a str,
    partition: i32,
    offset: i64,
    stage: &'static str,
    kind: &'static str,
    reason: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    original: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    original_base64: Option<String>,
}

impl DeadLetterFile {
    /// Opens for appending; a line left half-written by a crash is cut off.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)
            .map_err(|e| anyhow::anyhow!("cannot open dead-letter file {}: {e}", path.display()))?;
        let len = file.metadata()?.len();
        let complete = complete_len(&mut file)?;
        if complete < len {
            tracing::warn!(path = %path.display(), "cutting a partial last line left by a crash");
            file.set_len(complete)?;
        }
        file.seek(SeekFrom::End(0))?;
        Ok(DeadLetterFile { file })
    }

    /// Appends one JSON line, not yet synced ([`DeadLetterFile::sync`]).
    pub fn append(&mut self, value: &impl Serialize) -> anyhow::Result<()> {
        let mut buf = serde_json::to_vec(value)?;
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        Ok(())
    }

    /// Syncs what was appended to disk.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.file.sync_data()?;
        Ok(())
    }

    /// Appends one dead letter and syncs it to disk.
    pub fn write(&mut self, d: &DeadLetter) -> anyhow::Result<()> {
        let o = &d.origin;
        let text = std::str::from_utf8(&o.raw).ok();
        let line = Line {
            id: d.id.as_deref(),
            source: &o.partition.source,
            partition: o.partition.partition,
            offset: o.position.offset,
            stage: d.stage.as_str(),
            kind: d.kind.as_str(),
            reason: &d.reason,
            original: text,
            original_base64: text.is_none().then(|| base64(&o.raw)),
        };
        let mut buf = serde_json::to_vec(&line)?;
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        Ok(())
    }
}

fn complete_len(file: &mut File) -> std::io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(&*file);
    let mut good = 0u64;
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line)?;
        if n == 0 || line.last() != Some(&b'\n') {
            return Ok(good);
        }
        good += n as u64;
    }
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
    }
}
