//! Synthetic photos for the benchmarks: smooth colour fields, a shape and
//! sensor-like noise, so that JPEG entropy is that of a photo rather than of
//! a flat image. Written once into a folder and reused.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// The host-cost corpus, in three folders: what catalog images look like.
pub struct Corpus {
    /// 640x480 baseline JPEGs, 4:2:0, quality 85-92.
    pub jpeg_small: Vec<PathBuf>,
    /// 1600x1200 baseline JPEGs, 4:2:0, quality 85-92.
    pub jpeg_large: Vec<PathBuf>,
    /// 640x480 PNGs.
    pub png: Vec<PathBuf>,
}

impl Corpus {
    /// Every file, in the proportions of the corpus.
    pub fn all(&self) -> Vec<PathBuf> {
        [&self.jpeg_small, &self.jpeg_large, &self.png]
            .into_iter()
            .flatten()
            .cloned()
            .collect()
    }
}

/// Lists the corpus under `dir`, writing whatever part is missing first.
pub fn ensure(dir: &Path) -> anyhow::Result<Corpus> {
    let part = |name: &str, n: usize, w: usize, h: usize, png: bool| -> anyhow::Result<_> {
        let sub = dir.join(name);
        let have = super::common::list_images(&sub);
        if !have.is_empty() {
            return Ok(have);
        }
        eprintln!("writing {n} {w}x{h} images into {}", sub.display());
        std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
        let mut rand = super::common::xorshift(0x9E37_79B9_7F4A_7C15 ^ (w * 31 + h) as u64);
        for k in 0..n {
            let rgb = photo(w, h, &mut rand);
            let (bytes, ext) = if png {
                (encode_png(&rgb, w, h)?, "png")
            } else {
                (
                    encode_jpeg(&rgb, w, h, 85.0 + (k % 8) as f32, false)?,
                    "jpg",
                )
            };
            std::fs::write(sub.join(format!("{name}-{k:03}.{ext}")), bytes)?;
        }
        Ok(super::common::list_images(&sub))
    };
    Ok(Corpus {
        jpeg_small: part("jpeg-640x480", 48, 640, 480, false)?,
        jpeg_large: part("jpeg-1600x1200", 12, 1600, 1200, false)?,
        png: part("png-640x480", 4, 640, 480, true)?,
    })
}

/// One synthetic photo, RGB, `w * h * 3` bytes.
pub fn photo(w: usize, h: usize, rand: &mut impl FnMut() -> u64) -> Vec<u8> {
    let mut rgb = vec![0u8; w * h * 3];
    // Frequencies scale with the image, so a large photo is the same scene
    // at a higher resolution, not a busier one.
    let s = w as f32 / 640.0;
    let (fx, fy, phase) = (
        s * (20.0 + (rand() % 40) as f32),
        s * (20.0 + (rand() % 40) as f32),
        (rand() % 628) as f32 / 100.0,
    );
    let (cx, cy, r) = (
        (rand() % w as u64) as f32,
        (rand() % h as u64) as f32,
        s * (40.0 + (rand() % 120) as f32),
    );
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f32, y as f32);
            let inside = (xf - cx).powi(2) + (yf - cy).powi(2) < r * r;
            let base = [
                128.0 + 90.0 * (xf / fx + phase).sin(),
                128.0 + 80.0 * (yf / fy).cos() * (xf / (57.0 * s)).sin(),
                255.0 * xf / w as f32,
            ];
            for (c, b) in base.iter().enumerate() {
                let noise = (rand() % 41) as f32 - 20.0;
                let v = if inside { 230.0 - 60.0 * c as f32 } else { *b } + noise;
                rgb[(y * w + x) * 3 + c] = v.clamp(0.0, 255.0) as u8;
            }
        }
    }
    rgb
}

/// Encodes RGB as JPEG (4:2:0). `progressive: false` writes a baseline
/// JPEG like most cameras and image libraries do by default.
pub fn encode_jpeg(
    rgb: &[u8],
    w: usize,
    h: usize,
    quality: f32,
    progressive: bool,
) -> anyhow::Result<Vec<u8>> {
    std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        let mut comp = mozjpeg::Compress::new(mozjpeg::ColorSpace::JCS_RGB);
        if !progressive {
            comp.set_fastest_defaults();
        }
        comp.set_size(w, h);
        comp.set_quality(quality);
        let mut started = comp.start_compress(Vec::new())?;
        started.write_scanlines(rgb)?;
        started.finish()
    })
    .map_err(|_| anyhow::anyhow!("JPEG encoder failed"))?
    .context("encoding a JPEG")
}

fn encode_png(rgb: &[u8], w: usize, h: usize) -> anyhow::Result<Vec<u8>> {
    let img =
        image::RgbImage::from_raw(w as u32, h as u32, rgb.to_vec()).context("PNG buffer size")?;
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)
        .context("encoding a PNG")?;
    Ok(out.into_inner())
}
