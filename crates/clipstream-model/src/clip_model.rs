//! A whole model: preprocessing, tokenizer and both towers, loaded from a
//! model directory.

use std::path::Path;

use crate::embedding::EmbeddingBatch;
use crate::encoder::{PixelInput, TextEncoder, VisionEncoder};
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

    /// Embeds already decoded-and-preprocessed images.
    pub fn embed_pixels(&mut self, pixels: &[f32], n: usize) -> Result<EmbeddingBatch, ModelError> {
        let size = self.preprocessor.config.output_size();
        self.vision.embed(pixels, n, size)
    }

    /// Decodes, preprocesses and embeds one image's bytes. Bad images are an
    /// `Ok(Err(..))`: the model is fine, the input is not.
    pub fn embed_image_bytes(
        &mut self,
        bytes: &[u8],
    ) -> Result<Result<Vec<f32>, ImageError>, ModelError> {
        let size = self.preprocessor.config.output_size();
        if self.vision.pixel_input() == PixelInput::Uint8 {
            let mut pixels = vec![0u8; self.preprocessor.pixels_len()];
            if let Err(e) = self.preprocessor.preprocess_bytes_into(bytes, &mut pixels) {
                return Ok(Err(e));
            }
            return Ok(Ok(self.vision.embed_bytes(&pixels, 1, size)?.data));
        }
        let pixels = match self.preprocessor.preprocess(bytes) {
            Ok(p) => p,
            Err(e) => return Ok(Err(e)),
        };
        let batch = self.embed_pixels(&pixels, 1)?;
        Ok(Ok(batch.data))
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
