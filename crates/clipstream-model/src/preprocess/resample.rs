//! Pillow's antialiased convolution resampling (`Image.resize` with
//! `Resampling.BICUBIC`), ported from `libImaging/Resample.c` so that the
//! output is bit-identical to what `CLIPImageProcessor` feeds the model.
//!
//! Pillow resizes in two separable passes, horizontal first, each rounding to
//! `u8` through 22-bit fixed-point coefficients. Every detail below (the
//! support scaled by the downscale factor, truncating casts, the rounding
//! constant, skipping a pass whose size does not change) changes output
//! values, so keep it exactly as Pillow has it.
//!
//! One concept in one file (over 500 lines with its SIMD passes): the
//! coefficients, the two passes and their vectorised forms must be read
//! side by side to check that they stay bit-identical.

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
    // Pillow's `clip8` (255 at or above 255.0, 0 at or below 0, else the
    // integer part) written as a clamp, which vectorises.
    (v >> PRECISION_BITS).clamp(0, 255) as u8
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

/// Whether [`resize_window`] uses the vectorised passes (the default) or
/// the scalar ones (kept as the reference; `clipstream bench --host-cost`
/// times both side by side). Both give identical bytes.
static VECTORISED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Chooses the vectorised (true, default) or the scalar resampling passes,
/// process-wide. Only for benchmarks and tests: the output is the same.
pub fn set_simd(on: bool) {
    VECTORISED.store(on, std::sync::atomic::Ordering::Relaxed);
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
    let vectorised = VECTORISED.load(std::sync::atomic::Ordering::Relaxed);
    resize_window_with(src, width, height, filter, window, vectorised)
}

fn resize_window_with(
    src: &Image8,
    width: usize,
    height: usize,
    filter: Filter,
    window: &Window,
    vectorised: bool,
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
        temp = if vectorised {
            horizontal_transposed(src, rows.clone(), &horiz)
        } else {
            horizontal_scalar(src, rows.clone(), &horiz)
        };
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
        return temp;
    };
    // Vertical pass: whole rows at a time, so the inner loop is a plain
    // multiply-add over a row. Integer sums do not depend on order, so this
    // is exactly Pillow's result.
    let stride = ow * c;
    let mut out = super::buffers::bytes(oh * stride);
    let mut acc = vec![0i32; stride];
    for (yy, out_row) in out.chunks_exact_mut(stride.max(1)).enumerate() {
        let (ymin, ycount) = vert.bounds[yy];
        let first = ymin - rows.start;
        let k = &vert.weights[yy * vert.ksize..yy * vert.ksize + ycount];
        let taps = &mid.data[first * stride..(first + ycount) * stride];
        if vectorised {
            convolve_rows(taps, k, &mut acc, out_row);
        } else {
            convolve_rows_generic(taps, k, &mut acc, out_row);
        }
    }
    super::buffers::give_bytes(temp.data);
    Image8::new(ow, oh, c, out)
}

/// `out[i] = clip8(HALF + Σ_k taps[k * out.len() + i] * weights[k])`: one
/// output row as the weighted sum of `weights.len()` consecutive input rows
/// of `out.len()` bytes. Both passes come down to this (the horizontal one
/// on transposed pixels), and it vectorises: 8 lanes of i32 with AVX2,
/// chosen at run time, and the portable loop elsewhere.
#[allow(unsafe_code)]
fn convolve_rows(taps: &[u8], weights: &[i32], acc: &mut [i32], out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above); the function
            // is the portable code compiled with AVX2 enabled.
            unsafe { convolve_rows_avx2(taps, weights, acc, out) };
            return;
        }
    }
    convolve_rows_generic(taps, weights, acc, out);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn convolve_rows_avx2(taps: &[u8], weights: &[i32], acc: &mut [i32], out: &mut [u8]) {
    convolve_rows_generic(taps, weights, acc, out);
}

#[inline(always)]
fn convolve_rows_generic(taps: &[u8], weights: &[i32], acc: &mut [i32], out: &mut [u8]) {
    let n = out.len();
    // Blocks of L outputs summed over every tap in registers (four AVX2
    // vectors), so the sums are stored once, not once per tap.
    const L: usize = 32;
    let blocks = n / L * L;
    for x0 in (0..blocks).step_by(L) {
        let mut a = [1i32 << (PRECISION_BITS - 1); L];
        for (k, &w) in weights.iter().enumerate() {
            let row: &[u8; L] = taps[k * n + x0..k * n + x0 + L]
                .try_into()
                .unwrap_or(&[0; L]);
            for (a, &v) in a.iter_mut().zip(row) {
                *a += i32::from(v) * w;
            }
        }
        for (o, &a) in out[x0..x0 + L].iter_mut().zip(&a) {
            *o = clip8(a);
        }
    }
    // The rest, a tap at a time through `acc`.
    let rest = n - blocks;
    let acc = &mut acc[..rest];
    acc.fill(1 << (PRECISION_BITS - 1));
    for (k, &w) in weights.iter().enumerate() {
        let row = &taps[k * n + blocks..(k + 1) * n];
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += i32::from(v) * w;
        }
    }
    for (o, &a) in out[blocks..].iter_mut().zip(acc.iter()) {
        *o = clip8(a);
    }
}

/// The horizontal pass over `rows` of `src`, Pillow's way: pixel by pixel.
fn horizontal_scalar(src: &Image8, rows: std::ops::Range<usize>, horiz: &Coefficients) -> Image8 {
    let c = src.channels;
    let ow = horiz.bounds.len();
    let mut out = vec![0u8; rows.len() * ow * c];
    let in_stride = src.width * c;
    for (r, out_row) in out.chunks_exact_mut((ow * c).max(1)).enumerate() {
        let y = rows.start + r;
        let in_row = &src.data[y * in_stride..(y + 1) * in_stride];
        horizontal_row(in_row, out_row, c, horiz);
    }
    Image8::new(ow, rows.len(), c, out)
}

/// The horizontal pass over `rows` of `src` as a vertical one: the source
/// columns it reads are transposed into rows (one row per column, its
/// pixels down the image), each output column is then a weighted sum of
/// whole rows ([`convolve_rows`]), and the result is transposed back. The
/// same integer sums as [`horizontal_scalar`], so the same bytes.
fn horizontal_transposed(
    src: &Image8,
    rows: std::ops::Range<usize>,
    horiz: &Coefficients,
) -> Image8 {
    let c = src.channels;
    let ow = horiz.bounds.len();
    let nrows = rows.len();
    if ow == 0 || nrows == 0 {
        return Image8::new(ow, nrows, c, Vec::new());
    }
    // Source columns that any output column reads.
    let c0 = horiz.bounds.iter().map(|b| b.0).min().unwrap_or(0);
    let c1 = horiz
        .bounds
        .iter()
        .map(|b| b.0 + b.1)
        .max()
        .unwrap_or(c0)
        .max(c0);
    let cols = c1 - c0;
    let in_stride = src.width * c;
    let mut out = super::buffers::bytes(nrows * ow * c);
    // In bands of rows, so that the transposed band stays in cache.
    const BAND: usize = 64;
    let mut t = super::buffers::bytes(cols * BAND * c);
    let mut ht = super::buffers::bytes(ow * BAND * c);
    let mut acc = vec![0i32; BAND * c];
    for y0 in (0..nrows).step_by(BAND) {
        let band = BAND.min(nrows - y0);
        let line = band * c;
        // t[x][y * c + ch] = src[rows.start + y0 + y][(c0 + x) * c + ch]
        let first_row = rows.start + y0;
        let block = &src.data[first_row * in_stride..(first_row + band) * in_stride];
        transpose_pixels(block, in_stride, c0 * c, band, cols, c, &mut t);
        // ht[xx][y * c + ch]: the horizontal pass, transposed.
        for (xx, out_line) in ht.chunks_exact_mut(line).take(ow).enumerate() {
            let (xmin, n) = horiz.bounds[xx];
            let k = &horiz.weights[xx * horiz.ksize..xx * horiz.ksize + n];
            let first = xmin - c0;
            convolve_rows(&t[first * line..(first + n) * line], k, &mut acc, out_line);
        }
        // Back to rows: out[y0 + y][xx * c + ch] = ht[xx][y * c + ch].
        let dst = &mut out[y0 * ow * c..(y0 + band) * ow * c];
        transpose_pixels(&ht, line, 0, ow, band, c, dst);
    }
    super::buffers::give_bytes(t);
    super::buffers::give_bytes(ht);
    Image8::new(ow, nrows, c, out)
}

/// `dst[x][y] = src[y][x]` for pixels of `c` bytes: `src` has `h` rows of
/// `stride` bytes and the `w` pixels are read from byte `offset` of each;
/// `dst` gets `w` rows of `h` pixels. Cache-blocked.
fn transpose_pixels(
    src: &[u8],
    stride: usize,
    offset: usize,
    h: usize,
    w: usize,
    c: usize,
    dst: &mut [u8],
) {
    match c {
        3 => transpose3(src, stride, offset, h, w, dst),
        4 => transpose_n::<4>(src, stride, offset, h, w, dst),
        1 => transpose_n::<1>(src, stride, offset, h, w, dst),
        _ => {
            for y in 0..h {
                for x in 0..w {
                    let s = y * stride + offset + x * c;
                    let d = (x * h + y) * c;
                    dst[d..d + c].copy_from_slice(&src[s..s + c]);
                }
            }
        }
    }
}

/// [`transpose_n`] for 3-byte pixels, with SSSE3 where the CPU has it
/// (every x86-64 CPU of the last fifteen years): 1.7 times the scalar
/// loop in a micro-benchmark; in exact preprocessing the transposes went
/// from a tenth of the time to about a twelfth (their loads wait on the
/// memory the decoder just wrote).
#[allow(unsafe_code)]
fn transpose3(src: &[u8], stride: usize, offset: usize, h: usize, w: usize, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("ssse3") {
            // SAFETY: the CPU has SSSE3 (checked just above).
            unsafe { transpose3_ssse3(src, stride, offset, h, w, dst) };
            return;
        }
    }
    transpose_n::<3>(src, stride, offset, h, w, dst);
}

/// Blocks of 16 rows by 4 pixels: each group of 4 rows is widened to
/// 32-bit lanes (one pixel each, a `pshufb`), transposed as a 4x4 matrix
/// of lanes, narrowed back to 12 bytes, and the four groups' 12 bytes are
/// joined into three 16-byte stores per destination row. The rows and
/// pixels that do not fill a block go through the scalar loop.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
#[allow(unsafe_code)]
fn transpose3_ssse3(src: &[u8], stride: usize, offset: usize, h: usize, w: usize, dst: &mut [u8]) {
    use std::arch::x86_64::*;
    const C: usize = 3;
    let line = h * C;
    let widen = _mm_setr_epi8(0, 1, 2, -1, 3, 4, 5, -1, 6, 7, 8, -1, 9, 10, 11, -1);
    // The last 4 bytes zeroed, so that shifted vectors can be OR-ed.
    let narrow = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
    // 16 bytes from byte `s`, of which the block uses the first 12; where
    // `src` has fewer than 16 left, what it has, then zeros (whatever the
    // arguments, nothing outside `src` is read).
    let load = |s: usize| -> __m128i {
        match src.get(s..) {
            Some(rest) if rest.len() >= 16 => {
                // SAFETY: `rest` has at least 16 readable bytes.
                unsafe { _mm_loadu_si128(rest.as_ptr().cast()) }
            }
            rest => {
                let rest = rest.unwrap_or_default();
                let mut b = [0u8; 16];
                let k = rest.len().min(12);
                b[..k].copy_from_slice(&rest[..k]);
                // SAFETY: `b` is 16 readable bytes.
                unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
            }
        }
    };
    let (h16, w4) = (h / 16 * 16, w / 4 * 4);
    for y0 in (0..h16).step_by(16) {
        let base = y0 * stride + offset;
        for x0 in (0..w4).step_by(4) {
            // q[g][i]: pixel x0 + i of rows y0 + 4g .. y0 + 4g + 4, as 12 bytes.
            let mut q = [[_mm_setzero_si128(); 4]; 4];
            for (g, qg) in q.iter_mut().enumerate() {
                let s = base + 4 * g * stride + x0 * C;
                let v0 = _mm_shuffle_epi8(load(s), widen);
                let v1 = _mm_shuffle_epi8(load(s + stride), widen);
                let v2 = _mm_shuffle_epi8(load(s + 2 * stride), widen);
                let v3 = _mm_shuffle_epi8(load(s + 3 * stride), widen);
                let t0 = _mm_unpacklo_epi32(v0, v1);
                let t1 = _mm_unpackhi_epi32(v0, v1);
                let t2 = _mm_unpacklo_epi32(v2, v3);
                let t3 = _mm_unpackhi_epi32(v2, v3);
                qg[0] = _mm_shuffle_epi8(_mm_unpacklo_epi64(t0, t2), narrow);
                qg[1] = _mm_shuffle_epi8(_mm_unpackhi_epi64(t0, t2), narrow);
                qg[2] = _mm_shuffle_epi8(_mm_unpacklo_epi64(t1, t3), narrow);
                qg[3] = _mm_shuffle_epi8(_mm_unpackhi_epi64(t1, t3), narrow);
            }
            let [q0, q1, q2, q3] = q;
            for (i, (((a, b), c), d)) in q0.into_iter().zip(q1).zip(q2).zip(q3).enumerate() {
                let o0 = _mm_or_si128(a, _mm_slli_si128::<12>(b));
                let o1 = _mm_or_si128(_mm_srli_si128::<4>(b), _mm_slli_si128::<8>(c));
                let o2 = _mm_or_si128(_mm_srli_si128::<8>(c), _mm_slli_si128::<4>(d));
                let at = (x0 + i) * line + y0 * C;
                let out = &mut dst[at..at + 16 * C];
                // SAFETY: `out` is 48 writable bytes, three stores of 16.
                unsafe {
                    _mm_storeu_si128(out.as_mut_ptr().cast(), o0);
                    _mm_storeu_si128(out.as_mut_ptr().add(16).cast(), o1);
                    _mm_storeu_si128(out.as_mut_ptr().add(32).cast(), o2);
                }
            }
        }
    }
    // What the blocks left: the last pixels of their rows, the last rows.
    for y in 0..h {
        let xs = if y < h16 { w4..w } else { 0..w };
        for x in xs {
            let s = y * stride + offset + x * C;
            let d = x * line + y * C;
            dst[d..d + C].copy_from_slice(&src[s..s + C]);
        }
    }
}

fn transpose_n<const C: usize>(
    src: &[u8],
    stride: usize,
    offset: usize,
    h: usize,
    w: usize,
    dst: &mut [u8],
) {
    // Bands of R source rows: each source column of the band becomes R
    // consecutive pixels of one destination row, so reads stream along R
    // rows and every write fills R * C contiguous bytes.
    const R: usize = 16;
    let line = h * C;
    let mut y0 = 0;
    while y0 + R <= h {
        let rows: [&[u8]; R] = std::array::from_fn(|r| {
            let start = (y0 + r) * stride + offset;
            &src[start..start + w * C]
        });
        for (x, d) in dst.chunks_exact_mut(line).take(w).enumerate() {
            let d = &mut d[y0 * C..(y0 + R) * C];
            for (r, row) in rows.iter().enumerate() {
                let px: &[u8; C] = row[x * C..x * C + C].try_into().unwrap_or(&[0; C]);
                d[r * C..r * C + C].copy_from_slice(px);
            }
        }
        y0 += R;
    }
    for y in y0..h {
        let start = y * stride + offset;
        let row = &src[start..start + w * C];
        for (x, d) in dst.chunks_exact_mut(line).take(w).enumerate() {
            d[y * C..y * C + C].copy_from_slice(&row[x * C..x * C + C]);
        }
    }
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

    /// A xorshift generator of numbers below its argument.
    fn below(mut state: u64) -> impl FnMut(u64) -> u64 {
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        }
    }

    /// The vectorised passes (transposed horizontal pass, AVX2 kernel) give
    /// the bytes of Pillow's scalar loops, for every filter, channel count,
    /// up- and downscale and window.
    #[test]
    fn vectorised_passes_are_bit_identical_to_the_scalar_ones() {
        let mut rand = below(0x2545_F491_4F6C_DD1D);
        let filters = [
            Filter::Bilinear,
            Filter::Bicubic,
            Filter::Lanczos,
            Filter::Box,
            Filter::Hamming,
        ];
        for case in 0..400 {
            let c = [1, 3, 3, 4][rand(4) as usize];
            let (w, h) = (1 + rand(300) as usize, 1 + rand(300) as usize);
            // Sharp edges and noise: extreme values exercise the clamps.
            let data: Vec<u8> = (0..w * h * c)
                .map(|_| match rand(4) {
                    0 => 0,
                    1 => 255,
                    _ => rand(256) as u8,
                })
                .collect();
            let img = Image8::new(w, h, c, data);
            let (tw, th) = (1 + rand(400) as usize, 1 + rand(400) as usize);
            let x0 = rand(tw as u64) as usize;
            let y0 = rand(th as u64) as usize;
            let window = Window {
                x: x0..x0 + rand((tw - x0) as u64 + 1) as usize,
                y: y0..y0 + rand((th - y0) as u64 + 1) as usize,
            };
            let f = filters[rand(filters.len() as u64) as usize];
            let fast = resize_window_with(&img, tw, th, f, &window, true);
            let slow = resize_window_with(&img, tw, th, f, &window, false);
            assert_eq!(
                fast, slow,
                "case {case}: {w}x{h}x{c} -> {tw}x{th} {f:?} window {window:?}"
            );
        }
    }

    /// The SSSE3 transpose of 3-byte pixels gives the scalar loop's bytes
    /// for any size, offset and stride, with `src` ending right after the
    /// last pixel read (so the short loads near the end are exercised;
    /// that they read nothing past it is the next test's).
    #[test]
    fn transpose3_matches_the_scalar_loop() {
        let mut rand = below(0x9E37_79B9_7F4A_7C15);
        let sizes = [
            (1, 1),
            (4, 16),
            (16, 4),
            (5, 17),
            (640, 64),
            (64, 298),
            (3, 33),
        ];
        for case in 0..300 {
            let (w, h) = match sizes.get(case) {
                Some(&s) => s,
                None => (1 + rand(70) as usize, 1 + rand(70) as usize),
            };
            let offset = rand(5) as usize * 3 + rand(2) as usize;
            let stride = offset + w * 3 + rand(8) as usize;
            let len = (h - 1) * stride + offset + w * 3;
            let src: Vec<u8> = (0..len).map(|_| rand(256) as u8).collect();
            let mut want = vec![0u8; w * h * 3];
            let mut got = vec![1u8; w * h * 3];
            transpose_n::<3>(&src, stride, offset, h, w, &mut want);
            transpose3(&src, stride, offset, h, w, &mut got);
            assert_eq!(
                got, want,
                "case {case}: {w}x{h}, offset {offset}, stride {stride}"
            );
        }
    }

    /// The SSSE3 transpose reads nothing past the end of `src`: here `src`
    /// ends right before a page that may not be read (a read past it
    /// would kill the test), for sizes whose last block reads the last
    /// bytes.
    #[test]
    #[allow(unsafe_code)]
    fn transpose3_reads_nothing_past_the_end() {
        // SAFETY: sysconf has no preconditions.
        let page =
            usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).expect("page size");
        // SAFETY: a fresh anonymous private mapping of two pages; the second
        // is then made unreadable, and the slices below lie in the first.
        let base = unsafe {
            let p = libc::mmap(
                std::ptr::null_mut(),
                2 * page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(
                libc::mprotect(p.cast::<u8>().add(page).cast(), page, libc::PROT_NONE),
                0
            );
            p.cast::<u8>()
        };
        for (w, h, offset, pad) in [(4, 16, 0, 0), (8, 32, 3, 0), (20, 16, 1, 5), (5, 17, 0, 0)] {
            let stride = offset + w * 3 + pad;
            let len = (h - 1) * stride + offset + w * 3;
            // SAFETY: `len` bytes ending at the page's end, within the
            // mapping's first page (len < page), written before read.
            let src = unsafe {
                let start = base.add(page - len);
                for i in 0..len {
                    start.add(i).write((i * 7) as u8);
                }
                std::slice::from_raw_parts(start, len)
            };
            let mut want = vec![0u8; w * h * 3];
            let mut got = vec![1u8; w * h * 3];
            transpose_n::<3>(src, stride, offset, h, w, &mut want);
            transpose3(src, stride, offset, h, w, &mut got);
            assert_eq!(got, want, "{w}x{h}, offset {offset}, stride {stride}");
        }
        // SAFETY: the mapping made above, no longer borrowed.
        unsafe { libc::munmap(base.cast(), 2 * page) };
    }

    const PILLOW_RAMP_4X4_TO_3X2: [u8; 18] = [
        38, 43, 48, 58, 63, 68, 77, 82, 87, 148, 153, 158, 168, 173, 178, 187, 192, 197,
    ];
}
