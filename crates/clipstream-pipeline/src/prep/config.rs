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
}

impl ImageConfig {
    pub(crate) fn check(&self, p: &mut crate::config::file::Problems) {
        if self.limits.max_pixels == 0 || self.limits.max_bytes == 0 {
            p.bad("image", "`max_pixels` and `max_bytes` must be positive");
        }
    }
}
