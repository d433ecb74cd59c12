//! The virtio-9p worker pool: filesystem calls block, so requests are served off the event
//! loop.
//!
//! The event loop pops descriptor chains and [`WorkerPool::submit`]s them as [`Job`]s; N
//! threads take jobs from a shared FIFO and run [`p9::Server::handle_message`] directly on
//! the chain's guest buffers ([`serve_chain`]). A finished job becomes a [`Completion`]
//! `(generation, head, len)` pushed onto a list, and the pool's completion EventFd is
//! signalled; the event loop ([`WorkerPool::take_completions`]) then adds the used entries
//! and raises one interrupt for the whole batch. One slow request (fsync, a large read)
//! occupies one worker; the others keep serving.
//!
//! Each activation of the device is a *generation*. [`WorkerPool::reset`] bumps it, drops
//! queued jobs and stale completions, and waits (bounded) for requests already running;
//! a job whose generation is no longer current is skipped without touching guest memory,
//! and the event loop drops completions of older generations.
//!
//! Threads start on the first activation ([`WorkerPool::start`]), not at construction. If no
//! thread could be started, requests are served inline on the event loop (slow, but correct).

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use p9::wire::HEADER_LEN;
use p9::Server;
use tracing::{debug, error, warn};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::direct::ChainIo;
use super::P9Metrics;
use crate::virtio::lock;

/// Guest memory as shared with the workers.
pub type SharedMem = Arc<GuestMemoryMmap>;
/// A descriptor chain a worker can own.
pub type Chain = DescriptorChain<SharedMem>;

/// Test hook run by a worker before serving a request, with the request's 9P tag.
#[cfg(test)]
pub(crate) type TestHook = Arc<dyn Fn(u16) + Send + Sync>;

/// One request for the pool: a popped chain, the session it belongs to, its generation.
pub struct Job {
    /// Generation (activation) the chain was popped in.
    pub generation: u64,
    /// The 9P session of that activation.
    pub server: Arc<Server>,
    /// The descriptor chain: T-message, then room for the R-message.
    pub chain: Chain,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("generation", &self.generation)
            .field("head", &self.chain.head_index())
            .finish()
    }
}

/// A served request, to become a used entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Generation of the job.
    pub generation: u64,
    /// Head descriptor index of the chain.
    pub head: u16,
    /// Bytes written into the chain (the R-message), 0 for a malformed chain.
    pub len: u32,
}

#[derive(Debug, Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Jobs taken by a worker and not yet finished.
    running: usize,
    shutdown: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a job is queued or on shutdown.
    work: Condvar,
    /// Signalled when `running` drops to 0.
    idle: Condvar,
    done: Mutex<Vec<Completion>>,
    done_evt: EventFd,
    generation: AtomicU64,
    metrics: Arc<P9Metrics>,
    #[cfg(test)]
    hook: Mutex<Option<TestHook>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("queue", &self.queue)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

/// A pool of threads serving 9P requests for one device.
#[derive(Debug)]
pub struct WorkerPool {
    shared: Arc<Shared>,
    workers: usize,
    started: usize,
}

impl WorkerPool {
    /// A pool of `workers` threads (started later by [`WorkerPool::start`]).
    pub fn new(workers: usize, metrics: Arc<P9Metrics>) -> io::Result<Self> {
        Ok(Self {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                work: Condvar::new(),
                idle: Condvar::new(),
                done: Mutex::new(Vec::new()),
                done_evt: EventFd::new(EFD_NONBLOCK)?,
                generation: AtomicU64::new(0),
                metrics,
                #[cfg(test)]
                hook: Mutex::new(None),
            }),
            workers,
            started: 0,
        })
    }

    /// Start the threads not started yet. On failure the threads already running serve
    /// alone (none: requests are served inline).
    pub fn start(&mut self, name: &str) {
        while self.started < self.workers {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{}", self.started))
                .spawn(move || worker_loop(&shared));
            match spawned {
                // The thread is detached; it exits when the pool is dropped.
                Ok(_) => self.started += 1,
                Err(e) => {
                    error!("virtio-9p: cannot start a worker thread: {e}");
                    return;
                }
            }
        }
    }

    /// Number of running worker threads.
    pub fn threads(&self) -> usize {
        self.started
    }

    /// The EventFd signalled when completions are ready.
    pub fn completion_evt(&self) -> &EventFd {
        &self.shared.done_evt
    }

    /// The current generation; stamp jobs with it.
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Acquire)
    }

    /// Queue `jobs` for the workers (or serve them here if no worker runs).
    pub fn submit(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        if self.started == 0 {
            for job in jobs {
                run_job(&self.shared, job);
            }
            return;
        }
        let n = jobs.len();
        lock(&self.shared.queue).jobs.extend(jobs);
        if n == 1 {
            self.shared.work.notify_one();
        } else {
            self.shared.work.notify_all();
        }
    }

    /// Completions finished since the last call (consumes the completion EventFd first, so a
    /// completion pushed afterwards signals it again).
    pub fn take_completions(&self) -> Vec<Completion> {
        if let Err(e) = self.shared.done_evt.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                warn!("virtio-9p: completion event read failed: {e}");
            }
        }
        std::mem::take(&mut *lock(&self.shared.done))
    }

    /// Start a new generation: queued jobs are dropped, completions of the old one are
    /// discarded, and requests already running are waited for up to `timeout`. Returns
    /// whether the pool went idle in time (if not, late completions are dropped on arrival).
    pub fn reset(&self, timeout: Duration) -> bool {
        self.shared.generation.fetch_add(1, Ordering::AcqRel);
        let deadline = Instant::now() + timeout;
        let mut q = lock(&self.shared.queue);
        let dropped = q.jobs.len();
        q.jobs.clear();
        P9Metrics::add(&self.shared.metrics.stale_completions, dropped as u64);
        while q.running > 0 {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            q = self
                .shared
                .idle
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let idle = q.running == 0;
        drop(q);
        let stale = std::mem::take(&mut *lock(&self.shared.done)).len();
        P9Metrics::add(&self.shared.metrics.stale_completions, stale as u64);
        idle
    }

    /// Number of requests queued or running.
    pub fn pending(&self) -> usize {
        let q = lock(&self.shared.queue);
        q.jobs.len() + q.running
    }

    #[cfg(test)]
    pub(crate) fn set_test_hook(&self, hook: Option<TestHook>) {
        *lock(&self.shared.hook) = hook;
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        let mut q = lock(&self.shared.queue);
        q.shutdown = true;
        q.jobs.clear();
        drop(q);
        self.shared.work.notify_all();
    }
}

fn worker_loop(shared: &Shared) {
    loop {
        let job = {
            let mut q = lock(&shared.queue);
            loop {
                if q.shutdown {
                    return;
                }
                if let Some(job) = q.jobs.pop_front() {
                    q.running += 1;
                    break job;
                }
                q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        run_job(shared, job);
        let mut q = lock(&shared.queue);
        q.running -= 1;
        if q.running == 0 {
            shared.idle.notify_all();
        }
    }
}

/// Serve `job` unless its generation is over, and publish the completion.
fn run_job(shared: &Shared, job: Job) {
    if job.generation != shared.generation.load(Ordering::Acquire) {
        // The device was reset after the chain was popped: leave guest memory alone.
        P9Metrics::inc(&shared.metrics.stale_completions);
        return;
    }
    #[cfg(test)]
    run_test_hook(shared, &job.chain);
    let head = job.chain.head_index();
    let len = catch_unwind(AssertUnwindSafe(|| {
        serve_chain(&job.server, &job.chain, &shared.metrics)
    }))
    .unwrap_or_else(|_| {
        error!(head, "virtio-9p: request handler panicked");
        P9Metrics::inc(&shared.metrics.invalid_requests);
        0
    });
    lock(&shared.done).push(Completion {
        generation: job.generation,
        head,
        len,
    });
    if let Err(e) = shared.done_evt.write(1) {
        error!("virtio-9p: cannot signal a completion: {e}");
        P9Metrics::inc(&shared.metrics.queue_errors);
    }
}

/// Call the test hook with the request's tag (if the chain has a readable header).
#[cfg(test)]
fn run_test_hook(shared: &Shared, chain: &Chain) {
    use std::io::Read;
    let Some(hook) = lock(&shared.hook).clone() else {
        return;
    };
    let mut hdr = [0u8; HEADER_LEN];
    if let Ok(mut r) = Reader::<()>::new(chain.memory(), chain.clone()) {
        if r.read_exact(&mut hdr).is_ok() {
            hook(u16::from_le_bytes([hdr[5], hdr[6]]));
        }
    }
}

/// Run one T-message of `chain` through `server`, writing the R-message into the chain
/// (file data of reads and writes moves directly between the file and the chain's guest
/// buffers: [`ChainIo`]). Returns the used length: the R-message's size, or 0 for a malformed chain (counted).
pub fn serve_chain(server: &Server, chain: &Chain, metrics: &P9Metrics) -> u32 {
    let head = chain.head_index();
    let mem = chain.memory();
    let invalid = |why: &dyn std::fmt::Display| {
        debug!(head, "virtio-9p: malformed chain: {why}");
        P9Metrics::inc(&metrics.invalid_requests);
        0
    };
    let mut reader: Reader<'_> = match Reader::new(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => return invalid(&e),
    };
    let mut writer: Writer<'_> = match Writer::new(mem, chain.clone()) {
        Ok(w) => w,
        Err(e) => return invalid(&e),
    };
    if writer.available_bytes() < HEADER_LEN {
        return invalid(&"no room for a reply");
    }
    if reader.available_bytes() < HEADER_LEN {
        return invalid(&"shorter than a 9P header");
    }
    let mut direct = match ChainIo::new(mem, chain) {
        Ok(d) => d,
        Err(e) => return invalid(&e),
    };
    match server.handle_direct(&mut reader, &mut writer, &mut direct) {
        Ok(len) => {
            P9Metrics::inc(&metrics.replies);
            P9Metrics::add(
                &metrics.request_bytes,
                (reader.bytes_read() + direct.written) as u64,
            );
            P9Metrics::add(&metrics.reply_bytes, len as u64);
            // A chain is at most 4 GiB (the descriptor iterator stops there).
            u32::try_from(len).unwrap_or(u32::MAX)
        }
        Err(e) => invalid(&e),
    }
}
