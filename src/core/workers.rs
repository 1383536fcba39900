//! Threads of their own for CPU-heavy jobs that must not slow deliveries (Argon2id password
//! hashes, `accounts.rs`): a few OS threads at the lowest CPU priority, fed by a bounded queue.
//!
//! Not tokio's blocking pool: a hash keeps a core busy for tens of milliseconds, and at the
//! priority of everything else a login flood takes that core from the runtime's threads
//! (measured in docs/PERFORMANCE.md). A thread's priority, once lowered, cannot be raised again
//! without privileges, so the threads that hash do nothing else: the blocking pool's threads
//! also read history for joins.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

/// The nice value of the worker threads (Linux): the lowest priority. The scheduler gives
/// them the CPU the rest of the process and the machine leave.
pub const NICE: i32 = 19;

type Job = Box<dyn FnOnce() + Send>;

/// Why a job did not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WorkError {
    /// The queue is full: every thread is busy and `queue` jobs wait.
    #[error("every worker is busy and the queue is full")]
    Busy,
    /// The job panicked, or the workers are gone.
    #[error("the worker stopped")]
    Stopped,
}

/// The workers. Dropping this ends the threads once the queue is empty.
pub struct Workers {
    queue: SyncSender<Job>,
}

impl Workers {
    /// Starts `threads` threads (at least one) named `name-N`, with room for `queue` waiting
    /// jobs.
    pub fn new(name: &str, threads: usize, queue: usize) -> std::io::Result<Workers> {
        let (tx, rx) = sync_channel::<Job>(queue);
        // One receiver for every thread: whichever is idle takes the next job. The lock is
        // held by the one thread waiting in `recv`, never while a job runs.
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || work(&rx))?;
        }
        Ok(Workers { queue: tx })
    }

    /// Runs `job` on a worker; `Busy` at once when the queue is full. Cancel-safe: dropped
    /// before a worker takes the job, the job is skipped; dropped while it runs, it finishes.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, WorkError> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            // Nobody waits for the answer any more: spare the CPU.
            if !tx.is_closed() {
                let _ = tx.send(job());
            }
        });
        self.queue.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => WorkError::Busy,
            TrySendError::Disconnected(_) => WorkError::Stopped,
        })?;
        rx.await.map_err(|_| WorkError::Stopped)
    }
}

/// A worker thread's life: lower its priority, then run jobs until the queue is dropped.
fn work(rx: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        match job {
            // A panicking job ends its answer (the caller gets `Stopped`), not the thread.
            Ok(job) => {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
            }
            Err(_) => return,
        }
    }
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    let me = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(me), NICE) {
        tracing::warn!(error = %e, "cannot lower the priority of a hashing thread");
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn jobs_run_at_the_lowest_priority() {
        let w = Workers::new("test-worker", 2, 4).unwrap();
        assert_eq!(w.run(|| 6 * 7).await, Ok(42));
        #[cfg(target_os = "linux")]
        {
            let nice = w
                .run(|| rustix::process::getpriority_process(Some(rustix::thread::gettid())))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(nice, NICE);
        }
        let name = w
            .run(|| std::thread::current().name().map(str::to_owned))
            .await
            .unwrap();
        assert!(name.is_some_and(|n| n.starts_with("test-worker-")));
        // A panic answers `Stopped` and leaves the worker able to run the next job.
        assert_eq!(
            w.run(|| panic!("boom")).await,
            Err::<(), _>(WorkError::Stopped)
        );
        assert_eq!(w.run(|| 1).await, Ok(1));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_is_refused_not_grown() {
        use futures_util::FutureExt;
        let w = Workers::new("test-queue", 1, 2).unwrap();
        let (running_tx, running_rx) = std::sync::mpsc::channel();
        let release = Arc::new(std::sync::Barrier::new(2));
        // The only thread runs one job until released.
        let mut held = Box::pin(w.run({
            let release = release.clone();
            move || {
                let _ = running_tx.send(());
                release.wait();
            }
        }));
        assert!((&mut held).now_or_never().is_none());
        tokio::task::spawn_blocking(move || running_rx.recv_timeout(Duration::from_secs(5)))
            .await
            .unwrap()
            .expect("the held job started");
        // Two wait in the queue (their first poll queues them); the next is refused at once.
        let mut queued: Vec<_> = (0..2).map(|_| Box::pin(w.run(|| 1))).collect();
        for q in &mut queued {
            assert!(q.now_or_never().is_none());
        }
        assert_eq!(w.run(|| 1).now_or_never(), Some(Err(WorkError::Busy)));
        release.wait();
        assert_eq!(held.await, Ok(()));
        for q in queued {
            assert_eq!(q.await, Ok(1));
        }
    }
}
