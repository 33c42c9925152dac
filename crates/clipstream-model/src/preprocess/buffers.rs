//! Reused buffers for the per-image work.
//!
//! Every image needs a few large buffers (the decoded pixels, the resize's
//! intermediate rows, the model input), and the worker makes the allocator
//! map every buffer of 128 KiB or more afresh and unmap it when freed (see
//! the binary's `main.rs`: that keeps the resident size honest). Mapping
//! and unmapping per image cost a third of the preprocessing threads' CPU in
//! page faults and TLB shootdowns, so the hot buffers are kept and reused
//! instead, within a bound:
//! - byte buffers per thread (each preprocessing thread reuses its own),
//!   at most [`KEEP_BYTES_PER_THREAD`] each by default;
//! - model-input buffers ([`pixels`]) process-wide, since they are filled on
//!   a preprocessing thread and emptied on the encoder's: at most
//!   [`KEEP_PIXEL_BYTES`] by default.
//!
//! A pipeline lowers both with [`set_limits`] so that what is kept stays a
//! small part of its memory budget.
//!
//! A buffer larger than the bound (a huge image) is simply freed.

use std::cell::RefCell;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Default of the most bytes of buffers one thread keeps between images:
/// enough for a 1600x1200 photo's decode and resize, bounded for a
/// 100-megapixel one. See [`set_limits`].
pub const KEEP_BYTES_PER_THREAD: usize = 16 << 20;
/// Default of the most bytes of model-input buffers kept for reuse,
/// process-wide. See [`set_limits`].
pub const KEEP_PIXEL_BYTES: usize = 32 << 20;

static PER_THREAD: AtomicUsize = AtomicUsize::new(KEEP_BYTES_PER_THREAD);
static PIXEL_BYTES: AtomicUsize = AtomicUsize::new(KEEP_PIXEL_BYTES);

/// Sets how many bytes each thread keeps, and how many bytes of model
/// inputs are kept process-wide (a pipeline sizes them from its memory
/// budget). Buffers already kept are not dropped.
pub fn set_limits(per_thread: usize, pixels: usize) {
    PER_THREAD.store(per_thread, Ordering::Relaxed);
    PIXEL_BYTES.store(pixels, Ordering::Relaxed);
}
/// Buffers smaller than this are left to the allocator (its free lists
/// serve them well).
const SMALL: usize = 64 << 10;

thread_local! {
    static BYTES: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

static PIXELS: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());
static PIXEL_U8: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A byte buffer of `len` bytes, reusing one of this thread's: its
/// contents are unspecified (the caller overwrites every byte).
pub fn bytes(len: usize) -> Vec<u8> {
    let reused = if len >= SMALL {
        BYTES.with_borrow_mut(|pool| {
            // The smallest one that fits; else the largest, to grow.
            let fit = pool
                .iter()
                .enumerate()
                .filter(|(_, b)| b.capacity() >= len)
                .min_by_key(|(_, b)| b.capacity())
                .or_else(|| pool.iter().enumerate().max_by_key(|(_, b)| b.capacity()))
                .map(|(i, _)| i);
            fit.map(|i| pool.swap_remove(i))
        })
    } else {
        None
    };
    let mut v = reused.unwrap_or_default();
    v.resize(len, 0);
    v
}

/// Gives a buffer back to this thread's pool (or frees it).
pub fn give_bytes(v: Vec<u8>) {
    if v.capacity() < SMALL {
        return;
    }
    // `try_with`: a buffer dropped while the thread exits is just freed.
    let _ = BYTES.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        let kept: usize = pool.iter().map(Vec::capacity).sum();
        if kept + v.capacity() <= PER_THREAD.load(Ordering::Relaxed) {
            pool.push(v);
        }
    });
}

/// A model-input buffer of `len` floats (contents unspecified: the caller
/// overwrites every value), reusing one given back with [`give_pixels`].
pub fn pixels(len: usize) -> Vec<f32> {
    let reused = {
        let mut pool = PIXELS.lock().unwrap_or_else(|e| e.into_inner());
        pool.iter()
            .position(|b| b.capacity() >= len)
            .map(|i| pool.swap_remove(i))
    };
    let mut v = reused.unwrap_or_default();
    v.resize(len, 0.0);
    v
}

/// Gives a model-input buffer back for reuse (or frees it).
pub fn give_pixels(v: Vec<f32>) {
    let bytes = 4 * v.capacity();
    if bytes < SMALL {
        return;
    }
    let mut pool = PIXELS.lock().unwrap_or_else(|e| e.into_inner());
    let kept: usize = pool.iter().map(|b| 4 * b.capacity()).sum();
    if kept + bytes <= PIXEL_BYTES.load(Ordering::Relaxed) {
        pool.push(v);
    }
}

/// A model-input buffer of `len` bytes (a tower with a uint8 input;
/// contents unspecified), reusing one given back with
/// [`give_pixel_bytes`].
pub fn pixel_bytes(len: usize) -> Vec<u8> {
    let reused = {
        let mut pool = PIXEL_U8.lock().unwrap_or_else(|e| e.into_inner());
        pool.iter()
            .position(|b| b.capacity() >= len)
            .map(|i| pool.swap_remove(i))
    };
    let mut v = reused.unwrap_or_default();
    v.resize(len, 0);
    v
}

/// Gives a byte model-input buffer back for reuse (or frees it), within
/// the same bound as [`give_pixels`].
pub fn give_pixel_bytes(v: Vec<u8>) {
    if v.capacity() < SMALL {
        return;
    }
    let mut pool = PIXEL_U8.lock().unwrap_or_else(|e| e.into_inner());
    let kept: usize = pool.iter().map(Vec::capacity).sum();
    if kept + v.capacity() <= PIXEL_BYTES.load(Ordering::Relaxed) {
        pool.push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_buffers_are_reused_and_bounded() {
        let mut a = bytes(1 << 20);
        a.fill(7);
        let ptr = a.as_ptr();
        give_bytes(a);
        let b = bytes(1 << 19);
        assert_eq!(b.as_ptr(), ptr, "the kept buffer serves a smaller request");
        assert_eq!(b.len(), 1 << 19);
        give_bytes(b);
        // More than the bound is not kept.
        give_bytes(vec![0; KEEP_BYTES_PER_THREAD]);
        let kept: usize = BYTES.with_borrow(|p| p.iter().map(Vec::capacity).sum());
        assert!(kept <= PER_THREAD.load(Ordering::Relaxed));
    }

    #[test]
    fn pixel_buffers_have_the_asked_length() {
        let a = pixels(3 * 224 * 224);
        assert_eq!(a.len(), 3 * 224 * 224);
        give_pixels(a);
        let b = pixels(3 * 100 * 100);
        assert_eq!(b.len(), 3 * 100 * 100);
        let c = pixels(3 * 300 * 300);
        assert_eq!(c.len(), 3 * 300 * 300);
    }
}
