//! The model commands: `embed`, `classify`, `preprocess` and `tokenize`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use clipstream_model::preprocess::PreprocessorConfig;
use clipstream_model::{
    ClipModel, ClipTokenizer, ImagePreprocessor, LabelSet, ModelDir, ZeroShotHead,
};
use serde::Serialize;

use super::load_model;
use crate::args::{ImageArgs, ModelArgs};

#[derive(Debug, Args)]
pub struct EmbedArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    /// An image file to embed (repeatable).
    #[arg(long = "image", value_name = "PATH")]
    pub image: Vec<PathBuf>,
    /// A text to embed (repeatable); any text, one that starts with a dash
    /// too.
    #[arg(long = "text", value_name = "STR", allow_hyphen_values = true)]
    pub text: Vec<String>,
    /// Inputs per ONNX Runtime call.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub batch_size: usize,
}

#[derive(Debug, Args)]
pub struct ClassifyArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    /// Label set (TOML): `classes = [...]`, `templates = ["a photo of a {}."]`,
    /// optional `logit_scale` (default 100).
    #[arg(long, value_name = "FILE.toml")]
    pub labels: PathBuf,
    /// Image files to classify.
    #[arg(long = "image", value_name = "PATH", required = true)]
    pub image: Vec<PathBuf>,
    /// Labels per image.
    #[arg(long, default_value_t = 5, value_name = "K")]
    pub top_k: usize,
    /// Images per ONNX Runtime call.
    #[arg(long, default_value_t = 16, value_name = "N")]
    pub batch_size: usize,
}

#[derive(Debug, Args)]
pub struct PreprocessArgs {
    /// Model directory (only preprocessor_config.json is read).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[command(flatten)]
    pub images: ImageArgs,
    /// Output .npy file.
    #[arg(long, value_name = "OUT.npy")]
    pub npy: PathBuf,
    /// Images, in output order.
    #[arg(value_name = "IMAGE", required = true)]
    pub files: Vec<PathBuf>,
}

#[derive(Debug, Args)]
pub struct TokenizeArgs {
    /// Model directory (tokenizer.json, tokenizer_config.json, config.json).
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    /// A text to tokenize (repeatable); any text, one that starts with a
    /// dash too.
    #[arg(
        long = "text",
        value_name = "STR",
        required = true,
        allow_hyphen_values = true
    )]
    pub text: Vec<String>,
}

/// One line of `embed`.
#[derive(Serialize)]
struct EmbedLine<'a> {
    input: &'a str,
    kind: &'static str,
    embedding: &'a [f32],
}

/// One line of `classify`.
#[derive(Serialize)]
struct ClassifyLine<'a> {
    input: &'a str,
    labels: Vec<clipstream_model::zero_shot::Label>,
}

/// One line of `tokenize`.
#[derive(Serialize)]
struct TokenizeLine<'a> {
    text: &'a str,
    input_ids: &'a [i64],
    attention_mask: &'a [i64],
}

fn write_line(out: &mut impl Write, line: &impl Serialize) -> anyhow::Result<()> {
    serde_json::to_writer(&mut *out, line)?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Counts failed inputs and reports each on stderr as one line.
#[derive(Default)]
pub(crate) struct Failures(pub(crate) usize);

impl Failures {
    pub(crate) fn report(&mut self, input: &str, why: impl std::fmt::Display) {
        self.0 += 1;
        eprintln!("error: {input}: {why}");
    }
    pub(crate) fn exit_code(&self) -> ExitCode {
        if self.0 == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        }
    }
}

/// Reads and preprocesses one image, appending its pixel values to
/// `pixels`; a failure is reported and leaves `pixels` as it was.
fn push_pixels(
    pre: &ImagePreprocessor,
    path: &Path,
    pixels: &mut Vec<f32>,
    failures: &mut Failures,
) -> bool {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            failures.report(&path.display().to_string(), e);
            return false;
        }
    };
    let start = pixels.len();
    pixels.resize(start + pre.pixels_len(), 0.0);
    match pre.preprocess_into(&bytes, &mut pixels[start..]) {
        Ok(()) => true,
        Err(e) => {
            pixels.truncate(start);
            failures.report(&path.display().to_string(), e);
            false
        }
    }
}

/// Reads and preprocesses images in batches of `batch_size`; calls `emit`
/// with the inputs of each batch and their embeddings.
pub(crate) fn for_each_image_batch(
    model: &mut ClipModel,
    paths: &[PathBuf],
    batch_size: usize,
    failures: &mut Failures,
    mut emit: impl FnMut(&[&Path], &clipstream_model::EmbeddingBatch) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let per_image = model.preprocessor.pixels_len();
    for chunk in paths.chunks(batch_size.max(1)) {
        let mut pixels = Vec::with_capacity(chunk.len() * per_image);
        let mut ok: Vec<&Path> = Vec::with_capacity(chunk.len());
        for path in chunk {
            if push_pixels(&model.preprocessor, path, &mut pixels, failures) {
                ok.push(path);
            }
        }
        if ok.is_empty() {
            continue;
        }
        let embeds = model.embed_pixels(&pixels, ok.len())?;
        emit(&ok, &embeds)?;
    }
    Ok(())
}

pub fn embed(args: EmbedArgs) -> anyhow::Result<ExitCode> {
    if args.image.is_empty() && args.text.is_empty() {
        anyhow::bail!("nothing to embed: give --image PATH and/or --text STR");
    }
    let mut model = load_model(&args.model, &args.images)?;
    let mut failures = Failures::default();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for_each_image_batch(
        &mut model,
        &args.image,
        args.batch_size,
        &mut failures,
        |paths, e| {
            for (path, row) in paths.iter().zip(e.rows()) {
                let input = path.display().to_string();
                write_line(
                    &mut out,
                    &EmbedLine {
                        input: &input,
                        kind: "image",
                        embedding: row,
                    },
                )?;
            }
            Ok(())
        },
    )?;
    for chunk in args.text.chunks(args.batch_size.max(1)) {
        let e = model.embed_texts(chunk)?;
        for (text, row) in chunk.iter().zip(e.rows()) {
            write_line(
                &mut out,
                &EmbedLine {
                    input: text,
                    kind: "text",
                    embedding: row,
                },
            )?;
        }
    }
    out.flush()?;
    Ok(failures.exit_code())
}

pub fn classify(args: ClassifyArgs) -> anyhow::Result<ExitCode> {
    let labels = LabelSet::from_file(&args.labels)?;
    let mut model = load_model(&args.model, &args.images)?;
    let head = ZeroShotHead::build(&labels, &mut model)?;
    let mut failures = Failures::default();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for_each_image_batch(
        &mut model,
        &args.image,
        args.batch_size,
        &mut failures,
        |paths, e| {
            for (path, row) in paths.iter().zip(e.rows()) {
                let input = path.display().to_string();
                write_line(
                    &mut out,
                    &ClassifyLine {
                        input: &input,
                        labels: head.top_k(row, args.top_k),
                    },
                )?;
            }
            Ok(())
        },
    )?;
    out.flush()?;
    Ok(failures.exit_code())
}

pub fn preprocess(args: PreprocessArgs) -> anyhow::Result<ExitCode> {
    let dir = ModelDir::open(&args.model)?;
    let mut pre = ImagePreprocessor::new(PreprocessorConfig::from_file(&dir.preprocessor_config)?);
    pre.limits = args.images.limits();
    pre.apply_exif_orientation = args.images.exif_orientation;
    pre.mode = args.images.image_mode;
    let per_image = pre.pixels_len();
    let mut failures = Failures::default();
    let mut data = Vec::with_capacity(per_image * args.files.len());
    for path in &args.files {
        push_pixels(&pre, path, &mut data, &mut failures);
    }
    let (h, w) = pre.config.output_size();
    let n = data.len() / per_image;
    let file = std::fs::File::create(&args.npy)
        .with_context(|| format!("cannot create {}", args.npy.display()))?;
    clipstream_model::npy::write_f32(std::io::BufWriter::new(file), &[n, 3, h, w], &data)
        .with_context(|| format!("cannot write {}", args.npy.display()))?;
    eprintln!(
        "wrote {n} images [{n}, 3, {h}, {w}] to {}",
        args.npy.display()
    );
    Ok(failures.exit_code())
}

pub fn tokenize(args: TokenizeArgs) -> anyhow::Result<ExitCode> {
    let dir = ModelDir::open(&args.model)?;
    let tokenizer = ClipTokenizer::from_model_dir(&dir)?;
    let batch = tokenizer.encode_batch(&args.text)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (i, text) in args.text.iter().enumerate() {
        let line = TokenizeLine {
            text,
            input_ids: batch.ids(i),
            attention_mask: batch.mask(i),
        };
        write_line(&mut out, &line)?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
