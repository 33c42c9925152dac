//! `CLIPImageProcessor`, reproduced: decode → RGB → shortest-edge resize
//! (Pillow bicubic) → center crop (with zero padding) → rescale → normalise,
//! every parameter read from `preprocessor_config.json`.
//!
//! The arithmetic follows `transformers` (PIL backend) exactly: `rescale`
//! multiplies in float64 and rounds to float32, `normalize` subtracts and
//! divides in float32. Output is channel-first float32, `[3, H, W]`.

pub mod buffers;
pub mod config;
pub mod decode;
pub mod resample;

use serde::{Deserialize, Serialize};

pub use config::{OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessorConfig, ResizeTarget};
pub use decode::{DecodeLimits, Decoded};
pub use resample::{Filter, Image8};

use crate::error::ImageError;

/// Exact or fast preprocessing (`[image] mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageMode {
    /// Bit-identical to transformers' `CLIPImageProcessor` (PIL backend):
    /// every JPEG is decoded at full size. The default.
    #[default]
    Exact,
    /// Large JPEGs are decoded at a reduced DCT scale (1/2, 1/4 or 1/8)
    /// whenever the result still has at least as many pixels as the resize
    /// target, then resized as in exact mode. Several times faster on big
    /// photos; embeddings stay within a small cosine distance of exact
    /// mode (see the README's Performance section), but are not identical.
    Fast,
}

impl ImageMode {
    /// What this mode adds to a model's fingerprint (fast mode's
    /// embeddings differ slightly from exact mode's).
    pub fn fingerprint_suffix(self) -> &'static str {
        match self {
            ImageMode::Exact => "",
            ImageMode::Fast => "+fast",
        }
    }
}

impl std::str::FromStr for ImageMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "exact" => Ok(ImageMode::Exact),
            "fast" => Ok(ImageMode::Fast),
            _ => Err(format!("unknown image mode {s:?}: use exact or fast")),
        }
    }
}

/// Decodes and preprocesses images for one model.
#[derive(Debug, Clone)]
pub struct ImagePreprocessor {
    /// The model's preprocessing parameters.
    pub config: PreprocessorConfig,
    /// Input limits.
    pub limits: DecodeLimits,
    /// Apply EXIF orientation before resizing (transformers does not).
    pub apply_exif_orientation: bool,
    /// Exact (default) or fast decoding.
    pub mode: ImageMode,
}

impl ImagePreprocessor {
    /// A preprocessor with default limits and transformers' behaviour.
    pub fn new(config: PreprocessorConfig) -> Self {
        ImagePreprocessor {
            config,
            limits: DecodeLimits::default(),
            apply_exif_orientation: false,
            mode: ImageMode::Exact,
        }
    }

    /// Number of floats one image takes (`3 * H * W`).
    pub fn pixels_len(&self) -> usize {
        let (h, w) = self.config.output_size();
        3 * h * w
    }

    /// Decodes image bytes to RGB (with the configured limits and
    /// orientation). In fast mode the pixels may be a reduced JPEG decode:
    /// preprocess them with [`ImagePreprocessor::pixel_values_sized`] and
    /// the decoded `full_size`, not `pixel_values_into`.
    pub fn decode(&self, bytes: &[u8]) -> Result<Decoded, ImageError> {
        match self.mode {
            ImageMode::Exact => decode::decode(bytes, &self.limits, self.apply_exif_orientation),
            ImageMode::Fast => {
                decode::decode_reduced(bytes, &self.limits, self.apply_exif_orientation, &|w, h| {
                    self.pixels_needed(w, h)
                })
            }
        }
    }

    /// The smallest `(width, height)` a decoded image of full size `(w, h)`
    /// may have without losing pixels that the resize reads at full
    /// resolution: the resize target. `None`: full size is needed.
    fn pixels_needed(&self, w: usize, h: usize) -> Option<(usize, usize)> {
        let c = &self.config;
        if !c.do_resize {
            return None;
        }
        let (rh, rw) = c.resized_size(h, w);
        match c.size {
            // Fixed output shapes do not follow the aspect ratio: cover
            // both ways round, as an EXIF quarter turn may come after.
            ResizeTarget::Exact { .. } if self.apply_exif_orientation => {
                let m = rh.max(rw);
                Some((m, m))
            }
            _ => Some((rw, rh)),
        }
    }

    /// Decodes and preprocesses `bytes` into `out` (`pixels_len()` floats).
    ///
    /// A panic anywhere in a decoder or in preprocessing is this input's
    /// fault as far as the caller is concerned: it comes back as
    /// [`ImageError::Corrupt`], so one file never takes a worker down.
    pub fn preprocess_into(&self, bytes: &[u8], out: &mut [f32]) -> Result<(), ImageError> {
        self.guarded(bytes, |decoded| {
            self.pixel_values_sized(&decoded.rgb, decoded.full_size, out)
        })
    }

    /// Decodes `bytes` and runs `then` on the image, a panic in either
    /// being this input's [`ImageError::Corrupt`].
    fn guarded(
        &self,
        bytes: &[u8],
        then: impl FnOnce(&Decoded) -> Result<(), ImageError>,
    ) -> Result<(), ImageError> {
        let run = std::panic::AssertUnwindSafe(|| {
            let decoded = self.decode(bytes)?;
            let done = then(&decoded);
            buffers::give_bytes(decoded.rgb.data);
            done
        });
        match std::panic::catch_unwind(run) {
            Ok(r) => r,
            Err(panic) => Err(ImageError::Corrupt {
                format: image::guess_format(bytes)
                    .map(decode::format_name)
                    .unwrap_or("image"),
                reason: format!(
                    "the decoder failed: {}",
                    decode::panic_message(panic.as_ref())
                ),
            }),
        }
    }

    /// Decodes and preprocesses `bytes` into a new `[3, H, W]` buffer.
    /// The buffer comes from [`buffers::pixels`]: hand it to
    /// [`buffers::give_pixels`] when done with it, to spare the allocator.
    pub fn preprocess(&self, bytes: &[u8]) -> Result<Vec<f32>, ImageError> {
        let mut out = buffers::pixels(self.pixels_len());
        match self.preprocess_into(bytes, &mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                buffers::give_pixels(out);
                Err(e)
            }
        }
    }

    /// Decodes `bytes` into a new `[3, H, W]` byte buffer for a tower with a
    /// uint8 input; the buffer comes from [`buffers::pixel_bytes`]: hand it
    /// to [`buffers::give_pixel_bytes`] when done with it.
    pub fn preprocess_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>, ImageError> {
        let mut out = buffers::pixel_bytes(self.pixels_len());
        match self.preprocess_bytes_into(bytes, &mut out) {
            Ok(()) => Ok(out),
            Err(e) => {
                buffers::give_pixel_bytes(out);
                Err(e)
            }
        }
    }

    /// Resize, crop, rescale and normalise an RGB image into `out`.
    ///
    /// Only the pixels that survive the crop are resized (see
    /// [`resample::resize_window`]): the work is bounded by the model's
    /// input size whatever the image's aspect ratio, and the values are
    /// those of resizing everything and cropping afterwards.
    pub fn pixel_values_into(&self, rgb: &Image8, out: &mut [f32]) -> Result<(), ImageError> {
        self.pixel_values_sized(rgb, (rgb.width, rgb.height), out)
    }

    /// [`ImagePreprocessor::pixel_values_into`] for an image decoded at a
    /// reduced scale: the resize target and crop come from its full size
    /// `(width, height)`, the pixels from `rgb`.
    pub fn pixel_values_sized(
        &self,
        rgb: &Image8,
        full_size: (usize, usize),
        out: &mut [f32],
    ) -> Result<(), ImageError> {
        let lut = self.lut();
        self.fill_sized(rgb, full_size, out, |ch, byte| lut[ch][byte as usize])
    }

    /// The value each byte of each channel becomes: rescaled, then
    /// normalised, with transformers' arithmetic (the rescale in float64
    /// rounded to float32, the normalisation in float32).
    pub fn lut(&self) -> [[f32; 256]; 3] {
        let c = &self.config;
        let mut lut = [[0f32; 256]; 3];
        for (ch, table) in lut.iter_mut().enumerate() {
            for (v, slot) in table.iter_mut().enumerate() {
                let mut x = if c.do_rescale {
                    (v as f64 * c.rescale_factor) as f32
                } else {
                    v as f32
                };
                if c.do_normalize {
                    x = (x - c.image_mean[ch] as f32) / c.image_std[ch] as f32;
                }
                *slot = x;
            }
        }
        lut
    }

    /// [`ImagePreprocessor::pixel_values_sized`] without the rescale and
    /// the normalisation: the resized, cropped bytes, `[3, H, W]`, for a
    /// tower that maps them itself ([`crate::onnx_edit`]); padding is 0,
    /// whose value the tower maps as the float path writes it.
    pub fn pixel_bytes_sized(
        &self,
        rgb: &Image8,
        full_size: (usize, usize),
        out: &mut [u8],
    ) -> Result<(), ImageError> {
        self.fill_sized(rgb, full_size, out, |_, byte| byte)
    }

    /// Decodes `bytes` and writes its resized, cropped bytes into `out`
    /// (`pixels_len()` bytes); see [`ImagePreprocessor::preprocess_into`].
    pub fn preprocess_bytes_into(&self, bytes: &[u8], out: &mut [u8]) -> Result<(), ImageError> {
        self.guarded(bytes, |decoded| {
            self.pixel_bytes_sized(&decoded.rgb, decoded.full_size, out)
        })
    }

    /// Resize and crop into `out`, each byte of channel `ch` written as
    /// `value(ch, byte)`.
    fn fill_sized<T: Copy>(
        &self,
        rgb: &Image8,
        full_size: (usize, usize),
        out: &mut [T],
        value: impl Fn(usize, u8) -> T,
    ) -> Result<(), ImageError> {
        let c = &self.config;
        let (h, w) = if c.do_resize {
            let (h, w) = c.resized_size(full_size.1, full_size.0);
            (h.max(1), w.max(1))
        } else {
            (rgb.height, rgb.width)
        };
        // Output pixel (y, x) is pixel (y + top, x + left) of the resized
        // image, black where that falls outside (transformers' center_crop
        // pads with zeros).
        let ((oh, ow), (top, left)) = if c.do_center_crop {
            let (ch, cw) = c.crop_size;
            (
                (ch, cw),
                (
                    (h as i64 - ch as i64).div_euclid(2),
                    (w as i64 - cw as i64).div_euclid(2),
                ),
            )
        } else {
            ((h, w), (0, 0))
        };
        if (oh, ow) != c.output_size() {
            // Only without resizing and without cropping: the image itself
            // must have the model's input size.
            let (eh, ew) = c.output_size();
            return Err(ImageError::Unsupported {
                format: "image",
                reason: format!(
                    "{}x{} pixels, and this model's preprocessing neither resizes nor crops: it needs {ew}x{eh}",
                    rgb.width, rgb.height
                ),
            });
        }
        let span = |offset: i64, len: usize, size: usize| {
            let start = offset.clamp(0, size as i64) as usize;
            let end = (offset + len as i64).clamp(0, size as i64) as usize;
            start..end.max(start)
        };
        let window = resample::Window {
            x: span(left, ow, w),
            y: span(top, oh, h),
        };
        let img = if c.do_resize {
            resample::resize_window(rgb, w, h, c.resample, &window)
        } else {
            resample::resize_window(rgb, rgb.width, rgb.height, c.resample, &window)
        };
        let plane = oh * ow;
        if out.len() != 3 * plane {
            return Err(ImageError::Unsupported {
                format: "image",
                reason: format!(
                    "output buffer of {} floats for {ow}x{oh} pixels (a caller bug)",
                    out.len()
                ),
            });
        }
        // Where the window starts in the output.
        let (wy, wx) = (
            (window.y.start as i64 - top) as usize,
            (window.x.start as i64 - left) as usize,
        );
        // One lookup table per channel: the value depends only on the byte.
        for ch in 0..3 {
            let mut lut = [value(ch, 0); 256];
            for (v, slot) in lut.iter_mut().enumerate() {
                *slot = value(ch, v as u8);
            }
            let dst = &mut out[ch * plane..(ch + 1) * plane];
            if img.width != ow || img.height != oh {
                dst.fill(lut[0]);
            }
            for (r, src_row) in img.data.chunks_exact((img.width * 3).max(1)).enumerate() {
                let d = &mut dst[(wy + r) * ow + wx..(wy + r) * ow + wx + img.width];
                for (d, px) in d.iter_mut().zip(src_row.chunks_exact(3)) {
                    *d = lut[px[ch] as usize];
                }
            }
        }
        buffers::give_bytes(img.data);
        Ok(())
    }
}

/// transformers' `center_crop`: offsets `(size - crop) // 2` (floor), and
/// zero padding (centred, extra row/column at the start) where the image is
/// smaller than the crop.
pub fn center_crop(img: &Image8, crop_h: usize, crop_w: usize) -> Image8 {
    let (h, w, c) = (img.height as i64, img.width as i64, img.channels);
    let (ch, cw) = (crop_h as i64, crop_w as i64);
    let top = (h - ch).div_euclid(2);
    let left = (w - cw).div_euclid(2);
    // Padding: the image sits at (top_pad, left_pad) in a canvas of
    // max(crop, size); then the crop window is shifted by the same amounts.
    let new_h = ch.max(h);
    let new_w = cw.max(w);
    let top_pad = (new_h - h + 1) / 2;
    let left_pad = (new_w - w + 1) / 2;
    let (top, left) = if top >= 0 && left >= 0 && top + ch <= h && left + cw <= w {
        (top, left)
    } else {
        (top + top_pad, left + left_pad)
    };
    let (off_y, off_x) = if top >= 0 && left >= 0 && top + ch <= h && left + cw <= w {
        (0, 0)
    } else {
        (top_pad, left_pad)
    };
    let mut out = vec![0u8; crop_h * crop_w * c];
    for y in 0..ch {
        // Row in canvas coordinates, then in image coordinates.
        let sy = top + y - off_y;
        if sy < 0 || sy >= h {
            continue;
        }
        for x in 0..cw {
            let sx = left + x - off_x;
            if sx < 0 || sx >= w {
                continue;
            }
            let s = ((sy * w + sx) as usize) * c;
            let d = ((y * cw + x) as usize) * c;
            out[d..d + c].copy_from_slice(&img.data[s..s + c]);
        }
    }
    Image8::new(crop_w, crop_h, c, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The old path: resize the whole image, crop, normalise.
    fn reference(pre: &ImagePreprocessor, rgb: &Image8) -> Vec<f32> {
        let c = &pre.config;
        let (h, w) = c.resized_size(rgb.height, rgb.width);
        let resized = resample::resize(rgb, w.max(1), h.max(1), c.resample);
        let cropped = center_crop(&resized, c.crop_size.0, c.crop_size.1);
        let plane = cropped.width * cropped.height;
        let mut out = vec![0f32; 3 * plane];
        for ch in 0..3 {
            for (i, px) in cropped.data.chunks_exact(3).enumerate() {
                let x = (px[ch] as f64 * c.rescale_factor) as f32;
                out[ch * plane + i] = (x - c.image_mean[ch] as f32) / c.image_std[ch] as f32;
            }
        }
        out
    }

    fn small_config(short: usize, crop: (usize, usize), resample: Filter) -> PreprocessorConfig {
        PreprocessorConfig {
            size: ResizeTarget::ShortestEdge {
                shortest: short,
                longest: None,
            },
            crop_size: crop,
            resample,
            ..PreprocessorConfig::default()
        }
    }

    proptest::proptest! {
        /// Resizing only the cropped window gives exactly the values of
        /// resizing everything and cropping afterwards, for any image size,
        /// any crop (larger than the image too: zero padding) and filter.
        #[test]
        fn windowed_resize_equals_resize_then_crop(
            w in 1usize..70, h in 1usize..70,
            short in 1usize..40, ch in 1usize..45, cw in 1usize..45,
            filter in 0i64..6, seed in proptest::prelude::any::<u64>(),
        ) {
            let mut x = seed | 1;
            let data: Vec<u8> = (0..w * h * 3).map(|_| { x ^= x << 13; x ^= x >> 7; x ^= x << 17; x as u8 }).collect();
            let rgb = Image8::new(w, h, 3, data);
            let filter = Filter::from_pil_code(filter).expect("filter");
            let pre = ImagePreprocessor::new(small_config(short, (ch, cw), filter));
            let mut out = vec![0f32; pre.pixels_len()];
            pre.pixel_values_into(&rgb, &mut out).expect("preprocess");
            proptest::prop_assert_eq!(out, reference(&pre, &rgb));
        }
    }

    /// A 274-byte PNG of 1×100,000 pixels is under any sane pixel limit, but
    /// resizing it whole means 224×22,400,000 pixels (15 GB). Only the crop
    /// is computed now: it succeeds, quickly, with transformers' values.
    #[test]
    fn extreme_aspect_ratios_cost_only_the_crop() {
        let pre = ImagePreprocessor::new(PreprocessorConfig::default());
        for (w, h) in [
            (1usize, 100_000usize),
            (100_000, 1),
            (3, 40_000),
            (40_000, 2),
        ] {
            let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
            let rgb = Image8::new(w, h, 3, data);
            let started = std::time::Instant::now();
            let mut out = vec![0f32; pre.pixels_len()];
            pre.pixel_values_into(&rgb, &mut out).expect("preprocess");
            assert!(
                started.elapsed() < std::time::Duration::from_secs(5),
                "{w}x{h} took {:?}",
                started.elapsed()
            );
            assert!(out.iter().all(|v| v.is_finite()));
        }
        // Against the whole resize where that is still affordable.
        let pre = ImagePreprocessor::new(small_config(30, (30, 30), Filter::Bicubic));
        for (w, h) in [(1usize, 5_000usize), (5_000, 1), (2, 3_001)] {
            let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 13 % 256) as u8).collect();
            let rgb = Image8::new(w, h, 3, data);
            let mut out = vec![0f32; pre.pixels_len()];
            pre.pixel_values_into(&rgb, &mut out).expect("preprocess");
            assert_eq!(out, reference(&pre, &rgb), "{w}x{h}");
        }
    }

    #[test]
    fn an_image_of_the_wrong_size_without_resize_or_crop_is_an_error() {
        let cfg = PreprocessorConfig::from_json_str(
            r#"{"do_resize": false, "do_center_crop": false, "size": {"height": 4, "width": 4}}"#,
        )
        .expect("valid");
        let pre = ImagePreprocessor::new(cfg);
        let mut out = vec![0f32; pre.pixels_len()];
        let rgb = Image8::new(5, 4, 3, vec![9; 60]);
        let e = pre
            .pixel_values_into(&rgb, &mut out)
            .expect_err("5x4 is not 4x4");
        assert_eq!(e.kind(), "unsupported_image");
        let rgb = Image8::new(4, 4, 3, vec![9; 48]);
        pre.pixel_values_into(&rgb, &mut out).expect("4x4");
    }

    #[test]
    fn resized_size_truncates_the_long_side() {
        let c = PreprocessorConfig::default();
        assert_eq!(c.resized_size(480, 640), (224, 298)); // 224*640/480 = 298.67
        assert_eq!(c.resized_size(640, 480), (298, 224));
        assert_eq!(c.resized_size(700, 2), (78400, 224));
        assert_eq!(c.resized_size(224, 224), (224, 224));
        assert_eq!(c.resized_size(1, 1), (224, 224));
    }

    #[test]
    fn legacy_integer_sizes_parse() {
        let c =
            PreprocessorConfig::from_json_str(r#"{"size": 224, "crop_size": 224}"#).expect("valid");
        assert_eq!(
            c.size,
            ResizeTarget::ShortestEdge {
                shortest: 224,
                longest: None
            }
        );
        assert_eq!(c.crop_size, (224, 224));
        assert!(PreprocessorConfig::from_json_str(r#"{"resample": 9}"#).is_err());
        assert!(PreprocessorConfig::from_json_str(r#"{"do_convert_rgb": false}"#).is_err());
    }

    #[test]
    fn center_crop_takes_floor_offsets() {
        // 5 wide, crop 2: offset (5-2)//2 = 1.
        let img = Image8::new(5, 1, 1, vec![0, 1, 2, 3, 4]);
        assert_eq!(center_crop(&img, 1, 2).data, vec![1, 2]);
    }

    #[test]
    fn center_crop_pads_small_images_like_transformers() {
        // transformers.image_transforms.center_crop gives [0 1 2 3] and
        // [0 0 1 2 0]: the image sits at ceil((canvas - size) / 2).
        let img = Image8::new(3, 1, 1, vec![1, 2, 3]);
        assert_eq!(center_crop(&img, 1, 4).data, vec![0, 1, 2, 3]);
        let img = Image8::new(2, 1, 1, vec![1, 2]);
        assert_eq!(center_crop(&img, 1, 5).data, vec![0, 0, 1, 2, 0]);
    }
}
