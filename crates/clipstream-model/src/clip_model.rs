//! A whole model: preprocessing, tokenizer and both towers, loaded from a
//! model directory.

use std::path::Path;

use crate::embedding::EmbeddingBatch;
use crate::encoder::{PixelInput, PixelsMut, TextEncoder, VisionEncoder};
use crate::error::{ImageError, ModelError};
use crate::model_dir::{ModelDir, Tower as TowerKind, Variant};
use crate::preprocess::{ImagePreprocessor, PreprocessorConfig};
use crate::runtime::RuntimeOptions;
use crate::tokenize::ClipTokenizer;

/// A whole model: preprocessing, tokenizer and both towers.
#[derive(Debug)]
pub struct ClipModel {
    /// Where it came from.
    pub dir: ModelDir,
    /// Which export of the towers.
    pub variant: Variant,
    /// Image preprocessing.
    pub preprocessor: ImagePreprocessor,
    /// Tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Image tower.
    pub vision: VisionEncoder,
    /// Text tower.
    pub text: TextEncoder,
}

impl ClipModel {
    /// Loads a model directory.
    pub fn load(
        root: impl AsRef<Path>,
        variant: &Variant,
        options: &RuntimeOptions,
    ) -> Result<Self, ModelError> {
        Self::load_with(root, variant, options, PixelInput::Float)
    }

    /// Loads a model directory, its vision tower taking `pixels`.
    pub fn load_with(
        root: impl AsRef<Path>,
        variant: &Variant,
        options: &RuntimeOptions,
        pixels: PixelInput,
    ) -> Result<Self, ModelError> {
        let dir = ModelDir::open(root)?;
        let preprocessor =
            ImagePreprocessor::new(PreprocessorConfig::from_file(&dir.preprocessor_config)?);
        let tokenizer = ClipTokenizer::from_model_dir(&dir)?;
        let path = dir.tower(TowerKind::Vision, variant)?;
        let vision = match pixels {
            PixelInput::Float => VisionEncoder::load(&path, options)?,
            PixelInput::Uint8 => VisionEncoder::load_uint8(&path, options, &preprocessor.lut())?,
        };
        let text = TextEncoder::load(&dir.tower(TowerKind::Text, variant)?, options)?;
        Ok(ClipModel {
            dir,
            variant: variant.clone(),
            preprocessor,
            tokenizer,
            vision,
            text,
        })
    }

    /// The id written into output rows.
    pub fn model_id(&self) -> String {
        self.dir.model_id(&self.variant)
    }

    /// What determines this model's image and text embeddings, as a hash:
    /// [`ModelDir::fingerprint`], with `+fast` when images are preprocessed
    /// in fast mode (its embeddings differ slightly from exact mode's).
    pub fn fingerprint(&self) -> Result<String, ModelError> {
        let base = self.dir.fingerprint(&self.variant)?;
        Ok(format!(
            "{base}{}",
            self.preprocessor.mode.fingerprint_suffix()
        ))
    }

    /// Embeds already decoded-and-preprocessed images: read in place on
    /// the CPU; on a GPU copied into the tower's pinned input buffer
    /// ([`VisionEncoder::embed_filled`]).
    pub fn embed_pixels(&mut self, pixels: &[f32], n: usize) -> Result<EmbeddingBatch, ModelError> {
        let size = self.preprocessor.config.output_size();
        if !self.vision.io_binding() {
            return self.vision.embed(pixels, n, size);
        }
        let per = self.preprocessor.pixels_len();
        if pixels.len() != n * per {
            return Err(ModelError::Ort(format!(
                "{} pixel values for {n} images of {per}",
                pixels.len()
            )));
        }
        self.vision.embed_filled(n, size, |buffer| match buffer {
            PixelsMut::Float(dst) => {
                dst.copy_from_slice(pixels);
                Ok(())
            }
            PixelsMut::Bytes(_) => Err(ModelError::Ort(
                "this vision tower takes bytes (embed_bytes), not floats".into(),
            )),
        })
    }

    /// Decodes, preprocesses and embeds one image's bytes, preprocessing
    /// straight into the tower's input buffer. Bad images are an
    /// `Ok(Err(..))`: the model is fine, the input is not.
    pub fn embed_image_bytes(
        &mut self,
        bytes: &[u8],
    ) -> Result<Result<Vec<f32>, ImageError>, ModelError> {
        let size = self.preprocessor.config.output_size();
        let pre = &self.preprocessor;
        let mut bad = None;
        let embedded = self.vision.embed_filled(1, size, |buffer| {
            match buffer {
                PixelsMut::Float(dst) => pre.preprocess_into(bytes, dst),
                PixelsMut::Bytes(dst) => pre.preprocess_bytes_into(bytes, dst),
            }
            .map_err(|e| {
                let why = ModelError::Ort(e.to_string());
                bad = Some(e);
                why
            })
        });
        match bad {
            Some(e) => Ok(Err(e)),
            None => Ok(Ok(embedded?.data)),
        }
    }

    /// Tokenizes and embeds texts.
    pub fn embed_texts<S: AsRef<str>>(
        &mut self,
        texts: &[S],
    ) -> Result<EmbeddingBatch, ModelError> {
        let tokens = self.tokenizer.encode_batch(texts)?;
        self.text.embed(&tokens)
    }
}
