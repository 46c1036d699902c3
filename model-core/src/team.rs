//! The threads that run the CPU kernels' parallel steps.
//!
//! A forward pass is a few hundred short parallel steps (one or more per
//! layer, 0.1-2 ms each at batch 1). Between two steps the helpers wait by
//! spinning, not by sleeping: a sleeping thread costs a wake-up per step, and
//! one that gives its CPU away with `sched_yield` (as rayon's idle workers
//! do) loses it for a whole time slice whenever anything else on the machine
//! is runnable. With two low-priority busy loops beside it, ResNet-50 at
//! batch 1 on rayon went from 42 to 57 ms per pass; ONNX Runtime's spinning
//! pool did not move. After [`spin_budget`] without work, a helper sleeps.
//!
//! - The caller of [`for_each`] leads the step and takes tasks with its
//!   helpers from one counter, so a thread that is slowed down takes fewer.
//! - One step at a time: a second caller (another model's batch worker)
//!   waits for the running step to finish, and the two alternate step by
//!   step.
//! - A step started from inside a task runs inline on that thread: every
//!   thread is busy with the outer step already.
//! - The team has as many threads as rayon's global pool
//!   (`RAYON_NUM_THREADS` or, by default, the CPUs this process may use,
//!   which honours a container's cgroup quota): the caller and one helper
//!   fewer.

use std::any::Any;
use std::cell::Cell;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// One parallel step: its tasks, the next one to take, and its first panic.
struct Step<'a> {
    run: &'a (dyn Fn(usize) + Sync),
    tasks: usize,
    next: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

impl Step<'_> {
    /// Takes and runs tasks until none is left; a panic is kept for the
    /// leader and ends this thread's part of the step.
    fn take_tasks(&self) {
        let result = panic::catch_unwind(AssertUnwindSafe(|| loop {
            let task = self.next.fetch_add(1, Ordering::Relaxed);
            if task >= self.tasks {
                break;
            }
            (self.run)(task);
        }));
        if let Err(payload) = result {
            // No more tasks for anyone: the step has failed.
            self.next.store(self.tasks, Ordering::Relaxed);
            self.panic.lock().unwrap().get_or_insert(payload);
        }
    }
}

/// A fixed set of helper threads and the step they are working on.
pub struct Team {
    helpers: usize,
    /// Held by the leader of the running step.
    lead: Mutex<()>,
    /// Bumped once per step; each helper runs every step once.
    generation: AtomicUsize,
    /// The running step, on the leader's stack (null between steps).
    step: AtomicPtr<Step<'static>>,
    /// Helpers still inside the running step.
    pending: AtomicUsize,
    sleepers: AtomicUsize,
    /// Set by [`Team::rest`]: helpers stop spinning and sleep.
    resting: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
    spin: Duration,
}

thread_local! {
    /// Set while this thread runs a task of a step.
    static IN_STEP: Cell<bool> = const { Cell::new(false) };
    /// The team [`with_team`] put in place for this thread.
    static CHOSEN: Cell<Option<&'static Team>> = const { Cell::new(None) };
}

impl Team {
    /// A team of `threads` (the leader and `threads - 1` helpers), whose
    /// helpers spin for `spin` after a step before they sleep.
    pub fn new(threads: usize, spin: Duration) -> &'static Team {
        // Helpers live as long as the process: leak the team they share.
        let team: &'static Team = Box::leak(Box::new(Team {
            helpers: threads.max(1) - 1,
            lead: Mutex::new(()),
            generation: AtomicUsize::new(0),
            step: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            resting: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            spin,
        }));
        for index in 0..team.helpers {
            std::thread::Builder::new()
                .name(format!("fovea-team-{}", index + 1))
                .spawn(move || team.help())
                .expect("cannot start a kernel thread");
        }
        team
    }

    /// Threads that take tasks in a step: the leader and its helpers.
    pub fn threads(&self) -> usize {
        self.helpers + 1
    }

    /// Runs `run(0)`, ..., `run(tasks - 1)` on the team's threads and
    /// returns when all have finished. A task's panic is raised here, in
    /// the caller, once every thread has left the step.
    pub fn for_each(&self, tasks: usize, run: impl Fn(usize) + Sync) {
        if tasks == 0 {
            return;
        }
        if tasks == 1 || self.helpers == 0 || IN_STEP.get() {
            return (0..tasks).for_each(run);
        }
        let _lead = self.lead.lock().unwrap_or_else(|e| e.into_inner());
        let step = Step {
            run: &run,
            tasks,
            next: AtomicUsize::new(0),
            panic: Mutex::new(None),
        };
        self.pending.store(self.helpers, Ordering::Relaxed);
        self.resting.store(false, Ordering::Relaxed);
        // SAFETY (lifetime): the helpers reach the step only through this
        // pointer, and it is not returned from until all have left it
        // (`pending` at 0), also when a task panics.
        let erased = &step as *const Step<'_> as *mut Step<'static>;
        self.step.store(erased, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) > 0 {
            // Taking the lock orders this after a helper's last look at
            // `generation` and before its wait.
            drop(self.sleep.lock().unwrap_or_else(|e| e.into_inner()));
            self.wake.notify_all();
        }
        IN_STEP.set(true);
        step.take_tasks();
        IN_STEP.set(false);
        let mut waited = Waiting::new();
        while self.pending.load(Ordering::Acquire) != 0 {
            waited.pause();
        }
        self.step.store(std::ptr::null_mut(), Ordering::Relaxed);
        if let Some(payload) = step.panic.into_inner().unwrap_or_else(|e| e.into_inner()) {
            panic::resume_unwind(payload);
        }
    }

    /// Lets the helpers sleep now instead of spinning out their budget: for
    /// a caller that knows no step follows soon, such as the end of a
    /// forward pass, so that the CPUs go to the server's other work (a
    /// request's decoding) in the meantime. The next step wakes them.
    pub fn rest(&self) {
        self.resting.store(true, Ordering::Relaxed);
    }

    /// A helper's life: wait for a step, take its tasks, tell the leader.
    fn help(&self) {
        IN_STEP.set(true);
        let mut seen = 0;
        loop {
            seen = self.next_generation(seen);
            // SAFETY: the leader published the step before bumping the
            // generation and keeps it alive until `pending` reaches 0.
            let step = unsafe { &*self.step.load(Ordering::Acquire) };
            step.take_tasks();
            self.pending.fetch_sub(1, Ordering::Release);
        }
    }

    /// Waits until the generation moves past `seen`: spinning for the spin
    /// budget, then asleep.
    fn next_generation(&self, seen: usize) -> usize {
        let started = Instant::now();
        let mut rounds = 0u32;
        loop {
            let now = self.generation.load(Ordering::Acquire);
            if now != seen {
                return now;
            }
            std::hint::spin_loop();
            rounds += 1;
            if rounds.is_multiple_of(256)
                && (self.resting.load(Ordering::Relaxed) || started.elapsed() >= self.spin)
            {
                break;
            }
        }
        let mut guard = self.sleep.lock().unwrap_or_else(|e| e.into_inner());
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        let mut now = self.generation.load(Ordering::SeqCst);
        while now == seen {
            guard = self.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
            now = self.generation.load(Ordering::SeqCst);
        }
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
        now
    }
}

/// The leader's wait for helpers that are still working: spinning, and
/// only after 10 ms (a helper that lost its CPU for long) yielding as well.
struct Waiting {
    started: Instant,
    rounds: u32,
}

impl Waiting {
    fn new() -> Self {
        Waiting {
            started: Instant::now(),
            rounds: 0,
        }
    }

    fn pause(&mut self) {
        self.rounds += 1;
        if !self.rounds.is_multiple_of(4096) || self.started.elapsed() < Duration::from_millis(10) {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// How long a helper spins after a step before it sleeps:
/// `FOVEA_SPIN_US` microseconds, by default 2000.
pub fn spin_budget() -> Duration {
    let micros = std::env::var("FOVEA_SPIN_US")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(2000);
    Duration::from_micros(micros)
}

/// The process's team, once a step has started it.
static GLOBAL: OnceLock<&'static Team> = OnceLock::new();

/// The team this thread's steps run on: the one [`with_team`] put in
/// place, or else the process's, started on first use with as many threads
/// as rayon's global pool.
pub fn current() -> &'static Team {
    CHOSEN.get().unwrap_or_else(|| {
        *GLOBAL.get_or_init(|| Team::new(rayon::current_num_threads(), spin_budget()))
    })
}

/// Runs `f` with `team` as this thread's [`current`] team (tests that
/// compare thread counts).
pub fn with_team<R>(team: &'static Team, f: impl FnOnce() -> R) -> R {
    let before = CHOSEN.replace(Some(team));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CHOSEN.set(before);
    result.unwrap_or_else(|payload| panic::resume_unwind(payload))
}

/// Threads that take part in a step of the [`current`] team.
pub fn threads() -> usize {
    current().threads()
}

/// [`Team::rest`] on the [`current`] team, if one has started (a GPU
/// model's passes start none).
pub fn rest() {
    if let Some(team) = CHOSEN.get().or_else(|| GLOBAL.get().copied()) {
        team.rest()
    }
}

/// [`Team::for_each`] on the [`current`] team.
pub fn for_each(tasks: usize, run: impl Fn(usize) + Sync) {
    current().for_each(tasks, run)
}

/// `run(index, chunk)` for each `chunk`-long piece of `data` (the last may
/// be shorter), on the [`current`] team. Pieces are taken in runs, four
/// runs per thread: one task per piece would make a counter that every
/// thread takes from many times per microsecond (an epilogue of 2048
/// rows of 49 values spent more time there than in its arithmetic).
pub fn for_each_chunk<T: Send>(data: &mut [T], chunk: usize, run: impl Fn(usize, &mut [T]) + Sync) {
    assert!(chunk > 0, "chunk length 0");
    let len = data.len();
    let pieces = len.div_ceil(chunk);
    let per_task = pieces.div_ceil(4 * threads()).max(1);
    let base = SendPtr(data.as_mut_ptr());
    for_each(pieces.div_ceil(per_task), |task| {
        for index in task * per_task..((task + 1) * per_task).min(pieces) {
            let start = index * chunk;
            let end = (start + chunk).min(len);
            // SAFETY: the pieces are disjoint and within `data`, which is
            // borrowed mutably for the whole step.
            let piece =
                unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
            run(index, piece)
        }
    });
}

/// A pointer the tasks of one step share; each writes its own part.
struct SendPtr<T>(*mut T);
// SAFETY: used only to hand disjoint chunks to the tasks of one step.
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once() {
        let team = Team::new(3, Duration::from_micros(50));
        for tasks in [0, 1, 2, 3, 7, 100] {
            let seen: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
            team.for_each(tasks, |t| {
                seen[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                seen.iter().all(|s| s.load(Ordering::Relaxed) == 1),
                "{tasks} tasks"
            );
        }
    }

    #[test]
    fn helpers_that_fell_asleep_wake_for_the_next_step() {
        let team = Team::new(2, Duration::ZERO);
        let helper_ran = AtomicU64::new(0);
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(2));
            let me = std::thread::current().id();
            // Each task waits for a while, so that the helper takes some.
            team.for_each(8, |_| {
                if std::thread::current().id() != me {
                    helper_ran.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_micros(300));
            });
        }
        assert!(
            helper_ran.load(Ordering::Relaxed) > 0,
            "the helper never took a task"
        );
    }

    #[test]
    fn resting_helpers_sleep_at_once_and_wake_for_the_next_step() {
        // A spin budget far longer than the test: only `rest` sends the
        // helper to sleep.
        let team = Team::new(2, Duration::from_secs(3600));
        let count = AtomicU64::new(0);
        team.for_each(4, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        team.rest();
        let asked = Instant::now();
        while team.sleepers.load(Ordering::SeqCst) == 0 {
            assert!(
                asked.elapsed() < Duration::from_secs(10),
                "the helper kept spinning"
            );
            std::thread::yield_now();
        }
        team.for_each(4, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn a_step_inside_a_task_runs_inline() {
        let team = Team::new(2, Duration::from_micros(50));
        let total = AtomicU64::new(0);
        team.for_each(4, |_| {
            team.for_each(5, |_| {
                total.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 20);
    }

    #[test]
    fn a_panic_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(2, Duration::from_micros(50));
        for _ in 0..5 {
            let result =
                panic::catch_unwind(|| team.for_each(16, |t| assert!(t != 9, "task 9 fails")));
            assert!(result.is_err());
        }
        let count = AtomicU64::new(0);
        team.for_each(16, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 16);
    }

    #[test]
    fn callers_on_several_threads_take_turns() {
        let team = Team::new(2, Duration::from_micros(50));
        let total = AtomicU64::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..200 {
                        team.for_each(3, |t| {
                            total.fetch_add(t as u64 + 1, Ordering::Relaxed);
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 200 * 6);
    }

    #[test]
    fn chunks_cover_the_slice() {
        let mut data = vec![0usize; 103];
        for_each_chunk(&mut data, 10, |index, piece| {
            for (j, v) in piece.iter_mut().enumerate() {
                *v = index * 10 + j;
            }
        });
        assert!(data.iter().enumerate().all(|(i, &v)| i == v));
    }
}
