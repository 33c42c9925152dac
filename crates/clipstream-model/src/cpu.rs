//! How much host CPU a tower's runs take: the time of the thread that
//! calls `run` while inside it, and of ONNX Runtime's pool threads, which
//! the session spawns through a thread manager (named `ort-<tower>`, so
//! `top -H` and profilers tell them apart) and which count their own time.
//!
//! On a GPU that is the host's price of launching kernels and copying; on
//! the CPU it is the model's inference itself, which a host-cost figure
//! wants to see apart from the pipeline's own work (decode, resize,
//! batches, output).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// CPU time (user + system) of a thread's clock, or `None` where the
/// clock cannot be read.
#[allow(unsafe_code)]
fn clock_time(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the call only writes it.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    let (secs, nanos) = (
        u64::try_from(ts.tv_sec).ok()?,
        u32::try_from(ts.tv_nsec).ok()?,
    );
    (rc == 0 && nanos < 1_000_000_000).then(|| Duration::new(secs, nanos))
}

/// The calling thread's CPU time so far.
pub fn thread_time() -> Option<Duration> {
    clock_time(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// Runs `f`, adding the calling thread's CPU time inside it to `acc`.
pub(crate) fn timed<R>(acc: &mut Duration, f: impl FnOnce() -> R) -> R {
    let before = thread_time();
    let out = f();
    if let (Some(a), Some(b)) = (before, thread_time()) {
        *acc += b.saturating_sub(a);
    }
    out
}

/// The CPU clock of the calling thread, readable from any thread while
/// this one lives.
#[allow(unsafe_code)]
fn own_clock() -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `pthread_self` is always valid for the calling thread, and
    // `clock` is a valid place for the answer.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    (rc == 0).then_some(clock)
}

/// The CPU time of a session's pool threads: those alive, read from their
/// clocks, and those gone, as they left it.
#[derive(Debug, Default)]
pub(crate) struct PoolTime {
    inner: Mutex<PoolInner>,
}

#[derive(Debug, Default)]
struct PoolInner {
    next: u64,
    live: Vec<(u64, libc::clockid_t)>,
    gone: Duration,
}

impl PoolTime {
    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the calling thread; `None` when its clock is unreadable
    /// (its time is then not counted).
    fn enter(&self) -> Option<u64> {
        let clock = own_clock()?;
        let mut p = self.lock();
        let id = p.next;
        p.next += 1;
        p.live.push((id, clock));
        Some(id)
    }

    /// The calling thread, registered as `id`, ends: its time so far stays
    /// counted. Under the lock, so no one reads the clock of a thread
    /// that is gone.
    fn leave(&self, id: u64) {
        let mut p = self.lock();
        if let Some(i) = p.live.iter().position(|(k, _)| *k == id) {
            let (_, clock) = p.live.swap_remove(i);
            p.gone = p.gone.saturating_add(clock_time(clock).unwrap_or_default());
        }
    }

    /// All the pool's threads' CPU time so far.
    pub(crate) fn total(&self) -> Duration {
        let p = self.lock();
        p.live
            .iter()
            .filter_map(|(_, c)| clock_time(*c))
            .fold(p.gone, Duration::saturating_add)
    }
}

/// Spawns a session's pool threads, named, counting their CPU time.
pub(crate) struct PoolThreads {
    pub(crate) name: String,
    pub(crate) time: Arc<PoolTime>,
}

impl ort::environment::ThreadManager for PoolThreads {
    type Thread = std::thread::JoinHandle<()>;

    fn create(&self, work: impl FnOnce() + Send + 'static) -> ort::Result<Self::Thread> {
        let time = Arc::clone(&self.time);
        std::thread::Builder::new()
            .name(self.name.clone())
            // glibc's usual default (an 8 MiB stack limit), which ONNX
            // Runtime's own threads get, not Rust's 2 MiB: kernels may keep
            // large buffers on the stack.
            .stack_size(8 << 20)
            .spawn(move || {
                // Left however `work` ends (a guard), so no entry outlives
                // its thread.
                struct Leave(Arc<PoolTime>, Option<u64>);
                impl Drop for Leave {
                    fn drop(&mut self) {
                        if let Some(id) = self.1 {
                            self.0.leave(id);
                        }
                    }
                }
                let _leave = Leave(Arc::clone(&time), time.enter());
                work();
            })
            .map_err(|e| ort::Error::new(format!("spawning an ONNX Runtime thread: {e}")))
    }

    fn join(thread: Self::Thread) -> ort::Result<()> {
        thread
            .join()
            .map_err(|_| ort::Error::new("an ONNX Runtime pool thread panicked"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let start = thread_time().expect("thread clock");
        let mut x = 0u64;
        while thread_time().expect("thread clock") - start < d {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }

    #[test]
    fn timed_counts_the_callers_cpu_inside_only() {
        let mut acc = Duration::ZERO;
        spin(Duration::from_millis(30));
        timed(&mut acc, || spin(Duration::from_millis(20)));
        assert!(acc >= Duration::from_millis(20), "{acc:?}");
        assert!(acc < Duration::from_millis(45), "{acc:?}");
        // Sleeping is not CPU time.
        let mut slept = Duration::ZERO;
        timed(&mut slept, || std::thread::sleep(Duration::from_millis(50)));
        assert!(slept < Duration::from_millis(20), "{slept:?}");
    }

    #[test]
    fn pool_threads_count_their_time_alive_and_after_they_end() {
        use ort::environment::ThreadManager;
        let time = Arc::new(PoolTime::default());
        let pool = PoolThreads {
            name: "ort-test".into(),
            time: Arc::clone(&time),
        };
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let (spun_tx, spun_rx) = std::sync::mpsc::channel::<String>();
        let t = pool
            .create(move || {
                let name = std::thread::current().name().map(str::to_string);
                spin(Duration::from_millis(40));
                spun_tx.send(name.unwrap_or_default()).expect("send");
                go_rx.recv().expect("told to end");
            })
            .expect("spawn");
        assert_eq!(spun_rx.recv().expect("spun"), "ort-test");
        let alive = time.total();
        assert!(alive >= Duration::from_millis(40), "{alive:?}");
        go_tx.send(()).expect("send");
        PoolThreads::join(t).expect("join");
        let gone = time.total();
        assert!(gone >= alive, "{gone:?} < {alive:?}");
        assert!(gone < Duration::from_millis(500), "{gone:?}");
        assert!(time.lock().live.is_empty());
    }
}
