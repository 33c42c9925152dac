//! Image bytes → 8-bit RGB, converted the way `transformers` converts a
//! Pillow image (`convert_to_rgb`): transparency is composited onto white
//! with Pillow's integer `alpha_composite`, grayscale and palettes are
//! expanded, 16-bit samples are reduced as Pillow reduces them.
//!
//! JPEG goes through libjpeg-turbo's decoder (vendored by `mozjpeg`), the
//! decoder Pillow wheels ship, with the same settings (islow IDCT, fancy
//! upsampling): pure-Rust decoders differ by a few levels per pixel. Other
//! formats go through the `image` crate's decoders, which are exact for
//! lossless formats.

use std::io::Cursor;

use image::metadata::Orientation;
use image::{ColorType, ImageDecoder, ImageFormat};
use serde::{Deserialize, Serialize};

use super::resample::Image8;
use crate::error::ImageError;

/// Refuse inputs before they cost memory.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeLimits {
    /// Largest encoded image accepted, in bytes. Default 64 MiB.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: u64,
    /// Largest decoded image accepted, in pixels (width × height), checked
    /// from the header before decoding. Default 40,000,000 (Pillow warns at
    /// 89 M and fails at 179 M; 40 M is a 8000×5000 photo).
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

fn default_max_bytes() -> u64 {
    64 << 20
}
fn default_max_pixels() -> u64 {
    40_000_000
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_bytes: default_max_bytes(),
            max_pixels: default_max_pixels(),
        }
    }
}

impl DecodeLimits {
    fn check_pixels(&self, width: u64, height: u64) -> Result<(), ImageError> {
        if width == 0 || height == 0 {
            return Err(ImageError::Empty { width, height });
        }
        let pixels = width.saturating_mul(height);
        if pixels > self.max_pixels {
            return Err(ImageError::TooManyPixels {
                width,
                height,
                pixels,
                limit: self.max_pixels,
            });
        }
        Ok(())
    }
}

/// A decoded image, ready for resizing.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// 8-bit RGB, transparency composited onto white.
    pub rgb: Image8,
    /// `(width, height)` of the image at full scale, after orientation.
    /// The same as `rgb`'s size unless a JPEG was decoded at a reduced DCT
    /// scale ([`decode_reduced`]).
    pub full_size: (usize, usize),
    /// The container format.
    pub format: &'static str,
    /// The EXIF orientation found (not applied unless asked for).
    pub orientation: Option<u8>,
}

/// Decodes `bytes` to RGB. With `apply_exif_orientation`, the EXIF
/// orientation is applied as Pillow's `ImageOps.exif_transpose` does
/// (`transformers` itself does not apply it).
pub fn decode(
    bytes: &[u8],
    limits: &DecodeLimits,
    apply_exif_orientation: bool,
) -> Result<Decoded, ImageError> {
    decode_reduced(bytes, limits, apply_exif_orientation, &|_, _| None)
}

/// [`decode`], except that a JPEG may be decoded at a reduced DCT scale
/// (libjpeg-turbo's `scale_num / scale_denom`, 1/2, 1/4 or 1/8): `cover`
/// gets the image's full `(width, height)` and answers the smallest
/// `(width, height)` the decoded pixels must still have, or `None` for full
/// scale. Decoding a 1600x1200 photo at 1/4 costs a fraction of decoding
/// all of it, and the model's 224x224 input still comes from more pixels
/// than it has. Not bit-exact to a full decode (that is the trade).
pub fn decode_reduced(
    bytes: &[u8],
    limits: &DecodeLimits,
    apply_exif_orientation: bool,
    cover: &dyn Fn(usize, usize) -> Option<(usize, usize)>,
) -> Result<Decoded, ImageError> {
    if bytes.len() as u64 > limits.max_bytes {
        return Err(ImageError::TooManyBytes {
            bytes: bytes.len() as u64,
            limit: limits.max_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| {
        let head: String = bytes
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ");
        ImageError::UnknownFormat(if bytes.is_empty() {
            "empty input".to_string()
        } else {
            format!("unrecognised header bytes [{head}]")
        })
    })?;
    let mut decoded = match format {
        ImageFormat::Jpeg => decode_jpeg(bytes, limits, cover)?,
        ImageFormat::Png
        | ImageFormat::WebP
        | ImageFormat::Gif
        | ImageFormat::Bmp
        | ImageFormat::Tiff => decode_with_image(bytes, format, limits)?,
        other => {
            return Err(ImageError::UnknownFormat(format!(
                "{other:?} images are not supported"
            )));
        }
    };
    if apply_exif_orientation && let Some(o) = decoded.orientation.and_then(Orientation::from_exif)
    {
        decoded.rgb = orient(&decoded.rgb, o);
        if swaps_axes(o) {
            decoded.full_size = (decoded.full_size.1, decoded.full_size.0);
        }
    }
    Ok(decoded)
}

/// An image's width and height read from its header, without decoding it
/// (`None` when the header cannot be read: the decoder will say why).
pub fn dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    match image::guess_format(bytes).ok()? {
        ImageFormat::Jpeg => jpeg_dimensions(bytes),
        f @ (ImageFormat::Png
        | ImageFormat::WebP
        | ImageFormat::Gif
        | ImageFormat::Bmp
        | ImageFormat::Tiff) => image::ImageReader::with_format(Cursor::new(bytes), f)
            .into_dimensions()
            .ok(),
        _ => None,
    }
}

/// The size in a JPEG's start-of-frame marker.
fn jpeg_dimensions(b: &[u8]) -> Option<(u32, u32)> {
    let mut i = 2;
    while i + 4 <= b.len() {
        if b[i] != 0xFF {
            return None;
        }
        let marker = b[i + 1];
        if marker == 0xFF {
            i += 1;
            continue;
        }
        if matches!(marker, 0x01 | 0xD0..=0xD9) {
            i += 2;
            continue;
        }
        let len = usize::from(u16::from_be_bytes([b[i + 2], b[i + 3]]));
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            let h = u16::from_be_bytes([*b.get(i + 5)?, *b.get(i + 6)?]);
            let w = u16::from_be_bytes([*b.get(i + 7)?, *b.get(i + 8)?]);
            return Some((u32::from(w), u32::from(h)));
        }
        i += 2 + len;
    }
    None
}

pub(crate) fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Gif => "GIF",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        _ => "image",
    }
}

fn decode_with_image(
    bytes: &[u8],
    format: ImageFormat,
    limits: &DecodeLimits,
) -> Result<Decoded, ImageError> {
    let name = format_name(format);
    let corrupt = |e: image::ImageError| match e {
        image::ImageError::Unsupported(u) => ImageError::Unsupported {
            format: name,
            reason: u.to_string(),
        },
        image::ImageError::Limits(l) => ImageError::Unsupported {
            format: name,
            reason: l.to_string(),
        },
        other => ImageError::Corrupt {
            format: name,
            reason: other.to_string(),
        },
    };
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut image_limits = image::Limits::default();
    // Room for the largest allowed image at 16 bits × 4 channels.
    image_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(1 << 20));
    reader.limits(image_limits);
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    limits.check_pixels(u64::from(width), u64::from(height))?;
    let orientation = decoder.orientation().ok().map(Orientation::to_exif);
    let color = decoder.color_type();
    let mut buf = vec![0u8; decoder.total_bytes() as usize];
    decoder.read_image(&mut buf).map_err(corrupt)?;
    let (w, h) = (width as usize, height as usize);
    let rgb = match color {
        ColorType::Rgb8 => buf,
        ColorType::Rgba8 => buf.chunks_exact(4).flat_map(composite_on_white).collect(),
        ColorType::L8 => buf.iter().flat_map(|&v| [v, v, v]).collect(),
        ColorType::La8 => buf
            .chunks_exact(2)
            .flat_map(|p| composite_on_white(&[p[0], p[0], p[0], p[1]]))
            .collect(),
        // Pillow opens 16-bit grayscale as mode I;16, whose conversion to
        // RGB clips at 255 (it does not scale).
        ColorType::L16 => u16s(&buf)
            .map(|v| v.min(255) as u8)
            .flat_map(|v| [v, v, v])
            .collect(),
        // Pillow reads 16-bit RGB(A)/LA PNGs as 8-bit modes, keeping the
        // high byte of each sample.
        ColorType::La16 => u16s(&buf)
            .map(|v| (v >> 8) as u8)
            .collect::<Vec<_>>()
            .chunks_exact(2)
            .flat_map(|p| composite_on_white(&[p[0], p[0], p[0], p[1]]))
            .collect(),
        ColorType::Rgb16 => u16s(&buf).map(|v| (v >> 8) as u8).collect(),
        ColorType::Rgba16 => u16s(&buf)
            .map(|v| (v >> 8) as u8)
            .collect::<Vec<_>>()
            .chunks_exact(4)
            .flat_map(composite_on_white)
            .collect(),
        other => {
            return Err(ImageError::Unsupported {
                format: name,
                reason: format!("{other:?} pixels"),
            });
        }
    };
    Ok(Decoded {
        rgb: Image8::new(w, h, 3, rgb),
        full_size: (w, h),
        format: name,
        orientation,
    })
}

fn u16s(buf: &[u8]) -> impl Iterator<Item = u16> + '_ {
    buf.chunks_exact(2)
        .map(|b| u16::from_ne_bytes([b[0], b[1]]))
}

/// Pillow's `alpha_composite(white, src)` for one pixel (AlphaComposite.c,
/// integer path with 7 extra bits of precision).
#[inline]
fn composite_on_white(p: &[u8]) -> [u8; 3] {
    let a = u32::from(p[3]);
    if a == 0 {
        return [255, 255, 255];
    }
    const PRECISION_BITS: u32 = 7;
    let blend = 255 * (255 - a);
    let outa255 = a * 255 + blend;
    let coef1 = a * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let ch = |s: u8| {
        let tmp = u32::from(s) * coef1 + 255 * coef2 + (0x80 << PRECISION_BITS);
        (((tmp >> 8) + tmp) >> 8 >> PRECISION_BITS) as u8
    };
    [ch(p[0]), ch(p[1]), ch(p[2])]
}

type Cover<'a> = &'a dyn Fn(usize, usize) -> Option<(usize, usize)>;

fn decode_jpeg(bytes: &[u8], limits: &DecodeLimits, cover: Cover) -> Result<Decoded, ImageError> {
    // libjpeg pads a truncated stream with gray and only warns; Pillow fails
    // ("image file is truncated"). Require the end-of-image marker.
    if !bytes
        .windows(2)
        .rev()
        .take(1 << 16)
        .any(|w| w == [0xFF, 0xD9])
    {
        return Err(ImageError::Corrupt {
            format: "JPEG",
            reason: "truncated (no end-of-image marker)".into(),
        });
    }
    // A progressive JPEG may hold any number of scans, and libjpeg decodes
    // each over the whole image: a few kilobytes of scans cost minutes of
    // CPU. Real encoders write about ten; the count of SOS markers (FF DA
    // cannot occur inside entropy-coded data) is an upper bound.
    let scans = memchr::memmem::find_iter(bytes, &[0xFF, 0xDA]).count();
    if scans > MAX_JPEG_SCANS {
        return Err(ImageError::Unsupported {
            format: "JPEG",
            reason: format!("{scans} scans (the limit is {MAX_JPEG_SCANS})"),
        });
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_jpeg_inner(bytes, limits, cover)
    })) {
        Ok(r) => r,
        Err(panic) => Err(ImageError::Corrupt {
            format: "JPEG",
            reason: panic_message(panic.as_ref()),
        }),
    }
}

/// Most scans a JPEG may have (progressive JPEGs from real encoders have
/// about ten; libjpeg-turbo's own tools default to a limit of 500).
const MAX_JPEG_SCANS: usize = 500;

/// The message of a caught panic.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "decoder error".into())
}

fn decode_jpeg_inner(
    bytes: &[u8],
    limits: &DecodeLimits,
    cover: Cover,
) -> Result<Decoded, ImageError> {
    use mozjpeg::{ColorSpace, Decompress, Marker};
    let corrupt = |e: std::io::Error| ImageError::Corrupt {
        format: "JPEG",
        reason: e.to_string(),
    };
    let mut d = Decompress::with_markers(&[Marker::APP(1)])
        .from_mem(bytes)
        .map_err(corrupt)?;
    let full = d.size();
    limits.check_pixels(full.0 as u64, full.1 as u64)?;
    let orientation = d
        .markers()
        .filter_map(|m| m.data.strip_prefix(b"Exif\0\0"))
        .find_map(Orientation::from_exif_chunk)
        .map(Orientation::to_exif);
    // The largest reduction (1/8, 1/4, 1/2) whose output still covers what
    // the caller needs. libjpeg's scaled size is ceil(full * num / 8).
    if let Some((need_w, need_h)) = cover(full.0, full.1) {
        let scaled = |num: usize| (full.0 * num).div_ceil(8).max(1);
        let scaled_h = |num: usize| (full.1 * num).div_ceil(8).max(1);
        if let Some(num) = [1u8, 2, 4]
            .into_iter()
            .find(|&n| scaled(n.into()) >= need_w && scaled_h(n.into()) >= need_h)
        {
            d.scale(num);
        }
    }
    let (rgb, w, h): (Vec<u8>, usize, usize) = match d.color_space() {
        ColorSpace::JCS_GRAYSCALE => {
            let mut s = d.grayscale().map_err(corrupt)?;
            let (w, h) = (s.width(), s.height());
            let px: Vec<u8> = s.read_scanlines().map_err(corrupt)?;
            s.finish().map_err(corrupt)?;
            (px.iter().flat_map(|&v| [v, v, v]).collect(), w, h)
        }
        ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => {
            let mut s = d.to_colorspace(ColorSpace::JCS_CMYK).map_err(corrupt)?;
            let (w, h) = (s.width(), s.height());
            let px: Vec<u8> = s.read_scanlines().map_err(corrupt)?;
            s.finish().map_err(corrupt)?;
            (
                px.chunks_exact(4).flat_map(adobe_cmyk_to_rgb).collect(),
                w,
                h,
            )
        }
        _ => {
            let mut s = d.rgb().map_err(corrupt)?;
            let (w, h) = (s.width(), s.height());
            let mut px = super::buffers::bytes(w * h * 3);
            s.read_scanlines_into(&mut px).map_err(corrupt)?;
            s.finish().map_err(corrupt)?;
            (px, w, h)
        }
    };
    if rgb.len() != w * h * 3 {
        return Err(ImageError::Corrupt {
            format: "JPEG",
            reason: format!("decoded {} bytes for {w}x{h}", rgb.len()),
        });
    }
    Ok(Decoded {
        rgb: Image8::new(w, h, 3, rgb),
        full_size: full,
        format: "JPEG",
        orientation,
    })
}

/// Pillow reads 4-component JPEGs as inverted (Adobe) CMYK and converts with
/// `cmyk2rgb`: out = nk - c·nk/255 with nk = 255 - k, in integer arithmetic.
#[inline]
fn adobe_cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    // Pillow's CMYK values are the inverted stored samples.
    let nk = 255 - (255 - u32::from(p[3]));
    let ch = |raw: u8| {
        let c = 255 - u32::from(raw);
        let tmp = c * nk + 128;
        let m = ((tmp >> 8) + tmp) >> 8;
        (nk as i32 - m as i32).clamp(0, 255) as u8
    };
    [ch(p[0]), ch(p[1]), ch(p[2])]
}

/// Whether `o` turns the image a quarter (width and height trade places).
fn swaps_axes(o: Orientation) -> bool {
    matches!(
        o,
        Orientation::Rotate90
            | Orientation::Rotate270
            | Orientation::Rotate90FlipH
            | Orientation::Rotate270FlipH
    )
}

/// Applies an EXIF orientation (Pillow's `exif_transpose`).
pub fn orient(img: &Image8, o: Orientation) -> Image8 {
    let (w, h, c) = (img.width, img.height, img.channels);
    let (ow, oh) = if swaps_axes(o) { (h, w) } else { (w, h) };
    let mut out = vec![0u8; img.data.len()];
    for y in 0..oh {
        for x in 0..ow {
            // Source coordinates of output pixel (x, y).
            let (sx, sy) = match o {
                Orientation::NoTransforms => (x, y),
                Orientation::FlipHorizontal => (w - 1 - x, y),
                Orientation::Rotate180 => (w - 1 - x, h - 1 - y),
                Orientation::FlipVertical => (x, h - 1 - y),
                // Transpose.
                Orientation::Rotate90FlipH => (y, x),
                // Clockwise quarter turn.
                Orientation::Rotate90 => (y, h - 1 - x),
                // Transverse.
                Orientation::Rotate270FlipH => (w - 1 - y, h - 1 - x),
                // Counter-clockwise quarter turn.
                Orientation::Rotate270 => (w - 1 - y, x),
            };
            let d = (y * ow + x) * c;
            let s = (sy * w + sx) * c;
            out[d..d + c].copy_from_slice(&img.data[s..s + c]);
        }
    }
    Image8::new(ow, oh, c, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_composite_is_identity() {
        for v in 0..=255u8 {
            assert_eq!(composite_on_white(&[v, v, v, 255]), [v, v, v]);
        }
    }

    #[test]
    fn transparent_composite_is_white() {
        assert_eq!(composite_on_white(&[10, 20, 30, 0]), [255, 255, 255]);
    }

    /// Pillow 13: `Image.alpha_composite(Image.new("RGBA", (1, 1), "white"),
    /// Image.new("RGBA", (1, 1), (r, g, b, a)))`.
    #[test]
    fn half_alpha_matches_pillow() {
        assert_eq!(composite_on_white(&[0, 100, 200, 128]), PILLOW_HALF);
        assert_eq!(composite_on_white(&[0, 0, 0, 1]), PILLOW_ONE);
    }
    const PILLOW_HALF: [u8; 3] = [127, 177, 227];
    const PILLOW_ONE: [u8; 3] = [254, 254, 254];

    #[test]
    fn orientation_round_trips() {
        let img = Image8::new(3, 2, 3, (0..18).collect());
        let r90 = orient(&img, Orientation::Rotate90);
        assert_eq!((r90.width, r90.height), (2, 3));
        let back = orient(&r90, Orientation::Rotate270);
        assert_eq!(back, img);
        let r180 = orient(
            &orient(&img, Orientation::Rotate180),
            Orientation::Rotate180,
        );
        assert_eq!(r180, img);
        // Clockwise: the bottom-left source pixel lands top-left.
        assert_eq!(&r90.data[0..3], &img.data[9..12]);
    }

    #[test]
    fn dimensions_come_from_the_header() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
        for (file, size) in [
            ("jpeg-1600x1200.jpg", (1600, 1200)),
            ("jpeg-progressive.jpg", (0, 0)),
            ("png-2x700.png", (2, 700)),
            ("webp-lossy.webp", (0, 0)),
            ("tiff-lzw.tif", (0, 0)),
        ] {
            let bytes = std::fs::read(dir.join(file)).expect("fixture");
            let decoded = decode(&bytes, &DecodeLimits::default(), false).expect("decodes");
            let want = (decoded.rgb.width as u32, decoded.rgb.height as u32);
            assert_eq!(dimensions(&bytes), Some(want), "{file}");
            if size != (0, 0) {
                assert_eq!(want, size, "{file}");
            }
        }
        assert_eq!(dimensions(b"not an image"), None);
    }

    /// The scan count is an upper bound: every FF DA in the file counts,
    /// here inside a comment segment, so 500 still decode and 501 do not.
    #[test]
    fn too_many_scans_are_refused_before_decoding() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images");
        let jpeg = std::fs::read(dir.join("jpeg-1600x1200.jpg")).expect("fixture");
        let real = memchr::memmem::find_iter(&jpeg, &[0xFF, 0xDA]).count();
        let with_comment = |pairs: usize| {
            let body: Vec<u8> = [0xFF, 0xDA].repeat(pairs);
            let len = u16::try_from(body.len() + 2).expect("fits a segment");
            let mut out = jpeg[..2].to_vec();
            out.extend_from_slice(&[0xFF, 0xFE]);
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&body);
            out.extend_from_slice(&jpeg[2..]);
            out
        };
        let limits = DecodeLimits::default();
        let at_limit = with_comment(MAX_JPEG_SCANS - real);
        decode(&at_limit, &limits, false).expect("500 markers decode");
        let over = with_comment(MAX_JPEG_SCANS - real + 1);
        let err = decode(&over, &limits, false).expect_err("501 markers");
        assert_eq!(err.kind(), "unsupported_image", "{err}");
        assert!(err.to_string().contains("501 scans"), "{err}");
    }

    #[test]
    fn limits_refuse_before_decoding() {
        let limits = DecodeLimits {
            max_bytes: 10,
            max_pixels: 100,
        };
        let err = decode(&[0u8; 11], &limits, false).expect_err("too big");
        assert_eq!(err.kind(), "image_too_large");
        let err = decode(b"hello", &DecodeLimits::default(), false).expect_err("not an image");
        assert_eq!(err.kind(), "not_an_image");
    }
}
