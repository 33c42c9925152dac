//! `clipstream plan`: tonight's catalog against what earlier runs wrote.
//!
//! Writes, into the night's folder:
//! - `events.jsonl`: one event per product to embed, sorted by id, each
//!   carrying its image's change token and why it is planned in
//!   `attributes` (`clipstream.image_token`, `clipstream.reason`);
//! - `deletions.jsonl`: `{"id": ...}` for each product that earlier output
//!   has and tonight's catalog does not;
//! - `catalog-ids.jsonl`: every id of tonight's catalog (what `snapshot`
//!   keeps);
//! - `plan.json`: the summary, written last: a folder with it holds a
//!   complete plan, and planning that night again keeps it (so that a rerun
//!   of the night resumes the same work).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::previous::{self, Prior};
use super::{Columns, Product, RowProblems, TOKEN_ATTRIBUTE};

/// What to plan.
#[derive(Debug, Clone)]
pub struct PlanInput {
    /// The catalog export.
    pub catalog: PathBuf,
    /// Its columns.
    pub columns: Columns,
    /// Folders of earlier output (the last snapshot, earlier nights).
    pub previous: Vec<PathBuf>,
    /// The fingerprint of tonight's model (`ClipModel::fingerprint`).
    pub fingerprint: String,
    /// The night's folder.
    pub out: PathBuf,
    /// Records/s of the fleet, for the estimate (none: no estimate).
    pub rate: Option<f64>,
    /// The most products a night may delete, as a share of the products in
    /// earlier output (a broken export must not empty the index).
    pub max_deleted_share: f64,
}

/// Why a product is embedded tonight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Not in earlier output.
    New,
    /// Written by a different model (or before fingerprints were kept).
    Model,
    /// Its image changed.
    Image,
    /// Its text changed.
    Text,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::New => "new",
            Reason::Model => "model",
            Reason::Image => "image",
            Reason::Text => "text",
        }
    }
}

/// The summary a person reads (`plan.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PlanSummary {
    /// Usable rows of the catalog.
    pub catalog_rows: u64,
    /// Distinct products (the last row of an id wins).
    pub products: u64,
    /// Rows whose id an earlier row already had.
    pub duplicate_ids: u64,
    /// Rows skipped: no id, nothing to embed, unreadable.
    pub bad_rows: u64,
    /// Products skipped because their local image cannot be read.
    pub unreadable_images: u64,
    /// Products embedded tonight, by reason (a product counts once, under
    /// its first reason: new, model, image, text).
    pub new: u64,
    /// See `new`.
    pub changed_model: u64,
    /// See `new`.
    pub changed_image: u64,
    /// See `new`.
    pub changed_text: u64,
    /// Products left as they are.
    pub unchanged: u64,
    /// Products in earlier output and not in the catalog.
    pub deleted: u64,
    /// Deletions not made because catalog rows could not be read.
    #[serde(default)]
    pub deletions_held: u64,
    /// Events written (`new + changed_*`).
    pub planned: u64,
    /// Products in earlier output.
    pub previous_products: u64,
    /// Events handed to the fleet's topic (`--publish`).
    #[serde(default)]
    pub published: Option<u64>,
    /// Where they ended, per partition of that topic (the offset after the
    /// last one): the group has done the night once it committed these.
    #[serde(default)]
    pub published_ends: BTreeMap<i32, i64>,
    /// Listing requests made for remote images' ETags.
    #[serde(default)]
    pub listing_requests: u64,
    /// Seconds to embed the planned events at `--rate`.
    pub estimated_seconds: Option<f64>,
    /// Examples of bad rows and unreadable images.
    pub problems: Vec<String>,
    /// The model's fingerprint.
    pub fingerprint: String,
}

/// Where a plan's files are.
pub fn events_path(night: &Path) -> PathBuf {
    night.join("events.jsonl")
}
/// See [`events_path`].
pub fn deletions_path(night: &Path) -> PathBuf {
    night.join("deletions.jsonl")
}
/// See [`events_path`].
pub fn ids_path(night: &Path) -> PathBuf {
    night.join("catalog-ids.jsonl")
}
/// See [`events_path`].
pub fn summary_path(night: &Path) -> PathBuf {
    night.join("plan.json")
}

/// Reads a complete plan's summary, if the folder holds one.
pub fn existing(night: &Path) -> anyhow::Result<Option<PlanSummary>> {
    let p = summary_path(night);
    match std::fs::read(&p) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).with_context(|| format!("reading {}", p.display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
    }
}

/// Change tokens of remote images (`s3://` URIs without a change column),
/// looked up by the caller from listings (no image is downloaded): URI →
/// token (`etag:...`), and the requests it took. A URI missing from the
/// answer is an image that is not there.
pub type RemoteTokens<'a> =
    &'a mut dyn FnMut(&[String]) -> anyhow::Result<(HashMap<String, String>, u64)>;

/// The token of a product's image: the change column's value when the
/// catalog has one; else, for a local file, its size and modification
/// time; for a remote one, its ETag from `remote` (`None`: no image).
fn image_token(
    p: &Product,
    catalog_dir: &Path,
    remote: &HashMap<String, String>,
) -> Result<Option<(String, String)>, String> {
    let Some(uri) = &p.image else { return Ok(None) };
    let local = if let Some(rest) = uri.strip_prefix("file://") {
        Some(PathBuf::from(rest))
    } else if uri.contains("://") {
        None
    } else {
        Some(catalog_dir.join(uri))
    };
    let image = match &local {
        Some(path) => path.display().to_string(),
        None => uri.clone(),
    };
    if let Some(change) = &p.change {
        return Ok(Some((image, format!("col:{change}"))));
    }
    match local {
        Some(path) => {
            let meta = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let mtime = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            Ok(Some((image, format!("file:{}:{mtime}", meta.len()))))
        }
        None => match remote.get(uri) {
            Some(token) => Ok(Some((image, token.clone()))),
            None => Err(format!("{uri}: no such object")),
        },
    }
}

/// Whether a product's image token must come from a remote listing.
fn needs_remote(p: &Product) -> Option<&str> {
    let uri = p.image.as_deref()?;
    (p.change.is_none() && uri.contains("://") && !uri.starts_with("file://")).then_some(uri)
}

/// Plans the night (or keeps the plan already in `input.out`; `replan`
/// writes a new one). `progress` gets (step, done, total).
/// Hands the planned events to the fleet (a Kafka topic); returns how many
/// the brokers acknowledged.
pub type Publish<'a> =
    &'a mut dyn FnMut(&[serde_json::Value]) -> anyhow::Result<(u64, BTreeMap<i32, i64>)>;

pub fn plan(
    input: &PlanInput,
    replan: bool,
    remote_tokens: RemoteTokens,
    publish: Option<Publish>,
    mut progress: impl FnMut(&str, usize, usize),
) -> anyhow::Result<(PlanSummary, bool)> {
    if !replan && let Some(summary) = existing(&input.out)? {
        anyhow::ensure!(
            summary.fingerprint == input.fingerprint,
            "{} holds a plan for the model {}, and this pipeline's model is {}: \
             plan the night again with --replan (its run output so far is from the other model)",
            input.out.display(),
            summary.fingerprint,
            input.fingerprint
        );
        // A kept plan that was never published is published now (once).
        if let Some(publish) = publish
            && summary.published.is_none()
        {
            let mut summary = summary;
            let events = read_events(&events_path(&input.out))?;
            publish_into(&mut summary, publish, &events)?;
            write_summary(&input.out, &summary)?;
            return Ok((summary, false));
        }
        return Ok((summary, false));
    }
    std::fs::create_dir_all(&input.out)
        .with_context(|| format!("creating {}", input.out.display()))?;
    let prior: HashMap<String, Prior> =
        previous::read(&input.previous, |d, t| progress("previous output", d, t))?;

    // Tonight's catalog, the last row of an id winning.
    let mut products: BTreeMap<String, Product> = BTreeMap::new();
    let mut summary = PlanSummary {
        fingerprint: input.fingerprint.clone(),
        previous_products: prior.len() as u64,
        ..PlanSummary::default()
    };
    let problems: RowProblems = super::read_catalog(&input.catalog, &input.columns, |p| {
        summary.catalog_rows += 1;
        if products.insert(p.id.clone(), p).is_some() {
            summary.duplicate_ids += 1;
        }
    })?;
    summary.bad_rows = problems.total();
    summary.problems = problems.examples.clone();
    summary.products = products.len() as u64;

    let catalog_dir = match input.catalog.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let catalog_dir = std::fs::canonicalize(&catalog_dir).unwrap_or(catalog_dir);
    let remote: Vec<String> = products
        .values()
        .filter_map(needs_remote)
        .map(str::to_string)
        .collect();
    let remote = if remote.is_empty() {
        HashMap::new()
    } else {
        progress("listing images", 0, remote.len());
        let (etags, requests) = remote_tokens(&remote)?;
        summary.listing_requests = requests;
        etags
    };
    let mut events = Vec::new();
    let total = products.len();
    for (k, (id, p)) in products.iter().enumerate() {
        if k % 4096 == 0 {
            progress("catalog", k, total);
        }
        let (image, token) = match image_token(p, &catalog_dir, &remote) {
            Ok(Some((image, token))) => (Some(image), Some(token)),
            Ok(None) => (None, None),
            Err(why) => {
                summary.unreadable_images += 1;
                if summary.problems.len() < 20 {
                    summary.problems.push(format!("{id}: {why}"));
                }
                continue;
            }
        };
        let reason = match prior.get(id) {
            None => Some(Reason::New),
            Some(old) if old.fingerprint.as_deref() != Some(input.fingerprint.as_str()) => {
                Some(Reason::Model)
            }
            Some(old)
                if old.token != token || old.image != previous::text_hash(image.as_deref()) =>
            {
                Some(Reason::Image)
            }
            Some(old) if old.text != previous::text_hash(p.text.as_deref()) => Some(Reason::Text),
            Some(_) => None,
        };
        let Some(reason) = reason else {
            summary.unchanged += 1;
            continue;
        };
        match reason {
            Reason::New => summary.new += 1,
            Reason::Model => summary.changed_model += 1,
            Reason::Image => summary.changed_image += 1,
            Reason::Text => summary.changed_text += 1,
        }
        let mut attributes = serde_json::Map::new();
        if let Some(t) = &token {
            attributes.insert(TOKEN_ATTRIBUTE.into(), t.clone().into());
        }
        attributes.insert("clipstream.reason".into(), reason.as_str().into());
        let mut ev = serde_json::json!({ "id": id, "attributes": attributes });
        if let Some(i) = image {
            ev["image"] = i.into();
        }
        if let Some(t) = &p.text {
            ev["text"] = t.clone().into();
        }
        events.push(ev);
    }
    progress("catalog", total, total);
    summary.planned = events.len() as u64;
    let mut deleted: Vec<&String> = prior
        .keys()
        .filter(|id| !products.contains_key(*id))
        .collect();
    deleted.sort();
    // Deletions only from a catalog read cleanly, and not too many of them:
    // a row that could not be read is a product we know nothing about, not
    // one that is gone.
    if problems.unreadable > 0 && !deleted.is_empty() {
        summary.deletions_held = deleted.len() as u64;
        summary.problems.insert(
            0,
            format!(
                "{} deletions held back: {} catalog rows could not be read",
                deleted.len(),
                problems.unreadable
            ),
        );
        deleted.clear();
    }
    if !deleted.is_empty() && deleted.len() as f64 > input.max_deleted_share * prior.len() as f64 {
        anyhow::bail!(
            "the catalog {} would delete {} of the {} products in earlier output (more than {:.0}%): \
             refusing (a partial export?); --max-deleted-percent raises the limit",
            input.catalog.display(),
            deleted.len(),
            prior.len(),
            100.0 * input.max_deleted_share
        );
    }
    summary.deleted = deleted.len() as u64;
    summary.estimated_seconds = input
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| summary.planned as f64 / r);

    write_lines(&events_path(&input.out), events.iter())?;
    write_lines(
        &deletions_path(&input.out),
        deleted.iter().map(|id| serde_json::json!({ "id": id })),
    )?;
    write_lines(
        &ids_path(&input.out),
        products
            .keys()
            .map(|id| serde_json::Value::from(id.as_str())),
    )?;
    // Published before the plan counts as complete: a plan that died on
    // the way is planned (and published) again, never kept unpublished.
    if let Some(publish) = publish {
        publish_into(&mut summary, publish, &events)?;
    }
    write_summary(&input.out, &summary)?;
    Ok((summary, true))
}

/// Publishes `events` and records how many, and where they ended.
fn publish_into(
    summary: &mut PlanSummary,
    publish: Publish,
    events: &[serde_json::Value],
) -> anyhow::Result<()> {
    let (n, ends) = publish(events)?;
    summary.published = Some(n);
    summary.published_ends = ends;
    Ok(())
}

/// Writes `plan.json`: the mark of a complete plan.
fn write_summary(night: &Path, summary: &PlanSummary) -> anyhow::Result<()> {
    write_atomic(&summary_path(night), |f| {
        serde_json::to_writer_pretty(&mut *f, summary)?;
        f.write_all(b"\n")?;
        Ok(())
    })
}

fn write_lines<T: Serialize>(path: &Path, lines: impl Iterator<Item = T>) -> anyhow::Result<()> {
    write_atomic(path, |f| {
        for l in lines {
            serde_json::to_writer(&mut *f, &l)?;
            f.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// Writes `path` through a temporary file renamed into place.
pub(crate) fn write_atomic(
    path: &Path,
    body: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    body(&mut w).with_context(|| format!("writing {}", tmp.display()))?;
    let file = w.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// Reads `catalog-ids.jsonl`.
pub fn read_ids(night: &Path) -> anyhow::Result<std::collections::HashSet<String>> {
    use std::io::BufRead;
    let path = ids_path(night);
    let f = std::fs::File::open(&path).with_context(|| {
        format!(
            "{}: no plan in {} (run `clipstream plan` first)",
            path.display(),
            night.display()
        )
    })?;
    let mut ids = std::collections::HashSet::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        let id: String = serde_json::from_str(&line)
            .with_context(|| format!("{}: {line:?} is not a JSON string", path.display()))?;
        ids.insert(id);
    }
    Ok(ids)
}

fn read_events(path: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    use std::io::BufRead;
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    std::io::BufReader::new(f)
        .lines()
        .map(|l| Ok(serde_json::from_str(&l?)?))
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| format!("reading {}", path.display()))
}
