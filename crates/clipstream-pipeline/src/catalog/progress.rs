//! A night's progress, for the fleet's dashboard.
//!
//! `clipstream plan --publish` marks each event it sends with two Kafka
//! headers: the night's name and how many events it planned. A worker that
//! reads a marked event shows the figure as
//! `clipstream_night_planned{night="..."}`; the overview dashboard puts it
//! beside the group's consumer lag (what is left) and the finish rate (the
//! ETA). The headers come from the topic, so they are read as hostile: a
//! name of other characters or a count that is not a plain number is
//! ignored (progress is not data; the event itself is processed as usual).

use crate::dead_letter::Headers;

/// Header naming the night (`[A-Za-z0-9._:-]`, at most [`MAX_NAME`] bytes).
pub const NIGHT_HEADER: &str = "clipstream.night";
/// Header with the number of events the night planned (decimal digits).
pub const PLANNED_HEADER: &str = "clipstream.night.planned";
/// Header with when the night was published (Unix seconds, decimal
/// digits): the dashboard shows the newest night.
pub const PUBLISHED_HEADER: &str = "clipstream.night.published";
/// The longest night name kept.
pub const MAX_NAME: usize = 64;
/// The largest planned count believed (a trillion events).
const MAX_PLANNED: u64 = 1_000_000_000_000;

/// A night and how many events it planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NightMark {
    /// The night's name (a label value).
    pub night: String,
    /// Events planned for it.
    pub planned: u64,
    /// When it was published (Unix seconds).
    pub published: u64,
}

fn name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// The name a night is published under: its folder's name, other
/// characters replaced by `_`, at most [`MAX_NAME`] bytes.
pub fn night_name(folder: &std::path::Path) -> String {
    let raw = folder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut name: String = raw
        .chars()
        .map(|c| if name_char(c) { c } else { '_' })
        .take(MAX_NAME)
        .collect();
    if name.is_empty() {
        name.push_str("night");
    }
    name
}

/// The headers of a night's events.
pub fn headers(mark: &NightMark) -> [(&'static str, String); 3] {
    [
        (NIGHT_HEADER, mark.night.clone()),
        (PLANNED_HEADER, mark.planned.to_string()),
        (PUBLISHED_HEADER, mark.published.to_string()),
    ]
}

/// A count as written in a header: decimal digits only, at most `max`.
fn number(value: &[u8], max: u64) -> Option<u64> {
    let text = std::str::from_utf8(value).ok()?;
    if text.is_empty() || text.len() > 13 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok().filter(|n| *n <= max)
}

/// The night mark of a message's headers, if it has a valid one (all
/// three headers, once each).
pub fn parse(headers: &Headers) -> Option<NightMark> {
    let mut night = None;
    let mut planned = None;
    let mut published = None;
    for (name, value) in headers.iter() {
        let slot = match name.as_str() {
            NIGHT_HEADER => &mut night,
            PLANNED_HEADER => &mut planned,
            PUBLISHED_HEADER => &mut published,
            _ => continue,
        };
        if slot.is_some() {
            // Twice: which one is meant is not known.
            return None;
        }
        *slot = Some(value.as_deref()?);
    }
    let night = std::str::from_utf8(night?).ok()?;
    if night.is_empty() || night.len() > MAX_NAME || !night.chars().all(name_char) {
        return None;
    }
    Some(NightMark {
        night: night.to_string(),
        planned: number(planned?, MAX_PLANNED)?,
        // Unix seconds until the year 5138.
        published: number(published?, 99_999_999_999)?,
    })
}

/// How many events each night planned and when it was published, for the
/// two nights seen last: a fleet that runs every night does not grow a
/// series a night.
#[derive(Debug)]
pub struct NightMetrics {
    planned: prometheus::IntGaugeVec,
    published: prometheus::IntGaugeVec,
    /// The nights shown, least recently seen first.
    shown: std::sync::Mutex<Vec<String>>,
}

impl NightMetrics {
    pub(crate) fn register(r: &crate::stats::register::Register) -> Self {
        NightMetrics {
            planned: r.gauge_vec(
                "clipstream_night_planned",
                "Events a night planned (from the headers of its events; the two nights seen last).",
                &["night"],
            ),
            published: r.gauge_vec(
                "clipstream_night_published_timestamp_seconds",
                "When a night's events were published (from their headers): the newest is tonight's.",
                &["night"],
            ),
            shown: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Shows the night of an event's headers.
    pub fn mark(&self, mark: &NightMark) {
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        shown.retain(|n| *n != mark.night);
        shown.push(mark.night.clone());
        while shown.len() > 2 {
            let old = shown.remove(0);
            let _ = self.planned.remove_label_values(&[&old]);
            let _ = self.published.remove_label_values(&[&old]);
        }
        self.planned
            .with_label_values(&[&mark.night])
            .set(i64::try_from(mark.planned).unwrap_or(i64::MAX));
        self.published
            .with_label_values(&[&mark.night])
            .set(i64::try_from(mark.published).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn h(pairs: &[(&str, Option<&[u8]>)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.map(<[u8]>::to_vec)))
            .collect::<Vec<_>>()
            .into()
    }

    #[test]
    fn a_published_mark_reads_back() {
        let mark = NightMark {
            night: night_name(std::path::Path::new("/nights/2026-12-02")),
            planned: 4321,
            published: 1_796_169_600,
        };
        assert_eq!(mark.night, "2026-12-02");
        let hs: Headers = Arc::from(
            headers(&mark)
                .iter()
                .map(|(n, v)| (n.to_string(), Some(v.as_bytes().to_vec())))
                .collect::<Vec<_>>(),
        );
        assert_eq!(parse(&hs), Some(mark));
    }

    #[test]
    fn night_names_are_made_safe() {
        let long = "x".repeat(100);
        assert_eq!(night_name(std::path::Path::new(&long)).len(), MAX_NAME);
        assert_eq!(night_name(std::path::Path::new("a b/\"{}\"")), "____");
        assert_eq!(night_name(std::path::Path::new("/")), "night");
    }

    #[test]
    fn hostile_marks_are_ignored() {
        let n: &[u8] = b"n1";
        let at: &[u8] = b"1796169600";
        let mark = |night: Option<&[u8]>, planned: Option<&[u8]>, published: Option<&[u8]>| {
            h(&[
                (NIGHT_HEADER, night),
                (PLANNED_HEADER, planned),
                (PUBLISHED_HEADER, published),
            ])
        };
        let long = [b'a'; 65];
        for bad in [
            h(&[(NIGHT_HEADER, Some(n)), (PUBLISHED_HEADER, Some(at))]),
            h(&[(PLANNED_HEADER, Some(b"5")), (PUBLISHED_HEADER, Some(at))]),
            h(&[(NIGHT_HEADER, Some(n)), (PLANNED_HEADER, Some(b"5"))]),
            mark(None, Some(b"5"), Some(at)),
            mark(Some(n), None, Some(at)),
            mark(Some(n), Some(b"5"), None),
            mark(Some(b"\xff\xfe"), Some(b"5"), Some(at)),
            mark(Some(b"a\"b"), Some(b"5"), Some(at)),
            mark(Some(b""), Some(b"5"), Some(at)),
            mark(Some(&long), Some(b"5"), Some(at)),
            mark(Some(n), Some(b"-5"), Some(at)),
            mark(Some(n), Some(b"+5"), Some(at)),
            mark(Some(n), Some(b"5e3"), Some(at)),
            mark(Some(n), Some(b""), Some(at)),
            mark(Some(n), Some(b"99999999999999999999"), Some(at)),
            mark(Some(n), Some(b"1000000000001"), Some(at)),
            mark(Some(n), Some(b"5"), Some(b"-1")),
            mark(Some(n), Some(b"5"), Some(b"1e9")),
            h(&[
                (NIGHT_HEADER, Some(n)),
                (NIGHT_HEADER, Some(b"n2")),
                (PLANNED_HEADER, Some(b"5")),
                (PUBLISHED_HEADER, Some(at)),
            ]),
        ] {
            assert_eq!(parse(&bad), None, "{bad:?}");
        }
        let good = h(&[
            ("other", Some(b"\xff")),
            (PLANNED_HEADER, Some(b"0")),
            (PUBLISHED_HEADER, Some(at)),
            (NIGHT_HEADER, Some(b"nightly:2026-12-02_a.b")),
        ]);
        assert_eq!(
            parse(&good),
            Some(NightMark {
                night: "nightly:2026-12-02_a.b".into(),
                planned: 0,
                published: 1_796_169_600,
            })
        );
    }
}
