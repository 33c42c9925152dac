//! `[image]`: decoding limits and options.

use clipstream_model::DecodeLimits;
use serde::{Deserialize, Serialize};

/// `[image]`: decoding limits and options.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Byte and pixel limits (`max_bytes`, `max_pixels`).
    #[serde(default, flatten)]
    pub limits: DecodeLimits,
    /// Apply EXIF orientation (transformers does not). Default false.
    #[serde(default)]
    pub apply_exif_orientation: bool,
    /// `exact` (default: bit-identical to transformers) or `fast` (large
    /// JPEGs decoded at a reduced DCT scale; several times less CPU on big
    /// photos, embeddings within a small cosine distance of exact).
    #[serde(default)]
    pub mode: clipstream_model::preprocess::ImageMode,
    /// What the vision tower is given: `float` (default: rescaled,
    /// normalised pixels, written by the host) or `uint8` (the resized,
    /// cropped bytes; a graph edit at load time makes the tower rescale and
    /// normalise them itself, with the same table, so embeddings are bit
    /// for bit the same: a quarter of the bytes per image; meant for GPUs,
    /// as on a CPU the tower's mapping costs more than the host's).
    #[serde(default)]
    pub model_input: clipstream_model::encoder::PixelInput,
}

impl ImageConfig {
    pub(crate) fn check(&self, p: &mut crate::config::file::Problems) {
        if self.limits.max_pixels == 0 || self.limits.max_bytes == 0 {
            p.bad("image", "`max_pixels` and `max_bytes` must be positive");
        }
    }
}
