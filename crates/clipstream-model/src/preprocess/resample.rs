//! Pillow's antialiased convolution resampling (`Image.resize` with
//! `Resampling.BICUBIC`), ported from `libImaging/Resample.c` so that the
//! output is bit-identical to what `CLIPImageProcessor` feeds the model.
//!
//! Pillow resizes in two separable passes, horizontal first, each rounding to
//! `u8` through 22-bit fixed-point coefficients. Every detail below (the
//! support scaled by the downscale factor, truncating casts, the rounding
//! constant, skipping a pass whose size does not change) changes output
//! values, so keep it exactly as Pillow has it.

/// Fixed-point precision of the 8-bit path (`PRECISION_BITS` in Pillow).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// The resampling filters this crate supports; numbered as in Pillow and in
/// `preprocessor_config.json`'s `resample` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    /// `0`: nearest neighbour (no antialiasing, as Pillow).
    Nearest,
    /// `2`: bilinear (triangle), antialiased.
    Bilinear,
    /// `3`: bicubic (Keys, a = -0.5), antialiased. CLIP's filter.
    Bicubic,
    /// `1`: Lanczos-3, antialiased.
    Lanczos,
    /// `4`: box, antialiased.
    Box,
    /// `5`: Hamming, antialiased.
    Hamming,
}

impl Filter {
    /// Maps Pillow's integer resampling codes (as stored in
    /// `preprocessor_config.json`) to a filter.
    pub fn from_pil_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => Filter::Nearest,
            1 => Filter::Lanczos,
            2 => Filter::Bilinear,
            3 => Filter::Bicubic,
            4 => Filter::Box,
            5 => Filter::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => 0.5,
            Filter::Bilinear | Filter::Hamming => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Nearest | Filter::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 { 1.0 - x } else { 0.0 }
            }
            Filter::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    (px.sin() / px) * (0.54 + 0.46 * px.cos())
                }
            }
            Filter::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

/// Per output pixel: the first input index, the number of taps, and the
/// fixed-point weights (`ksize` of them, zero-padded).
struct Coefficients {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    weights: Vec<i32>,
}

/// `precompute_coeffs` + `normalize_coeffs_8bpc` from Pillow, for the output
/// pixels `outputs` of a resize from `in_size` to `out_size` (Pillow computes
/// all of them; each one depends only on its own index, so computing a
/// window of them gives the same numbers).
fn coefficients(
    in_size: usize,
    out_size: usize,
    filter: Filter,
    outputs: std::ops::Range<usize>,
) -> Coefficients {
    // Pillow passes the box edges as C `float`; (0, in_size) is exact.
    let in0 = 0.0f32 as f64;
    let in1 = in_size as f32 as f64;
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    let ksize = (support.ceil() as usize) * 2 + 1;

    let n = outputs.len();
    let mut bounds = Vec::with_capacity(n);
    let mut weights = vec![0i32; n * ksize];
    let mut k = vec![0f64; ksize];
    for (i, xx) in outputs.enumerate() {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as does `as i64`.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) - xmin;
        let xmax = xmax.max(0) as usize;
        let mut ww = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(xmax) {
            let w = filter.weight(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *kx = w;
            ww += w;
        }
        let row = &mut weights[i * ksize..(i + 1) * ksize];
        for (x, kx) in k.iter().enumerate().take(xmax) {
            let v = if ww != 0.0 { kx / ww } else { *kx };
            let fixed = v * f64::from(1u32 << PRECISION_BITS);
            row[x] = if v < 0.0 {
                (-0.5 + fixed) as i32
            } else {
                (0.5 + fixed) as i32
            };
        }
        bounds.push((xmin as usize, xmax));
    }
    Coefficients {
        ksize,
        bounds,
        weights,
    }
}

#[inline]
fn clip8(v: i32) -> u8 {
    if v >= (1 << PRECISION_BITS << 8) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// An interleaved 8-bit image: `channels` bytes per pixel, rows packed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image8 {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Bytes per pixel (3 for RGB).
    pub channels: usize,
    /// `height * width * channels` bytes.
    pub data: Vec<u8>,
}

impl Image8 {
    /// Wraps a buffer; panics in debug builds if the size does not match.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Self {
        debug_assert_eq!(data.len(), width * height * channels);
        Image8 {
            width,
            height,
            channels,
            data,
        }
    }
}

/// A window of an image: columns `x`, rows `y`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Columns.
    pub x: std::ops::Range<usize>,
    /// Rows.
    pub y: std::ops::Range<usize>,
}

/// Resizes like Pillow's `Image.resize((width, height), filter)` with no
/// `box` and no `reducing_gap`.
pub fn resize(src: &Image8, width: usize, height: usize, filter: Filter) -> Image8 {
    resize_window(
        src,
        width,
        height,
        filter,
        &Window {
            x: 0..width,
            y: 0..height,
        },
    )
}

/// The pixels in `window` of `resize(src, width, height, filter)`, computed
/// without the rest: bit-identical to resizing the whole image and cropping
/// it (every output pixel of Pillow's passes depends only on its own
/// coefficients), but the work and memory are those of the window, so an
/// extreme aspect ratio (a 1×100,000 image resized to 224×22,400,000 before
/// a 224×224 crop) costs what the crop costs. `window` must lie within
/// `width` × `height`.
pub fn resize_window(
    src: &Image8,
    width: usize,
    height: usize,
    filter: Filter,
    window: &Window,
) -> Image8 {
    let c = src.channels;
    let (ow, oh) = (window.x.len(), window.y.len());
    debug_assert!(window.x.end <= width && window.y.end <= height);
    let need_horizontal = width != src.width;
    let need_vertical = height != src.height;
    if !need_horizontal && !need_vertical {
        return crop_rows(src, window);
    }
    if filter == Filter::Nearest {
        return resize_nearest(src, width, height, window);
    }

    // The horizontal pass only needs the rows the vertical pass reads.
    let vert = need_vertical.then(|| coefficients(src.height, height, filter, window.y.clone()));
    let rows = match &vert {
        Some(v) if oh > 0 => {
            let first = v.bounds[0].0;
            let (lmin, lcount) = v.bounds[oh - 1];
            first..lmin + lcount
        }
        Some(_) => 0..0,
        None => window.y.clone(),
    };

    let temp;
    let mid = if need_horizontal {
        let horiz = coefficients(src.width, width, filter, window.x.clone());
        let mut out = vec![0u8; rows.len() * ow * c];
        let in_stride = src.width * c;
        for (r, out_row) in out.chunks_exact_mut((ow * c).max(1)).enumerate() {
            let y = rows.start + r;
            let in_row = &src.data[y * in_stride..(y + 1) * in_stride];
            horizontal_row(in_row, out_row, c, &horiz);
        }
        temp = Image8::new(ow, rows.len(), c, out);
        &temp
    } else {
        temp = crop_rows(
            src,
            &Window {
                x: window.x.clone(),
                y: rows.clone(),
            },
        );
        &temp
    };

    let Some(vert) = vert else {
        return mid.clone();
    };
    // Vertical pass: whole rows at a time, so the inner loop is a plain
    // multiply-add over a row (the compiler vectorises it). Integer sums do
    // not depend on order, so this is exactly Pillow's result.
    let stride = ow * c;
    let mut out = vec![0u8; oh * stride];
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride.max(1)).enumerate() {
        let (ymin, ycount) = vert.bounds[yy];
        let ymin = ymin - rows.start;
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + ycount];
        acc.fill(1 << (PRECISION_BITS - 1));
        for (y, &w) in k.iter().enumerate() {
            let row = &mid.data[(y + ymin) * stride..(y + ymin + 1) * stride];
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += i32::from(v) * w;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
    Image8::new(ow, oh, c, out)
}

/// The pixels of `src` in `window` (which lies within `src`).
fn crop_rows(src: &Image8, window: &Window) -> Image8 {
    let c = src.channels;
    let mut out = Vec::with_capacity(window.x.len() * window.y.len() * c);
    for y in window.y.clone() {
        let row = y * src.width * c;
        out.extend_from_slice(&src.data[row + window.x.start * c..row + window.x.end * c]);
    }
    Image8::new(window.x.len(), window.y.len(), c, out)
}

/// One output row of the horizontal pass.
fn horizontal_row(in_row: &[u8], out_row: &mut [u8], c: usize, coeffs: &Coefficients) {
    const HALF: i32 = 1 << (PRECISION_BITS - 1);
    for (xx, px) in out_row.chunks_exact_mut(c).enumerate() {
        let (xmin, n) = coeffs.bounds[xx];
        let k = &coeffs.weights[xx * coeffs.ksize..xx * coeffs.ksize + n];
        let taps = &in_row[xmin * c..(xmin + n) * c];
        if c == 3 {
            let (mut s0, mut s1, mut s2) = (HALF, HALF, HALF);
            for (p, &w) in taps.chunks_exact(3).zip(k) {
                s0 += i32::from(p[0]) * w;
                s1 += i32::from(p[1]) * w;
                s2 += i32::from(p[2]) * w;
            }
            px[0] = clip8(s0);
            px[1] = clip8(s1);
            px[2] = clip8(s2);
        } else {
            for (ch, o) in px.iter_mut().enumerate() {
                let mut ss = HALF;
                for (p, &w) in taps.chunks_exact(c).zip(k) {
                    ss += i32::from(p[ch]) * w;
                }
                *o = clip8(ss);
            }
        }
    }
}

/// Pillow's `ImagingResample` with NEAREST goes through the affine
/// transform path: source pixel = floor((x + 0.5) * scale).
fn resize_nearest(src: &Image8, width: usize, height: usize, window: &Window) -> Image8 {
    let c = src.channels;
    let sx = src.width as f64 / width as f64;
    let sy = src.height as f64 / height as f64;
    let mut out = Vec::with_capacity(window.x.len() * window.y.len() * c);
    for y in window.y.clone() {
        let iy = (((y as f64 + 0.5) * sy) as usize).min(src.height - 1);
        for x in window.x.clone() {
            let ix = (((x as f64 + 0.5) * sx) as usize).min(src.width - 1);
            let p = (iy * src.width + ix) * c;
            out.extend_from_slice(&src.data[p..p + c]);
        }
    }
    Image8::new(window.x.len(), window.y.len(), c, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let img = Image8::new(3, 2, 3, (0..18).collect());
        assert_eq!(resize(&img, 3, 2, Filter::Bicubic), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = Image8::new(37, 23, 3, vec![77; 37 * 23 * 3]);
        for (w, h) in [(10, 10), (100, 7), (224, 224), (37, 50)] {
            let out = resize(&img, w, h, Filter::Bicubic);
            assert!(out.data.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }

    #[test]
    fn coefficients_sum_to_one_in_fixed_point() {
        for (i, o) in [(640, 224), (224, 640), (3, 224), (1000, 7)] {
            let c = coefficients(i, o, Filter::Bicubic, 0..o);
            for xx in 0..o {
                let (_, n) = c.bounds[xx];
                let s: i32 = c.weights[xx * c.ksize..xx * c.ksize + n].iter().sum();
                assert!(
                    (s - (1 << PRECISION_BITS)).abs() <= n as i32,
                    "{i}->{o} at {xx}: {s}"
                );
            }
        }
    }

    /// Values computed by Pillow 13 (`Image.fromarray(a).resize((3, 2), Image.BICUBIC)`)
    /// for a = np.arange(48, dtype=np.uint8).reshape(4, 4, 3) * 5.
    #[test]
    fn matches_pillow_on_a_small_ramp() {
        let data: Vec<u8> = (0..48u32).map(|v| (v * 5) as u8).collect();
        let img = Image8::new(4, 4, 3, data);
        let out = resize(&img, 3, 2, Filter::Bicubic);
        assert_eq!(out.data, PILLOW_RAMP_4X4_TO_3X2);
    }

    const PILLOW_RAMP_4X4_TO_3X2: [u8; 18] = [
        38, 43, 48, 58, 63, 68, 77, 82, 87, 148, 153, 158, 168, 173, 178, 187, 192, 197,
    ];
}
