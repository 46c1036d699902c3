//! The dynamic batcher: one per model, one dedicated worker thread.
//!
//! Requests are split into one job per image and admitted against a fixed
//! capacity (a full queue is refused at once, never waited on). The worker
//! forms a batch when `max_batch_size` jobs wait or `max_queue_delay` has
//! passed since the first of them, whichever comes first; jobs whose
//! deadline has passed, or whose caller has gone, are dropped before the
//! forward pass so that expired work is never computed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus::{Histogram, IntCounter, IntGauge};
use serde::Serialize;
use tokio::sync::oneshot;

/// Batching settings of one model.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct BatchSettings {
    pub max_batch_size: usize,
    #[serde(rename = "max_queue_delay_ms", serialize_with = "as_millis")]
    pub max_queue_delay: Duration,
    /// Images admitted and not yet computed, at most.
    pub queue_capacity: usize,
    /// Deadline of a request that asks for none.
    #[serde(rename = "request_timeout_ms", serialize_with = "as_millis")]
    pub request_timeout: Duration,
}

fn as_millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

/// What runs a batch: the model's forward pass and its postprocessing.
pub trait BatchRunner: Send + 'static {
    type Input: Send + 'static;
    type Output: Send + 'static;
    /// One output per input, in order.
    fn run(&mut self, inputs: Vec<Self::Input>) -> anyhow::Result<Vec<Self::Output>>;
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum JobError {
    #[error("the deadline passed before the image was computed")]
    DeadlineExceeded,
    #[error("inference failed: {0}")]
    Failed(String),
    /// The device had no memory left for this batch. The batch fails, the
    /// model keeps serving: a smaller or later batch may fit.
    #[error("the device ran out of memory: {0}")]
    OutOfMemory(String),
}

impl JobError {
    /// A failed forward pass, told apart by what the device reported:
    /// CUDA's driver and cuBLAS/cuDNN allocation errors, Metal's buffer
    /// allocation failures.
    pub fn from_failure(message: String) -> Self {
        let lower = message.to_ascii_lowercase();
        let out_of_memory = [
            "out_of_memory",
            "out of memory",
            "alloc_failed",
            "failed to allocate",
            "insufficient memory",
        ]
        .iter()
        .any(|sign| lower.contains(sign));
        if out_of_memory {
            JobError::OutOfMemory(message)
        } else {
            JobError::Failed(message)
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the queue is full ({capacity} images)")]
    QueueFull { capacity: usize },
    #[error("the model is shutting down")]
    Closed,
}

/// How a job went through the batcher.
#[derive(Clone, Copy, Debug)]
pub struct JobTiming {
    pub queued: Duration,
    pub inference: Duration,
    pub batch_size: usize,
}

pub type JobResult<O> = Result<(O, JobTiming), JobError>;

struct Job<I, O> {
    input: I,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<JobResult<O>>,
}

/// The metrics a batcher updates, already bound to its model's labels.
#[derive(Clone)]
pub struct BatchMetrics {
    pub queue_duration: Histogram,
    pub inference_duration: Histogram,
    pub batch_size: Histogram,
    pub queue_depth: IntGauge,
    pub images: IntCounter,
    /// Failed forward passes: out of device memory, and anything else.
    pub out_of_memory: IntCounter,
    pub errors: IntCounter,
}

pub struct Batcher<I, O> {
    settings: BatchSettings,
    sender: Mutex<Option<mpsc::Sender<Job<I, O>>>>,
    pending: Arc<AtomicUsize>,
    worker: Mutex<Option<JoinHandle<()>>>,
    metrics: BatchMetrics,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    pub fn spawn<R>(name: &str, settings: BatchSettings, runner: R, metrics: BatchMetrics) -> Self
    where
        R: BatchRunner<Input = I, Output = O>,
    {
        let (tx, rx) = mpsc::channel();
        let pending = Arc::new(AtomicUsize::new(0));
        let worker = Worker {
            rx,
            runner,
            settings: settings.clone(),
            pending: pending.clone(),
            metrics: metrics.clone(),
        };
        let handle = std::thread::Builder::new()
            .name(format!("batch-{name}"))
            .spawn(move || worker.run())
            .expect("spawn batch worker");
        Batcher {
            settings,
            sender: Mutex::new(Some(tx)),
            pending,
            worker: Mutex::new(Some(handle)),
            metrics,
        }
    }

    pub fn settings(&self) -> &BatchSettings {
        &self.settings
    }

    /// Images admitted and not yet taken into a forward pass.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Admit all of `inputs` or none of them.
    pub fn submit(
        &self,
        inputs: Vec<I>,
        deadline: Instant,
    ) -> Result<Vec<oneshot::Receiver<JobResult<O>>>, SubmitError> {
        let n = inputs.len();
        let capacity = self.settings.queue_capacity;
        let sender = self.sender.lock().expect("sender lock").clone();
        let sender = sender.ok_or(SubmitError::Closed)?;
        self.pending
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |p| {
                (p + n <= capacity).then_some(p + n)
            })
            .map_err(|_| SubmitError::QueueFull { capacity })?;
        self.metrics.queue_depth.set(self.pending() as i64);
        let now = Instant::now();
        let mut receivers = Vec::with_capacity(n);
        for input in inputs {
            let (reply, rx) = oneshot::channel();
            let job = Job {
                input,
                enqueued: now,
                deadline,
                reply,
            };
            if sender.send(job).is_err() {
                self.pending.fetch_sub(1, Ordering::SeqCst);
                return Err(SubmitError::Closed);
            }
            receivers.push(rx);
        }
        Ok(receivers)
    }

    /// Stop admitting work, let the worker finish everything queued, and
    /// wait for it.
    pub fn shutdown(&self) {
        self.sender.lock().expect("sender lock").take();
        if let Some(handle) = self.worker.lock().expect("worker lock").take() {
            let _ = handle.join();
        }
    }
}

impl<I, O> Drop for Batcher<I, O> {
    fn drop(&mut self) {
        // Dropping the sender lets the worker drain and exit on its own.
        if let Ok(mut s) = self.sender.lock() {
            s.take();
        }
    }
}

struct Worker<R: BatchRunner> {
    rx: mpsc::Receiver<Job<R::Input, R::Output>>,
    runner: R,
    settings: BatchSettings,
    pending: Arc<AtomicUsize>,
    metrics: BatchMetrics,
}

impl<R: BatchRunner> Worker<R> {
    fn run(mut self) {
        // `recv` keeps returning queued jobs after the sender is dropped,
        // so everything admitted before shutdown is answered.
        while let Ok(first) = self.rx.recv() {
            let batch = self.fill(first);
            self.process(batch);
        }
    }

    /// Collect up to `max_batch_size` jobs, waiting at most until
    /// `max_queue_delay` after the first one was enqueued.
    fn fill(&self, first: Job<R::Input, R::Output>) -> Vec<Job<R::Input, R::Output>> {
        let close_at = first.enqueued + self.settings.max_queue_delay;
        let mut batch = vec![first];
        while batch.len() < self.settings.max_batch_size {
            let now = Instant::now();
            let next = if now >= close_at {
                match self.rx.try_recv() {
                    Ok(job) => job,
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            } else {
                match self.rx.recv_timeout(close_at - now) {
                    Ok(job) => job,
                    Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                }
            };
            batch.push(next);
        }
        batch
    }

    fn process(&mut self, batch: Vec<Job<R::Input, R::Output>>) {
        let start = Instant::now();
        self.pending.fetch_sub(batch.len(), Ordering::SeqCst);
        self.metrics
            .queue_depth
            .set(self.pending.load(Ordering::SeqCst) as i64);

        let mut inputs = Vec::with_capacity(batch.len());
        let mut live = Vec::with_capacity(batch.len());
        for job in batch {
            if job.reply.is_closed() {
                continue; // the caller gave up: nobody wants the answer
            }
            if job.deadline <= start {
                let _ = job.reply.send(Err(JobError::DeadlineExceeded));
                continue;
            }
            inputs.push(job.input);
            live.push((job.enqueued, job.reply));
        }
        if live.is_empty() {
            return;
        }
        let n = live.len();
        let result = catch_unwind(AssertUnwindSafe(|| self.runner.run(inputs)));
        let inference = start.elapsed();
        self.metrics
            .inference_duration
            .observe(inference.as_secs_f64());
        self.metrics.batch_size.observe(n as f64);
        let outputs = match result {
            Ok(Ok(outputs)) if outputs.len() == n => Ok(outputs),
            Ok(Ok(outputs)) => Err(format!("{} outputs for {n} inputs", outputs.len())),
            Ok(Err(e)) => Err(format!("{e:#}")),
            Err(_) => Err("the forward pass panicked".to_string()),
        };
        match outputs {
            Ok(outputs) => {
                self.metrics.images.inc_by(n as u64);
                for ((enqueued, reply), output) in live.into_iter().zip(outputs) {
                    let queued = start.duration_since(enqueued);
                    self.metrics.queue_duration.observe(queued.as_secs_f64());
                    let timing = JobTiming {
                        queued,
                        inference,
                        batch_size: n,
                    };
                    let _ = reply.send(Ok((output, timing)));
                }
            }
            Err(message) => {
                tracing::error!(error = %message, batch = n, "batch failed");
                let error = JobError::from_failure(message);
                match error {
                    JobError::OutOfMemory(_) => self.metrics.out_of_memory.inc(),
                    _ => self.metrics.errors.inc(),
                }
                for (_, reply) in live {
                    let _ = reply.send(Err(error.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    /// Doubles its inputs and records the batch sizes it saw.
    struct Doubler {
        sizes: Arc<Mutex<Vec<usize>>>,
        gate: Arc<AtomicBool>,
    }

    impl BatchRunner for Doubler {
        type Input = i32;
        type Output = i32;
        fn run(&mut self, inputs: Vec<i32>) -> anyhow::Result<Vec<i32>> {
            while !self.gate.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.sizes.lock().unwrap().push(inputs.len());
            if inputs.contains(&-1) {
                panic!("poisoned input");
            }
            if inputs.contains(&-2) {
                // What candle passes on from CUDA's driver (cudarc's DriverError).
                anyhow::bail!("conv2d: DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
            }
            Ok(inputs.into_iter().map(|x| x * 2).collect())
        }
    }

    fn metrics() -> BatchMetrics {
        let m = crate::metrics::Metrics::new();
        BatchMetrics {
            queue_duration: m.queue_duration.with_label_values(&["t"]),
            inference_duration: m.inference_duration.with_label_values(&["t"]),
            batch_size: m.batch_size.with_label_values(&["t"]),
            queue_depth: m.queue_depth.with_label_values(&["t"]),
            images: m.images_total.with_label_values(&["t"]),
            out_of_memory: m.batch_failures.with_label_values(&["t", "out_of_memory"]),
            errors: m.batch_failures.with_label_values(&["t", "error"]),
        }
    }

    fn settings(max_batch_size: usize, delay_ms: u64, capacity: usize) -> BatchSettings {
        BatchSettings {
            max_batch_size,
            max_queue_delay: Duration::from_millis(delay_ms),
            queue_capacity: capacity,
            request_timeout: Duration::from_secs(10),
        }
    }

    type Spawned = (Batcher<i32, i32>, Arc<Mutex<Vec<usize>>>, Arc<AtomicBool>);

    fn spawn(s: BatchSettings, open: bool) -> Spawned {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(AtomicBool::new(open));
        let runner = Doubler {
            sizes: sizes.clone(),
            gate: gate.clone(),
        };
        (Batcher::spawn("t", s, runner, metrics()), sizes, gate)
    }

    fn far() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn results(rxs: Vec<oneshot::Receiver<JobResult<i32>>>) -> Vec<Result<i32, JobError>> {
        rxs.into_iter()
            .map(|rx| rx.blocking_recv().expect("answered").map(|(o, _)| o))
            .collect()
    }

    #[test]
    fn jobs_of_one_request_share_a_batch() {
        let (b, sizes, _) = spawn(settings(8, 200, 16), true);
        let rxs = b.submit(vec![1, 2, 3], far()).unwrap();
        assert_eq!(results(rxs), vec![Ok(2), Ok(4), Ok(6)]);
        assert_eq!(*sizes.lock().unwrap(), vec![3]);
    }

    #[test]
    fn a_full_batch_does_not_wait_for_the_delay() {
        let (b, sizes, _) = spawn(settings(2, 60_000, 16), true);
        let rxs = b.submit(vec![1, 2], far()).unwrap();
        assert_eq!(results(rxs), vec![Ok(2), Ok(4)]);
        assert_eq!(*sizes.lock().unwrap(), vec![2]);
    }

    #[test]
    fn separate_requests_are_batched_within_the_delay() {
        let (b, sizes, _) = spawn(settings(8, 300, 16), true);
        let first = b.submit(vec![1], far()).unwrap();
        let second = b.submit(vec![2], far()).unwrap();
        assert_eq!(results(first), vec![Ok(2)]);
        assert_eq!(results(second), vec![Ok(4)]);
        assert_eq!(*sizes.lock().unwrap(), vec![2]);
    }

    #[test]
    fn a_full_queue_is_refused_at_once_and_whole() {
        // The runner is held shut: the worker takes image 1 into a batch
        // and blocks, so image 2 stays pending.
        let (b, _, gate) = spawn(settings(1, 0, 2), false);
        let held = b.submit(vec![1, 2], far()).unwrap();
        while b.pending() != 1 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            b.submit(vec![3, 4], far()).unwrap_err(),
            SubmitError::QueueFull { capacity: 2 }
        );
        let fits = b.submit(vec![5], far()).unwrap();
        gate.store(true, Ordering::SeqCst);
        assert_eq!(results(held), vec![Ok(2), Ok(4)]);
        assert_eq!(results(fits), vec![Ok(10)]);
    }

    #[test]
    fn expired_jobs_are_never_computed() {
        let (b, sizes, _) = spawn(settings(8, 100, 16), true);
        let soon = Instant::now() + Duration::from_millis(10);
        let rxs = b.submit(vec![1, 2], soon).unwrap();
        assert_eq!(
            results(rxs),
            vec![
                Err(JobError::DeadlineExceeded),
                Err(JobError::DeadlineExceeded)
            ]
        );
        assert!(sizes.lock().unwrap().is_empty(), "nothing ran");
    }

    #[test]
    fn a_panicking_batch_fails_its_jobs_and_the_worker_goes_on() {
        let (b, _, _) = spawn(settings(8, 0, 16), true);
        let bad = b.submit(vec![-1], far()).unwrap();
        assert!(matches!(results(bad)[0], Err(JobError::Failed(_))));
        let good = b.submit(vec![4], far()).unwrap();
        assert_eq!(results(good), vec![Ok(8)]);
    }

    #[test]
    fn out_of_memory_fails_its_batch_and_the_model_keeps_serving() {
        let m = metrics();
        let (out_of_memory, errors) = (m.out_of_memory.clone(), m.errors.clone());
        let runner = Doubler {
            sizes: Default::default(),
            gate: Arc::new(AtomicBool::new(true)),
        };
        let b = Batcher::spawn("t", settings(8, 0, 16), runner, m);
        let big = b.submit(vec![1, -2], far()).unwrap();
        for result in results(big) {
            assert!(
                matches!(&result, Err(JobError::OutOfMemory(m)) if m.contains("CUDA_ERROR_OUT_OF_MEMORY")),
                "{result:?}"
            );
        }
        let good = b.submit(vec![4], far()).unwrap();
        assert_eq!(results(good), vec![Ok(8)]);
        assert_eq!((out_of_memory.get(), errors.get()), (1, 0));
    }

    #[test]
    fn device_memory_errors_are_told_apart() {
        for message in [
            "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")",
            "matmul: CublasError(CUBLAS_STATUS_ALLOC_FAILED)",
            "cudnn: CUDNN_STATUS_ALLOC_FAILED",
            "Metal error: failed to allocate buffer",
        ] {
            let e = JobError::from_failure(message.into());
            assert!(matches!(e, JobError::OutOfMemory(_)), "{message}");
        }
        for message in ["shape mismatch in conv2d", "the forward pass panicked"] {
            let e = JobError::from_failure(message.into());
            assert!(matches!(e, JobError::Failed(_)), "{message}");
        }
    }

    #[test]
    fn shutdown_answers_everything_queued_then_refuses() {
        let (b, _, gate) = spawn(settings(1, 0, 16), false);
        let rxs = b.submit(vec![1, 2, 3], far()).unwrap();
        let opener = {
            let gate = gate.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                gate.store(true, Ordering::SeqCst);
            })
        };
        b.shutdown();
        opener.join().unwrap();
        assert_eq!(results(rxs), vec![Ok(2), Ok(4), Ok(6)]);
        assert_eq!(b.submit(vec![1], far()).unwrap_err(), SubmitError::Closed);
    }
}
