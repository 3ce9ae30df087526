//! A team of threads that share the tasks of one call: the calling thread and up to one helper
//! (the machines this crate targets have two cores, and the engine's matrices are small enough
//! that a third thread would wait more than it works).
//!
//! [`Team::run`]`(n, f)` runs `f(0)`, …, `f(n − 1)`, each task once, on whichever thread takes it
//! first from a shared counter (a thread that the machine slows down simply takes fewer), and
//! returns when all are done. Between calls the helper spins for a short while, because a
//! training step calls `run` every few hundred microseconds and a sleeping thread takes longer
//! than that to wake; after about a millisecond without work it sleeps until the next call.
//!
//! A panic inside a task does not cross threads: it is caught, the other tasks still finish,
//! and `run` returns an error, so a cell in a notebook gets a message instead of a dead kernel.

use crate::error::{Error, Result};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A task body with its lifetime erased so that the helper thread can hold it; see
/// [`Team::run`] for why that is sound.
type Job = *const (dyn Fn(usize) + Sync + 'static);

/// What the calling thread and the helper share.
struct Shared {
    /// The job of the current generation (null between calls).
    job: Mutex<Option<SendJob>>,
    /// Incremented for each call of `run`; the helper starts work when it changes.
    generation: AtomicUsize,
    /// The next task to take, and how many there are.
    next: AtomicUsize,
    tasks: AtomicUsize,
    /// The generation the helper last finished.
    finished: AtomicUsize,
    /// A task panicked during this call.
    panicked: AtomicBool,
    /// The helper is asleep (parked) and must be woken.
    sleeping: AtomicBool,
    quit: AtomicBool,
}

#[derive(Clone, Copy)]
struct SendJob(Job);
// SAFETY: the pointee is `Sync` (the `Job` type says so), and the pointer is only dereferenced
// while `Team::run` keeps the closure alive (see there).
unsafe impl Send for SendJob {}

/// The threads that run the engine's tasks: the caller plus an optional helper thread. Made for
/// the span of a training loop (or a sampler); dropping it ends the helper.
pub struct Team {
    shared: Arc<Shared>,
    helper: Option<JoinHandle<()>>,
}

impl Team {
    /// A team of `threads` threads (clamped to 1..=2 and to the machine's cores): with 2, one
    /// helper thread is started. The results never depend on the number of threads.
    pub fn new(threads: usize) -> Team {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = threads.clamp(1, 2).min(cores);
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            generation: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            quit: AtomicBool::new(false),
        });
        let helper = (threads == 2).then(|| {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("genlab-helper".into())
                .spawn(move || helper_loop(&shared))
                .ok()
        });
        Team {
            shared,
            helper: helper.flatten(),
        }
    }

    /// A team sized by [`threads_wanted`]: two threads where there are two cores, unless
    /// `GENLAB_THREADS=1`.
    pub fn default_size() -> Team {
        Team::new(threads_wanted())
    }

    /// Threads in the team (1 or 2).
    pub fn threads(&self) -> usize {
        1 + usize::from(self.helper.is_some())
    }

    /// Runs `f(0)`, …, `f(tasks − 1)` across the team and returns when all have finished; an
    /// error if any of them panicked (the others still ran).
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) -> Result<()> {
        let sh = &*self.shared;
        let Some(helper) = &self.helper else {
            // One thread: no sharing at all.
            sh.panicked.store(false, Ordering::Relaxed);
            for i in 0..tasks {
                take_task(sh, || f(i));
            }
            return outcome(sh);
        };
        if tasks <= 1 {
            // Not worth waking the helper.
            sh.panicked.store(false, Ordering::Relaxed);
            if tasks == 1 {
                take_task(sh, || f(0));
            }
            return outcome(sh);
        }
        // SAFETY: only the lifetime is erased. The helper dereferences the pointer only
        // between reading generation g (below) and storing `finished = g`, and this function
        // does not return before it has seen `finished == g`, even when a task panicked
        // (panics are caught in `take_task`); so `f` outlives every use.
        let job: Job = unsafe {
            std::mem::transmute::<*const (dyn Fn(usize) + Sync + '_), Job>(f as *const _)
        };
        *lock(&sh.job) = Some(SendJob(job));
        sh.panicked.store(false, Ordering::Relaxed);
        sh.tasks.store(tasks, Ordering::Relaxed);
        sh.next.store(0, Ordering::Relaxed);
        let generation = sh.generation.fetch_add(1, Ordering::AcqRel) + 1;
        if sh.sleeping.swap(false, Ordering::AcqRel) {
            helper.thread().unpark();
        }
        work(sh, f);
        let mut spins = 0u32;
        while sh.finished.load(Ordering::Acquire) != generation {
            if helper.is_finished() {
                // The helper died outside a task (it never should): do not wait forever.
                *lock(&sh.job) = None;
                return Err(thread_error());
            }
            spins += 1;
            // Under Miri a spin is expensive to interpret and time is virtual: yield at once.
            if spins < 1 << 16 && !cfg!(miri) {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *lock(&sh.job) = None;
        outcome(sh)
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::Release);
        if let Some(helper) = self.helper.take() {
            helper.thread().unpark();
            let _ = helper.join();
        }
    }
}

/// Threads a training loop uses: 2 where the machine has two cores or more, else 1;
/// `GENLAB_THREADS=1` forces one.
pub fn threads_wanted() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let wanted = std::env::var("GENLAB_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .unwrap_or(2);
    wanted.clamp(1, 2).min(cores)
}

/// Flushes denormal floats to zero on this thread while it lives, then restores the thread's
/// floating-point mode: training on tiny gradients and Adam moments otherwise slows to a crawl
/// (denormal arithmetic costs ~100 cycles), and a notebook's cell thread must get its own mode
/// back afterwards.
pub struct FlushDenormals {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    saved: u32,
}

impl FlushDenormals {
    /// Sets flush-to-zero and denormals-are-zero (x86-64; elsewhere nothing).
    pub fn new() -> Self {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        {
            let saved = mxcsr::get();
            // FTZ (bit 15) and DAZ (bit 6).
            mxcsr::set(saved | 0x8040);
            FlushDenormals { saved }
        }
        #[cfg(not(all(target_arch = "x86_64", not(miri))))]
        FlushDenormals {}
    }
}

impl Default for FlushDenormals {
    fn default() -> Self {
        FlushDenormals::new()
    }
}

impl Drop for FlushDenormals {
    fn drop(&mut self) {
        #[cfg(all(target_arch = "x86_64", not(miri)))]
        mxcsr::set(self.saved);
    }
}

/// The SSE control and status register of the calling thread.
#[cfg(all(target_arch = "x86_64", not(miri)))]
pub(crate) mod mxcsr {
    /// Its value.
    pub(crate) fn get() -> u32 {
        let mut value: u32 = 0;
        // SAFETY: stmxcsr stores the 4-byte register to the address given, a live local.
        unsafe {
            std::arch::asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags))
        };
        value
    }

    /// Sets it (only the rounding/flush/mask bits the callers pass, all valid values).
    pub(crate) fn set(value: u32) {
        // SAFETY: ldmxcsr loads 4 bytes from a live local; the values passed are a saved
        // register value or one with FTZ/DAZ added, both valid MXCSR settings.
        unsafe {
            std::arch::asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, preserves_flags))
        };
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn thread_error() -> Error {
    Error::Dfdx(
        "a training thread stopped unexpectedly (a bug in genlab: please report it); \
         the model keeps its parameters from before this call"
            .into(),
    )
}

fn outcome(sh: &Shared) -> Result<()> {
    if sh.panicked.load(Ordering::Acquire) {
        return Err(thread_error());
    }
    Ok(())
}

/// Runs one task, recording a panic instead of unwinding.
fn take_task(sh: &Shared, task: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(task)).is_err() {
        sh.panicked.store(true, Ordering::Release);
    }
}

/// Takes tasks from the shared counter until none are left.
fn work(sh: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let tasks = sh.tasks.load(Ordering::Relaxed);
    loop {
        let i = sh.next.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            break;
        }
        take_task(sh, || f(i));
    }
}

/// The helper: wait for a new generation (spinning, then asleep), do its share, report.
fn helper_loop(sh: &Shared) {
    // This thread only ever runs the engine's tasks: it keeps flush-to-zero for its life.
    let _ftz = FlushDenormals::new();
    let mut seen = 0usize;
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            if sh.quit.load(Ordering::Acquire) {
                return;
            }
            let g = sh.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            spins += 1;
            if !spins.is_multiple_of(256) {
                std::hint::spin_loop();
                continue;
            }
            if idle_since.elapsed() < Duration::from_millis(1) && !cfg!(miri) {
                continue;
            }
            // Sleep until `run` or `drop` unparks us; re-check after announcing it, so a
            // call that started in between is not missed.
            sh.sleeping.store(true, Ordering::Release);
            if sh.generation.load(Ordering::Acquire) == seen && !sh.quit.load(Ordering::Acquire) {
                std::thread::park_timeout(Duration::from_millis(100));
            }
            sh.sleeping.store(false, Ordering::Release);
            idle_since = Instant::now();
        };
        seen = generation;
        let job = *lock(&sh.job);
        if let Some(SendJob(job)) = job {
            // SAFETY: `run` set this job for `generation` and keeps it alive until it sees
            // `finished == generation`, which is stored only after the last use below.
            let f: &(dyn Fn(usize) + Sync) = unsafe { &*job };
            work(sh, f);
        }
        sh.finished.store(generation, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once_on_one_or_two_threads() {
        for threads in [1, 2] {
            let team = Team::new(threads);
            for tasks in [0, 1, 2, 7, 100] {
                let seen: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
                let rounds = if cfg!(miri) { 3 } else { 200 };
                for _ in 0..rounds {
                    team.run(tasks, &|i| {
                        seen[i].fetch_add(1, Ordering::Relaxed);
                    })
                    .unwrap();
                }
                assert!(seen.iter().all(|s| s.load(Ordering::Relaxed) == rounds));
            }
        }
    }

    #[test]
    fn a_panicking_task_is_an_error_and_the_team_goes_on() {
        let team = Team::new(2);
        let done = AtomicUsize::new(0);
        let err = team.run(8, &|i| {
            assert!(i != 3, "task 3 fails on purpose");
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert!(err.is_err());
        assert_eq!(done.load(Ordering::Relaxed), 7);
        team.run(4, &|_| {
            done.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
        assert_eq!(done.load(Ordering::Relaxed), 11);
    }

    /// After a panicking task the team still ends: dropping it joins the helper (no thread is
    /// left spinning), within a deadline rather than never.
    #[test]
    fn a_team_ends_after_a_panicking_task() {
        let (tx, rx) = std::sync::mpsc::channel();
        let owner = std::thread::spawn(move || {
            let team = Team::new(2);
            let failed = team.run(6, &|i| assert!(i != 4, "task 4 fails on purpose"));
            let helper = team.threads() == 2;
            drop(team);
            let _ = tx.send((failed.is_err(), helper));
        });
        let deadline = Duration::from_secs(if cfg!(miri) { 600 } else { 20 });
        let (failed, _) = rx.recv_timeout(deadline).expect("the team did not end");
        assert!(failed);
        owner.join().unwrap();
    }

    #[test]
    fn a_sleeping_helper_wakes_for_the_next_call() {
        let team = Team::new(2);
        let n = AtomicUsize::new(0);
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(5));
            team.run(16, &|_| {
                n.fetch_add(1, Ordering::Relaxed);
            })
            .unwrap();
        }
        assert_eq!(n.load(Ordering::Relaxed), 48);
    }
}
