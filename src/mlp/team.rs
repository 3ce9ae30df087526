//! A team of threads that share the tasks of one call: the calling thread and up to one helper
//! (the machines this crate targets have two cores, and the engine's matrices are small enough
//! that a third thread would wait more than it works).
//!
//! [`Team::run`]`(n, f)` runs `f(0)`, …, `f(n − 1)`, each task once, and returns when all are
//! done. The calling thread takes tasks from the front (0, 1, …) and the helper from the back
//! (n − 1, n − 2, …), each by a compare-and-swap on one shared word, until they meet: a thread
//! that the machine slows down simply takes fewer, and when both run at the same speed each
//! takes the same tasks call after call, so the rows of weights and Adam moments a task updates
//! stay in one core's cache from step to step (the engine orders its tasks for this: see
//! `update_nets`). The caller never waits for the helper to show up: it waits only
//! for tasks the helper has actually taken. So when the helper is slow to wake, or another
//! program holds the second core, the caller does the whole call itself at one thread's speed
//! instead of waiting for a thread that cannot run. Between calls the helper spins for a short
//! while, because a training step calls `run` every few hundred microseconds and a sleeping
//! thread takes longer than that to wake; after about a millisecond without work it sleeps
//! until the next call.
//!
//! Two threads pay most while the two cores share a cache. On the 2-vCPU development machine
//! the host moves the vCPUs every few seconds to a few minutes: a core-to-core round trip of a
//! cache line measures ~42 ns for a while (shared L3: W1 trains in ~0.37 s), then ~390 ns
//! (no shared L3: every weight one thread updated, and every row of the batch the other
//! thread wrote, crosses at ~10 GB/s, and W1 takes ~0.55 s against one thread's ~0.69 s),
//! then back. That, not the engine, is why `cargo xtask bench` rounds differ by up to 1.6x;
//! PyTorch's two threads slow down in the slow phase too (W1 1.8 s vs 2.3 s).
//!
//! A panic inside a task does not cross threads: it is caught, the other tasks still finish,
//! and `run` returns an error, so a cell in a notebook gets a message instead of a dead kernel.

use crate::error::{Error, Result};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The task body of one call, as the caller holds it.
type Job<'a> = &'a (dyn Fn(usize) + Sync + 'a);

/// What the calling thread and the helper share.
struct Shared {
    /// The current call: its generation in the high 40 bits, then how many tasks the caller
    /// took from the front (12 bits) and how many the helper took from the back (12 bits). A
    /// task is taken by a compare-and-swap that also checks the generation, and before the
    /// caller writes the next call's task count and job it closes the last call (all its tasks
    /// taken), so a thread that arrives after its call has ended takes nothing, even if it
    /// reads the next call's count and job.
    state: AtomicU64,
    /// The current call's task count and its job: a pointer to the caller's `Job`, which lives
    /// on the caller's stack for the whole call. Both are written before `state` announces the
    /// call.
    tasks: AtomicUsize,
    job: AtomicPtr<()>,
    /// Tasks of the current call the helper has finished.
    helper_done: AtomicUsize,
    /// A task panicked during this call.
    panicked: AtomicBool,
    /// The helper is asleep (parked) and must be woken.
    sleeping: AtomicBool,
    quit: AtomicBool,
    /// Tests only: called at the points of the protocol a test holds a thread at.
    #[cfg(test)]
    pause: std::sync::Mutex<Option<Hook>>,
}

/// Tests only: what a test runs at each [`Point`].
#[cfg(test)]
type Hook = Arc<dyn Fn(Point) + Send + Sync>;

/// Tests only: where [`Shared::pause`] is called.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq)]
enum Point {
    /// The helper has seen a new call and is about to take its tasks.
    HelperSawCall,
    /// The helper has taken what it could of that call.
    HelperLeftCall,
    /// The helper has read a call's task count, job and state, and is about to take a task.
    HelperLoadedCall,
    /// The caller has written a call's task count and job and is about to announce it.
    CallerBeforeAnnounce,
    /// The caller has announced a call and is about to take its tasks.
    CallerAnnounced,
}

#[cfg(test)]
fn pause_at(sh: &Shared, point: Point) {
    let hook = sh.pause.lock().map(|h| h.clone()).unwrap_or(None);
    if let Some(hook) = hook {
        hook(point);
    }
}

/// Bits of each task count in `state`, and the most tasks one call hands out at once (a call
/// with more is handed out in parts). The generation takes the other 40 bits: a helper that
/// read a call's state and then lost its core could only mistake a later call for it if
/// exactly 2⁴⁰ calls ran in between (at ~50 ns a call, 15 hours); with 24 bits it was 2²⁴
/// calls, under a second of small calls.
const FIELD: u32 = 12;
const COUNT: u64 = (1 << FIELD) - 1;
const GENERATION: u32 = 2 * FIELD;

/// (tasks taken from the front, tasks taken from the back) in a `state` word.
fn taken(state: u64) -> (u64, u64) {
    ((state >> FIELD) & COUNT, state & COUNT)
}

/// The threads that run the engine's tasks: the caller plus an optional helper thread. Made for
/// the span of a training loop (or a sampler); dropping it ends the helper.
///
/// A team serves one calling thread: it may move to another thread (`Send`) but not be shared
/// between threads (not `Sync`), since its hand-off has room for one call at a time. Two
/// threads calling [`Team::run`] on one team at once do not compile:
/// ```compile_fail
/// let team = genlab::mlp::Team::new(2);
/// std::thread::scope(|s| {
///     s.spawn(|| team.run(2, &|_| {}));
///     s.spawn(|| team.run(2, &|_| {}));
/// });
/// ```
/// A call made from inside another call on the same team (from `first` in
/// [`Team::run_with`], or from a task that runs on the calling thread) runs serially on the
/// calling thread: the team's one call slot stays with the outer call.
pub struct Team {
    shared: Arc<Shared>,
    helper: Option<JoinHandle<()>>,
    /// A call is in progress (its caller is inside `run_with`). Also what makes the team not
    /// `Sync`.
    busy: Cell<bool>,
}

impl Team {
    /// A team of `threads` threads (clamped to 1..=2 and to the machine's cores): with 2, one
    /// helper thread is started. The results never depend on the number of threads: every
    /// task computes the same sums whoever runs it, and no thread of the team changes its
    /// floating-point mode (see `kernels::flush_denormal`).
    pub fn new(threads: usize) -> Team {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Team::spawn(threads.clamp(1, 2).min(cores))
    }

    /// A team of `threads` (1 or 2) whatever the number of cores: on one core its two threads
    /// take turns. [`Team::new`] never asks for more threads than cores (a helper that cannot
    /// run in parallel only costs time); tests of the hand-off between the two threads use this
    /// so that they test it on any machine.
    fn spawn(threads: usize) -> Team {
        let shared = Arc::new(Shared {
            state: AtomicU64::new(0),
            tasks: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            helper_done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: AtomicBool::new(false),
            quit: AtomicBool::new(false),
            #[cfg(test)]
            pause: std::sync::Mutex::new(None),
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
            busy: Cell::new(false),
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
        self.run_with(tasks, f, &mut || {})
    }

    /// [`Team::run`], with `first` run on the calling thread once the helper can start on the
    /// tasks: serial work that the call's tasks do not need (a trainer drawing the next step's
    /// noise) then overlaps them, and the caller takes fewer tasks. A panic in `first` is an
    /// error, like one in a task. `first` may itself call the team: that call runs serially.
    pub fn run_with(
        &self,
        tasks: usize,
        f: &(dyn Fn(usize) + Sync),
        first: &mut dyn FnMut(),
    ) -> Result<()> {
        if self.busy.replace(true) {
            // A call inside a call on this team: the outer call holds the hand-off (its
            // state, task count and job); this one runs on the calling thread alone.
            return run_serially(tasks, f, first);
        }
        /// Frees the team when its call ends, however it ends.
        struct Free<'a>(&'a Cell<bool>);
        impl Drop for Free<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _free = Free(&self.busy);
        let Some(helper) = self.helper.as_ref().filter(|_| tasks > 1) else {
            // One thread, or one task (not worth waking the helper): no sharing at all.
            return run_serially(tasks, f, first);
        };
        // More tasks than a state word counts are handed out in parts; every part runs even
        // when an earlier one had a panicking task, and the first error is returned.
        let part = COUNT as usize;
        let mut outcome = Ok(());
        let mut first = Some(first);
        for start in (0..tasks).step_by(part) {
            let (n, f) = (part.min(tasks - start), &|i| f(start + i));
            let this = match first.take() {
                Some(first) => self.run_part(helper, n, f, first),
                None => self.run_part(helper, n, f, &mut || {}),
            };
            outcome = outcome.and(this);
        }
        outcome
    }

    /// One call of at most [`COUNT`] tasks shared with the helper.
    fn run_part(
        &self,
        helper: &JoinHandle<()>,
        tasks: usize,
        f: &(dyn Fn(usize) + Sync),
        first: &mut dyn FnMut(),
    ) -> Result<()> {
        let sh = &*self.shared;
        sh.panicked.store(false, Ordering::Relaxed);
        let job: Job<'_> = f;
        // First close the last call: its generation with every task taken. A helper still
        // inside it (it saw that call, then lost its core while this thread did all the tasks)
        // may read the task count and job written below, but it can take no task with them:
        // its compare-and-swap needs the last call's state as it was before this store, and
        // the closed state has none left. (Without this it could take tasks of this call
        // under the old generation: they ran twice and the caller waited for ever.)
        let last = sh.state.load(Ordering::Relaxed) >> GENERATION;
        sh.state
            .store((last << GENERATION) | (COUNT << FIELD), Ordering::SeqCst);
        // The helper reads `job` only through a task it took from this call's generation, and
        // this call does not return (nor unwind: `Call`'s drop) before every task the helper
        // took has finished: the pointer is never used after `job` goes out of scope. Release
        // (with the helper's Acquire): a helper that reads these values also sees the closed
        // state above.
        sh.job
            .store(&job as *const Job<'_> as *mut (), Ordering::Release);
        sh.tasks.store(tasks, Ordering::Release);
        sh.helper_done.store(0, Ordering::Relaxed);
        #[cfg(test)]
        pause_at(sh, Point::CallerBeforeAnnounce);
        let generation = (last + 1) & ((1 << (64 - GENERATION)) - 1);
        // SeqCst here and on `sleeping` (with the helper's SeqCst pair): either the helper sees
        // this generation before it parks, or this thread sees that it sleeps and wakes it.
        sh.state.store(generation << GENERATION, Ordering::SeqCst);
        let call = Call {
            sh,
            helper,
            tasks: tasks as u64,
        };
        if sh.sleeping.swap(false, Ordering::SeqCst) {
            helper.thread().unpark();
        }
        #[cfg(test)]
        pause_at(sh, Point::CallerAnnounced);
        // The helper may start now; a panic in `first` is caught.
        take_task(sh, first);
        // Take tasks from the front while any are left (the helper takes from the back).
        let mut state = sh.state.load(Ordering::Acquire);
        loop {
            let (front, back) = taken(state);
            if front + back >= tasks as u64 {
                break;
            }
            match sh.state.compare_exchange_weak(
                state,
                state + (1 << FIELD),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    take_task(sh, || f(front as usize));
                    state = sh.state.load(Ordering::Acquire);
                }
                Err(now) => state = now,
            }
        }
        call.finish()?;
        outcome(sh)
    }
}

/// A call the helper may be working on. It ends only once every task the helper took has
/// finished: through [`Call::finish`], or, should the caller unwind, in its drop (as
/// `std::thread::scope` waits for its threads), so no unwind can leave the helper running a
/// task that borrows the caller's closure and data.
struct Call<'a> {
    sh: &'a Shared,
    helper: &'a JoinHandle<()>,
    tasks: u64,
}

impl Call<'_> {
    /// Closes the call (no task left to take) and waits for the helper's tasks; an error if
    /// the helper died or finished more tasks than it took (a broken hand-off: neither should
    /// ever happen, but nothing waits for ever on it).
    fn finish(self) -> Result<()> {
        let outcome = self.wait();
        std::mem::forget(self);
        outcome
    }

    fn wait(&self) -> Result<()> {
        let sh = self.sh;
        // Take whatever is left from the front without running it (nothing is left after the
        // caller's loop; something is only if the caller unwound), so `back` is final.
        let mut state = sh.state.load(Ordering::Acquire);
        let back = loop {
            let (front, back) = taken(state);
            if front + back >= self.tasks {
                break back;
            }
            let closed = (state & !(COUNT << FIELD)) | ((self.tasks - back) << FIELD);
            match sh
                .state
                .compare_exchange_weak(state, closed, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => break back,
                Err(now) => state = now,
            }
        } as usize;
        let mut spins = 0u32;
        loop {
            let done = sh.helper_done.load(Ordering::Acquire);
            if done == back {
                return Ok(());
            }
            if done > back || self.helper.is_finished() {
                return Err(thread_error());
            }
            spins += 1;
            // After ~20 µs the helper is probably not running (another program has its core,
            // or it shares this one): let the scheduler run it. Under Miri a spin is
            // expensive to interpret and time is virtual: yield at once.
            if spins < 1 << 10 && !cfg!(miri) {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        let _ = self.wait();
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::SeqCst);
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

/// Runs `first`, then every task, on the calling thread; an error if any panicked.
fn run_serially(tasks: usize, f: &(dyn Fn(usize) + Sync), first: &mut dyn FnMut()) -> Result<()> {
    let mut ok = caught(first);
    for i in 0..tasks {
        ok &= caught(|| f(i));
    }
    if ok {
        Ok(())
    } else {
        Err(thread_error())
    }
}

/// Runs one task, recording a panic instead of unwinding.
fn take_task(sh: &Shared, task: impl FnOnce()) {
    if !caught(task) {
        sh.panicked.store(true, Ordering::Release);
    }
}

/// Runs `task`; false if it panicked. Nothing unwinds out of it: a panic's payload is dropped
/// under another `catch_unwind` (a payload whose `Drop` panics would otherwise unwind from
/// here: rust-lang/rust#86027), and so is the payload of that panic, and so on; after a few
/// rounds the last payload is leaked rather than dropped.
fn caught(task: impl FnOnce()) -> bool {
    let Err(mut payload) = catch_unwind(AssertUnwindSafe(task)) else {
        return true;
    };
    for _ in 0..8 {
        match catch_unwind(AssertUnwindSafe(move || drop(payload))) {
            Ok(()) => return false,
            Err(again) => payload = again,
        }
    }
    std::mem::forget(payload);
    false
}

/// The helper's share of call `generation`: take tasks while that call has some left.
fn help(sh: &Shared, generation: u64) {
    let tasks = sh.tasks.load(Ordering::Acquire) as u64;
    let job = sh.job.load(Ordering::Acquire) as *const Job<'static>;
    let mut state = sh.state.load(Ordering::Acquire);
    #[cfg(test)]
    pause_at(sh, Point::HelperLoadedCall);
    while state >> GENERATION == generation {
        let (front, back) = taken(state);
        if front + back >= tasks {
            break;
        }
        match sh
            .state
            .compare_exchange_weak(state, state + 1, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => {
                // The swap took task `tasks − 1 − back` of `generation`, so that call has not
                // ended: its caller waits, even when unwinding, until every task the helper
                // took is done.
                // SAFETY: `tasks`/`job`, read after seeing this generation, are that call's
                // (a later call with the same state word needs 2⁴⁰ calls in between), and `job`
                // points to its caller's live `Job`; the lifetime is widened for this task only.
                let f: &(dyn Fn(usize) + Sync) = unsafe { *job };
                let i = (tasks - 1 - back) as usize;
                take_task(sh, || f(i));
                sh.helper_done.fetch_add(1, Ordering::Release);
                state = sh.state.load(Ordering::Acquire);
            }
            Err(now) => state = now,
        }
    }
}

/// The helper: wait for a new call (spinning, then asleep), take its tasks.
fn helper_loop(sh: &Shared) {
    let mut seen = 0u64;
    loop {
        let mut idle_since = Instant::now();
        let mut spins = 0u32;
        let generation = loop {
            if sh.quit.load(Ordering::Acquire) {
                return;
            }
            let g = sh.state.load(Ordering::Acquire) >> GENERATION;
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
            sh.sleeping.store(true, Ordering::SeqCst);
            if sh.state.load(Ordering::SeqCst) >> GENERATION == seen
                && !sh.quit.load(Ordering::SeqCst)
            {
                std::thread::park_timeout(Duration::from_millis(100));
            }
            sh.sleeping.store(false, Ordering::Relaxed);
            idle_since = Instant::now();
        };
        seen = generation;
        #[cfg(test)]
        pause_at(sh, Point::HelperSawCall);
        help(sh, generation);
        #[cfg(test)]
        pause_at(sh, Point::HelperLeftCall);
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

    /// `run_with`'s serial part runs once, on the calling thread, whatever the task count;
    /// a panic in it is an error once every task has run, and the team goes on.
    #[test]
    fn run_with_runs_first_once_on_the_caller() {
        for threads in [1, 2] {
            let team = Team::new(threads);
            let caller = std::thread::current().id();
            for tasks in [0, 1, 2, 9] {
                let done = AtomicUsize::new(0);
                let mut firsts = 0;
                team.run_with(
                    tasks,
                    &|_| {
                        done.fetch_add(1, Ordering::Relaxed);
                    },
                    &mut || {
                        assert_eq!(std::thread::current().id(), caller);
                        firsts += 1;
                    },
                )
                .unwrap();
                assert_eq!((firsts, done.load(Ordering::Relaxed)), (1, tasks));
            }
            let done = AtomicUsize::new(0);
            let failed = team.run_with(
                5,
                &|_| {
                    done.fetch_add(1, Ordering::Relaxed);
                },
                &mut || panic!("the serial part fails on purpose"),
            );
            assert!(failed.is_err());
            assert_eq!(done.load(Ordering::Relaxed), 5);
            team.run(3, &|_| {}).unwrap();
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

    /// A helper that saw a call but got to its tasks only after the caller had done them all
    /// alone and begun writing the next call takes nothing until that call is announced.
    /// (Before, it could take tasks of the next call under the old call's generation: those
    /// tasks ran twice and the caller waited for ever; seen once as a GAN test that ran for
    /// 20 minutes on an oversubscribed machine.) The hooks hold the helper right after it
    /// sees call 1, and release it while the caller has written call 2 but not announced it.
    #[test]
    fn a_late_helper_takes_no_task_of_a_call_not_yet_announced() {
        let (tx, rx) = std::sync::mpsc::channel();
        let owner = std::thread::spawn(move || {
            // Two threads even on one core: the hooks below need a helper to hold.
            let team = Team::spawn(2);
            // 0: hold the helper; 1: let it go; 2: it has left the call it saw.
            let stage = Arc::new(AtomicUsize::new(0));
            let announced = Arc::new(AtomicUsize::new(0));
            let (st, an) = (Arc::clone(&stage), Arc::clone(&announced));
            let wait_for = move |st: &AtomicUsize, done: &dyn Fn(usize) -> bool| {
                let start = Instant::now();
                while !done(st.load(Ordering::SeqCst)) && start.elapsed() < Duration::from_secs(20)
                {
                    std::thread::yield_now();
                }
            };
            *team.shared.pause.lock().unwrap() = Some(Arc::new(move |point| match point {
                Point::HelperSawCall => wait_for(&st, &|s| s != 0),
                Point::HelperLeftCall => {
                    let _ = st.compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst);
                }
                Point::CallerBeforeAnnounce if an.fetch_add(1, Ordering::SeqCst) == 1 => {
                    st.store(1, Ordering::SeqCst);
                    wait_for(&st, &|s| s == 2);
                }
                _ => {}
            }));
            let runs: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
            let first = team.run(4, &|_| {});
            let second = team.run(8, &|i| {
                runs[i].fetch_add(1, Ordering::SeqCst);
            });
            *team.shared.pause.lock().unwrap() = None;
            let runs: Vec<usize> = runs.iter().map(|r| r.load(Ordering::SeqCst)).collect();
            let as_planned = team.threads() == 2 && stage.load(Ordering::SeqCst) == 2;
            let _ = tx.send((first.is_ok(), second.is_ok(), runs, as_planned));
        });
        let deadline = Duration::from_secs(if cfg!(miri) { 600 } else { 60 });
        let (first, second, runs, as_planned) = rx
            .recv_timeout(deadline)
            .expect("the second call never returned");
        assert!(first && second, "calls failed: {first} {second}");
        assert_eq!(runs, vec![1; 8], "each task of the second call runs once");
        assert!(
            as_planned,
            "the helper was not held and released as planned"
        );
        owner.join().unwrap();
    }

    /// Six teams (twelve threads) on a machine of two cores, a million small calls each: every
    /// task of every call runs once, and no call waits for ever. Helpers lose their core at
    /// every point of the hand-off here; before the caller closed the last call (see
    /// `a_late_helper_takes_no_task_of_a_call_not_yet_announced`) this test hung within
    /// seconds, every time.
    #[test]
    fn many_teams_on_few_cores_run_every_task_once() {
        let (teams, calls) = if cfg!(miri) { (2, 30) } else { (6, 1_000_000) };
        let (tx, rx) = std::sync::mpsc::channel();
        for t in 0..teams {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let team = Team::new(2);
                let runs: Vec<AtomicUsize> = (0..9).map(|_| AtomicUsize::new(0)).collect();
                let mut want = [0usize; 9];
                let mut ok = true;
                for call in 0..calls {
                    let tasks = 2 + (call * 7 + t) % 8;
                    ok &= team
                        .run(tasks, &|i| {
                            runs[i].fetch_add(1, Ordering::Relaxed);
                        })
                        .is_ok();
                    for w in &mut want[..tasks] {
                        *w += 1;
                    }
                }
                let got: Vec<usize> = runs.iter().map(|r| r.load(Ordering::Relaxed)).collect();
                let _ = tx.send(ok && got == want);
            });
        }
        let deadline = Duration::from_secs(if cfg!(miri) { 600 } else { 120 });
        for _ in 0..teams {
            let ok = rx
                .recv_timeout(deadline)
                .expect("a team's calls never ended");
            assert!(ok, "a task ran twice or not at all, or a call failed");
        }
    }

    /// A call made from `first` on the same team (a trainer calling the team inside
    /// `run_with`'s serial part) runs serially and leaves the outer call intact: every task
    /// of both runs once, both calls succeed. (Before, the inner call took over the outer
    /// call's slot: outer tasks were skipped or ran twice, in 20 of 20 rounds, and both
    /// returned `Ok`.)
    #[test]
    fn a_call_inside_a_call_runs_serially_and_leaves_the_outer_call_intact() {
        let rounds = if cfg!(miri) { 2 } else { 20 };
        let team = Team::new(2);
        for _ in 0..rounds {
            let outer: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
            let inner: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
            let mut inner_result = Ok(());
            let outer_result = team.run_with(
                8,
                &|i| {
                    std::thread::sleep(Duration::from_micros(50));
                    outer[i].fetch_add(1, Ordering::SeqCst);
                },
                &mut || {
                    inner_result = team.run(8, &|i| {
                        inner[i].fetch_add(1, Ordering::SeqCst);
                    });
                },
            );
            assert!(outer_result.is_ok() && inner_result.is_ok());
            let counts = |v: &[AtomicUsize]| -> Vec<usize> {
                v.iter().map(|c| c.load(Ordering::SeqCst)).collect()
            };
            assert_eq!(counts(&outer), vec![1; 8], "outer tasks");
            assert_eq!(counts(&inner), vec![1; 8], "inner tasks");
        }
        // The team is free again afterwards: a plain call still shares its tasks.
        team.run(4, &|_| {}).unwrap();
        assert!(!team.busy.get());
    }

    /// A payload whose `Drop` panics.
    struct PanicsOnDrop;
    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("the panic payload's drop fails on purpose");
        }
    }

    /// A task that panics with a payload whose `Drop` panics too is an error like any other
    /// panic: nothing unwinds out of `run` while the helper still works on the call's data.
    /// (Before, dropping the payload unwound out of `run`, and the caller's data went away
    /// under the helper's task: Miri reported the data race.)
    #[test]
    fn a_panic_whose_payload_panics_on_drop_does_not_escape() {
        for threads in [1, 2] {
            let team = Team::new(threads);
            let data: Vec<usize> = (0..8).collect();
            let sum = AtomicUsize::new(0);
            let escaped = catch_unwind(AssertUnwindSafe(|| {
                team.run(8, &|i| {
                    if i == 0 {
                        std::panic::panic_any(PanicsOnDrop);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    sum.fetch_add(data[i], Ordering::SeqCst);
                })
            }));
            let result = escaped.expect("a panic unwound out of Team::run");
            assert!(result.is_err(), "the panicking task is an error");
            assert_eq!(sum.load(Ordering::SeqCst), (1..8).sum::<usize>());
            team.run(3, &|_| {}).unwrap();
        }
    }

    /// A call of more tasks than one state word counts runs in parts; a panicking task in
    /// one part leaves every other task of every part to run, and the call is an error.
    /// (Before, the parts after the failing one were abandoned.)
    #[test]
    fn a_call_in_parts_runs_every_part_when_one_task_panics() {
        let tasks = 2 * COUNT as usize + 5;
        let team = Team::new(2);
        let ran = AtomicUsize::new(0);
        let result = team.run(tasks, &|i| {
            assert!(i != 7, "task 7 fails on purpose");
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert!(result.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), tasks - 1);
    }

    /// A helper that read a call's state and then lost its core for exactly 2²⁴ calls finds
    /// a later call with a different state word: it takes none of that call's tasks with the
    /// old call's task count and job. (With a 24-bit generation its compare-and-swap
    /// succeeded: it ran task 7 of an 8-task call through the old call's job pointer, and
    /// the new call's task 3
    /// never ran.) The hooks hold the helper after it has read
    /// call 1, run 2²⁴ calls on the caller alone, and release the helper when call 2²⁴ + 1
    /// is announced, before the caller takes any of its tasks.
    #[test]
    #[cfg_attr(miri, ignore = "2²⁴ calls")]
    fn a_helper_held_for_2_pow_24_calls_takes_nothing_of_a_later_call() {
        let (tx, rx) = std::sync::mpsc::channel();
        let owner = std::thread::spawn(move || {
            let team = Team::new(2);
            if team.threads() == 1 {
                let _ = tx.send(None);
                return;
            }
            // 0: hold the helper at its next read of a call; 1: held; 2: let it go; 3: it
            // has left that call.
            let stage = Arc::new(AtomicUsize::new(0));
            let announced = Arc::new(AtomicU64::new(0));
            let (st, an) = (Arc::clone(&stage), Arc::clone(&announced));
            let wait_for = |st: &AtomicUsize, want: usize| {
                let start = Instant::now();
                while st.load(Ordering::SeqCst) < want && start.elapsed() < Duration::from_secs(20)
                {
                    std::thread::yield_now();
                }
            };
            *team.shared.pause.lock().unwrap() = Some(Arc::new(move |point| match point {
                Point::HelperLoadedCall
                    if st
                        .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                        .is_ok() =>
                {
                    wait_for(&st, 2);
                }
                Point::HelperLeftCall => {
                    let _ = st.compare_exchange(2, 3, Ordering::SeqCst, Ordering::SeqCst);
                }
                Point::CallerAnnounced => {
                    let call = an.fetch_add(1, Ordering::SeqCst) + 1;
                    if call == 1 {
                        wait_for(&st, 1);
                    } else if call == (1 << 24) + 1 {
                        st.store(2, Ordering::SeqCst);
                        wait_for(&st, 3);
                    }
                }
                _ => {}
            }));
            let old: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
            let mut ok = team
                .run(8, &|i| {
                    old[i].fetch_add(1, Ordering::SeqCst);
                })
                .is_ok();
            for _ in 1..1 << 24 {
                ok &= team.run(2, &|_| {}).is_ok();
            }
            // Fewer tasks than the first call: a stale task count shows as a task index
            // this call does not have.
            let new: Vec<AtomicUsize> = (0..8).map(|_| AtomicUsize::new(0)).collect();
            ok &= team
                .run(4, &|i| {
                    new[i].fetch_add(1, Ordering::SeqCst);
                })
                .is_ok();
            *team.shared.pause.lock().unwrap() = None;
            let counts = |v: &[AtomicUsize]| -> Vec<usize> {
                v.iter().map(|c| c.load(Ordering::SeqCst)).collect()
            };
            let _ = tx.send(Some((
                ok,
                counts(&old),
                counts(&new),
                stage.load(Ordering::SeqCst),
            )));
        });
        let got = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("the calls never ended");
        owner.join().unwrap();
        let Some((ok, old, new, stage)) = got else {
            return; // one core: no helper to hold
        };
        assert_eq!(stage, 3, "the helper was not held and released as planned");
        assert!(ok, "a call failed");
        assert_eq!(old, vec![1; 8], "each task of the first call runs once");
        assert_eq!(
            new,
            [1, 1, 1, 1, 0, 0, 0, 0],
            "each task of the last call runs once"
        );
    }

    /// Every thread of a team computes in the default floating-point mode: a denormal result
    /// is the same bits whichever thread computes it. (Before, the helper flushed denormals
    /// to zero for its whole life: ½·`f32::MIN_POSITIVE` was 0x400000 on the caller and 0 on
    /// the helper, in one call.)
    #[test]
    fn a_denormal_result_is_the_same_on_either_thread() {
        let team = Team::new(2);
        let caller = std::thread::current().id();
        let half = std::hint::black_box(0.5f32);
        let on_helper = AtomicUsize::new(0);
        // Until the helper has taken some tasks (a call can end before it wakes).
        for _ in 0..200 {
            let results: Vec<AtomicU64> = (0..16).map(|_| AtomicU64::new(0)).collect();
            team.run(16, &|i| {
                std::thread::sleep(Duration::from_micros(20));
                let tiny = std::hint::black_box(f32::MIN_POSITIVE) * half;
                if std::thread::current().id() != caller {
                    on_helper.fetch_add(1, Ordering::Relaxed);
                }
                results[i].store(u64::from(tiny.to_bits()), Ordering::Relaxed);
            })
            .unwrap();
            for r in &results {
                assert_eq!(r.load(Ordering::Relaxed), 0x0040_0000, "½·MIN_POSITIVE");
            }
            if on_helper.load(Ordering::Relaxed) > 0 {
                break;
            }
        }
        if team.threads() == 2 {
            assert!(
                on_helper.load(Ordering::Relaxed) > 0,
                "no task ran on the helper"
            );
        }
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
