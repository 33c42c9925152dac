//! The model's preprocessing parameters, read from
//! `preprocessor_config.json` the way transformers reads them (its
//! defaults, its aliases, its size forms).

use std::path::Path;

use serde::Deserialize;

use super::resample::Filter;
use crate::error::ModelError;

/// OpenAI CLIP's normalisation constants (transformers' `OPENAI_CLIP_MEAN` /
/// `OPENAI_CLIP_STD`), the defaults when a config omits them.
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// See [`OPENAI_CLIP_MEAN`].
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// How the image is resized before cropping (`size` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    /// `{"shortest_edge": N}` (optionally with `longest_edge`).
    ShortestEdge {
        /// Target of the short side.
        shortest: usize,
        /// Cap on the long side.
        longest: Option<usize>,
    },
    /// `{"height": H, "width": W}`: exact size, aspect not kept.
    Exact {
        /// Height.
        height: usize,
        /// Width.
        width: usize,
    },
}

/// The preprocessing parameters of a model.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessorConfig {
    /// `do_resize`.
    pub do_resize: bool,
    /// `size`.
    pub size: ResizeTarget,
    /// `resample` (Pillow code).
    pub resample: Filter,
    /// `do_center_crop`.
    pub do_center_crop: bool,
    /// `crop_size` as (height, width).
    pub crop_size: (usize, usize),
    /// `do_rescale`.
    pub do_rescale: bool,
    /// `rescale_factor`.
    pub rescale_factor: f64,
    /// `do_normalize`.
    pub do_normalize: bool,
    /// `image_mean`.
    pub image_mean: [f64; 3],
    /// `image_std`.
    pub image_std: [f64; 3],
    /// `do_convert_rgb` (must be true: the towers take 3 channels).
    pub do_convert_rgb: bool,
}

impl Default for PreprocessorConfig {
    /// `CLIPImageProcessor`'s class defaults.
    fn default() -> Self {
        PreprocessorConfig {
            do_resize: true,
            size: ResizeTarget::ShortestEdge {
                shortest: 224,
                longest: None,
            },
            resample: Filter::Bicubic,
            do_center_crop: true,
            crop_size: (224, 224),
            do_rescale: true,
            rescale_factor: 1.0 / 255.0,
            do_normalize: true,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
            do_convert_rgb: true,
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeJson {
    Int(usize),
    Dict {
        #[serde(default)]
        shortest_edge: Option<usize>,
        #[serde(default)]
        longest_edge: Option<usize>,
        #[serde(default)]
        height: Option<usize>,
        #[serde(default)]
        width: Option<usize>,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Channels {
    One(f64),
    Three([f64; 3]),
}

impl Channels {
    fn get(self) -> [f64; 3] {
        match self {
            Channels::One(v) => [v; 3],
            Channels::Three(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct ConfigJson {
    do_resize: Option<bool>,
    size: Option<SizeJson>,
    resample: Option<i64>,
    do_center_crop: Option<bool>,
    crop_size: Option<SizeJson>,
    do_rescale: Option<bool>,
    rescale_factor: Option<f64>,
    do_normalize: Option<bool>,
    image_mean: Option<Channels>,
    image_std: Option<Channels>,
    do_convert_rgb: Option<bool>,
}

impl PreprocessorConfig {
    /// Reads `preprocessor_config.json`. Missing keys take the
    /// `CLIPImageProcessor` defaults, as transformers does.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let json: ConfigJson = crate::model_dir::read_json(path)?;
        Self::from_json(json).map_err(|reason| ModelError::BadFile {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses the JSON text of a `preprocessor_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self, String> {
        let json: ConfigJson = serde_json::from_str(text).map_err(|e| e.to_string())?;
        Self::from_json(json)
    }

    fn from_json(j: ConfigJson) -> Result<Self, String> {
        let d = PreprocessorConfig::default();
        let size = match j.size {
            None => d.size,
            // Legacy integer `size` with default_to_square=False.
            Some(SizeJson::Int(n)) => ResizeTarget::ShortestEdge {
                shortest: n,
                longest: None,
            },
            Some(SizeJson::Dict {
                shortest_edge: Some(s),
                longest_edge,
                ..
            }) => ResizeTarget::ShortestEdge {
                shortest: s,
                longest: longest_edge,
            },
            Some(SizeJson::Dict {
                height: Some(height),
                width: Some(width),
                ..
            }) => ResizeTarget::Exact { height, width },
            Some(_) => {
                return Err(
                    "`size` must be an integer, {\"shortest_edge\"} or {\"height\", \"width\"}"
                        .into(),
                );
            }
        };
        let crop_size = match j.crop_size {
            None => d.crop_size,
            Some(SizeJson::Int(n)) => (n, n),
            Some(SizeJson::Dict {
                height: Some(h),
                width: Some(w),
                ..
            }) => (h, w),
            Some(_) => {
                return Err("`crop_size` must be an integer or {\"height\", \"width\"}".into());
            }
        };
        let resample = match j.resample {
            None => d.resample,
            Some(code) => Filter::from_pil_code(code)
                .ok_or_else(|| format!("`resample` {code} is not a Pillow filter (0-5)"))?,
        };
        let cfg = PreprocessorConfig {
            do_resize: j.do_resize.unwrap_or(d.do_resize),
            size,
            resample,
            do_center_crop: j.do_center_crop.unwrap_or(d.do_center_crop),
            crop_size,
            do_rescale: j.do_rescale.unwrap_or(d.do_rescale),
            rescale_factor: j.rescale_factor.unwrap_or(d.rescale_factor),
            do_normalize: j.do_normalize.unwrap_or(d.do_normalize),
            image_mean: j.image_mean.map(Channels::get).unwrap_or(d.image_mean),
            image_std: j.image_std.map(Channels::get).unwrap_or(d.image_std),
            do_convert_rgb: j.do_convert_rgb.unwrap_or(d.do_convert_rgb),
        };
        if !cfg.do_convert_rgb {
            return Err("`do_convert_rgb: false` is not supported: the towers take RGB".into());
        }
        if cfg.do_normalize && cfg.image_std.contains(&0.0) {
            return Err("`image_std` has a zero".into());
        }
        if !cfg.do_center_crop && !matches!(cfg.size, ResizeTarget::Exact { .. }) {
            return Err(
                "without center crop, `size` must be {\"height\", \"width\"} so that every image has the same shape"
                    .into(),
            );
        }
        Ok(cfg)
    }

    /// `(height, width)` of `pixel_values`.
    pub fn output_size(&self) -> (usize, usize) {
        if self.do_center_crop {
            self.crop_size
        } else {
            match self.size {
                ResizeTarget::Exact { height, width } => (height, width),
                ResizeTarget::ShortestEdge { shortest, .. } => (shortest, shortest),
            }
        }
    }

    /// The size an image of `(height, width)` is resized to: transformers'
    /// `get_resize_output_image_size` / `get_size_with_aspect_ratio`.
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.size {
            ResizeTarget::Exact { height, width } => (height, width),
            ResizeTarget::ShortestEdge {
                shortest,
                longest: None,
            } => {
                let (short, long) = if width <= height {
                    (width, height)
                } else {
                    (height, width)
                };
                // Python: int(size * long / short), a correctly rounded
                // float division, truncated.
                let new_long = ((shortest * long) as f64 / short as f64) as usize;
                if width <= height {
                    (new_long, shortest)
                } else {
                    (shortest, new_long)
                }
            }
            ResizeTarget::ShortestEdge {
                shortest,
                longest: Some(max_size),
            } => {
                let (h, w) = (height as f64, width as f64);
                let mut size = shortest as f64;
                let mut raw_size = None;
                let (min_o, max_o) = (h.min(w), h.max(w));
                if max_o / min_o * size > max_size as f64 {
                    let raw = max_size as f64 * min_o / max_o;
                    raw_size = Some(raw);
                    size = raw.round_ties_even();
                }
                let size_i = size as usize;
                if (height <= width && height == size_i) || (width <= height && width == size_i) {
                    (height, width)
                } else if width < height {
                    let oh = match raw_size {
                        Some(raw) => (raw * h / w) as usize,
                        None => (size * h / w) as usize,
                    };
                    (oh, size_i)
                } else {
                    let ow = match raw_size {
                        Some(raw) => (raw * w / h) as usize,
                        None => (size * w / h) as usize,
                    };
                    (size_i, ow)
                }
            }
        }
    }
}
