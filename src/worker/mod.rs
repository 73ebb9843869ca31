//! The worker: one `std::thread` that owns the training device and claims queued jobs oldest first
//! under a lease its heartbeat renews (`heartbeat.rs`), serving generation requests on the same
//! device (between a job's micro-batches, or when idle), plus the file/model checks that move a new
//! job from `validating_files` to `queued`. Other code talks to it through [`Worker`]'s methods
//! (wake, cancel, on_device, shutdown). A process runs either or both halves ([`Role`]): `sftd
//! serve` both, `sftd serve --no-worker` the checks, `sftd worker` the thread.

mod artifacts;
pub mod checkpoints;
mod estimate;
mod heartbeat;
mod liveness;
mod recorder;
mod recovery;
mod run;
mod serve;
mod submit;
pub mod sweep;

pub use run::{adapter_key, fine_tuned_model_name, job_dir, metrics_csv};
pub use serve::{DeviceLoan, DeviceTask, ServingModel};
pub use submit::{MemoryBudget, SubmitError};

use crate::hub::Hub;
use crate::storage::Storage;
use crate::store::{Claimant, JobRow, JobStatus, Lease, Store};
use crate::train::events::Control;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often an idle worker looks at the queue even without a wake-up (belt and braces; the
/// heartbeat also wakes it, to take over jobs whose lease expired).
const IDLE_POLL: Duration = Duration::from_secs(5);

/// How long a worker waits before its next claim after a run stopped because the artifact
/// storage was down (the job itself was requeued, for any worker).
const STORAGE_BACKOFF: Duration = Duration::from_secs(5);

/// `SFTD_PLACEMENT_GRACE_MS`'s default: time for workers started together to register.
pub const DEFAULT_PLACEMENT_GRACE: Duration = Duration::from_secs(120);

/// Which halves of the worker this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Checks new jobs and trains (`sftd serve`).
    All,
    /// Checks new jobs; other processes train them (`sftd serve --no-worker`).
    Api,
    /// Trains; other processes accept and check jobs (`sftd worker`).
    Trainer,
}

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub role: Role,
    /// `cpu`, `cuda:N` or `auto`.
    pub device: String,
    /// Interruptions (crash, lost lease) a job survives; the next one fails it.
    pub max_attempts: u32,
    /// How long a claim lasts without a heartbeat.
    pub lease: Duration,
    /// How often the heartbeat renews the lease and reports the worker.
    pub heartbeat: Duration,
    /// How long a queued job too big for every live worker (and this worker itself) must have
    /// been around before the job is failed (`estimate.rs`).
    pub placement_grace: Duration,
}

impl WorkerOptions {
    /// Both halves, with the default lease (30 s) and heartbeat (5 s).
    pub fn all(device: &str, max_attempts: u32) -> Self {
        Self {
            role: Role::All,
            device: device.into(),
            max_attempts,
            lease: Duration::from_secs(30),
            heartbeat: Duration::from_secs(5),
            placement_grace: DEFAULT_PLACEMENT_GRACE,
        }
    }

    fn trains(&self) -> bool {
        self.role != Role::Api
    }

    fn checks(&self) -> bool {
        self.role != Role::Trainer
    }
}

enum Command {
    /// A job may have been queued.
    Wake,
    /// Finish (the running job has been asked to suspend) and exit.
    Shutdown,
}

/// What the worker thread needs besides the job.
struct Ctx {
    store: Store,
    storage: Storage,
    hub: Hub,
    rt: tokio::runtime::Handle,
    device: String,
    claimant: Claimant,
    max_attempts: u32,
    /// The device's memory, for estimating queued jobs that have no estimate.
    memory: Option<MemoryBudget>,
    /// See [`WorkerOptions::placement_grace`].
    placement_grace: Duration,
    /// When this worker started, for the placement grace.
    started: std::time::Instant,
    /// Whether a run's local copies are deleted when it ends: in `sftd worker` only. In
    /// `sftd serve` the API half shares the data dir and answers chat from those copies.
    drops_local_copies: bool,
}

/// The job the thread is running: the lease its writes carry and the flag that steers it.
struct Running {
    lease: Lease,
    control: Control,
}

/// State shared between the handle, the thread and the heartbeat.
struct Shared {
    current: Mutex<Option<Running>>,
    shutting_down: AtomicBool,
    alive: AtomicBool,
    /// Whether the thread, while up, still comes round to take jobs.
    liveness: liveness::Liveness,
    /// Generation tasks waiting for the device.
    tasks: Arc<serve::TaskQueue>,
}

/// Clears `alive` (so `/readyz` answers 503) however the worker thread ends: returning, or
/// unwinding from a panic outside the job's own `catch_unwind`.
struct ClearOnExit(Arc<Shared>);

impl Drop for ClearOnExit {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::SeqCst);
        self.0.tasks.clear();
        if std::thread::panicking() {
            tracing::error!("the worker thread panicked; the server is no longer ready");
        }
    }
}

/// Handle to the worker thread. Cheap to clone; the thread exits on [`Worker::shutdown`].
#[derive(Clone)]
pub struct Worker {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    thread: Arc<Mutex<Option<JoinHandle<()>>>>,
    store: Store,
    hub: Hub,
    validations: tokio::sync::mpsc::UnboundedSender<JobRow>,
    /// The device's memory, for the creation-time check (`None`: no device, no check).
    memory: Option<MemoryBudget>,
    /// This process's id in the worker registry, when it trains.
    id: Option<String>,
}

impl Worker {
    /// [`Worker::start_with`] for `sftd serve`: both halves, default lease and heartbeat.
    pub async fn start(
        store: Store,
        storage: Storage,
        hub: Hub,
        device: String,
        max_attempts: u32,
    ) -> crate::store::Result<Self> {
        Self::start_with(
            store,
            storage,
            hub,
            WorkerOptions::all(&device, max_attempts),
        )
        .await
    }

    /// Starts the halves `opts.role` names. Checking: re-validates jobs left validating.
    /// Training: registers the worker, requeues jobs whose holder is gone (at start-up of the
    /// database's only process, every running job; a job interrupted `max_attempts` times
    /// fails instead, with a message naming the last step reached) and starts the thread and
    /// its heartbeat. Must be called inside the tokio runtime.
    pub async fn start_with(
        store: Store,
        storage: Storage,
        hub: Hub,
        opts: WorkerOptions,
    ) -> crate::store::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            liveness: liveness::Liveness::new(opts.lease),
            tasks: Default::default(),
        });
        let (validations, pending) = tokio::sync::mpsc::unbounded_channel();
        let memory = MemoryBudget::probe(&opts.device);
        if opts.checks() {
            tokio::spawn(validation_loop(
                store.clone(),
                storage.clone(),
                hub.clone(),
                tx.clone(),
                pending,
                // An API-only node's device is not where jobs run: it estimates nothing.
                memory.clone().filter(|_| opts.trains()),
            ));
        }
        let mut worker = Self {
            validations,
            tx,
            shared: shared.clone(),
            thread: Arc::new(Mutex::new(None)),
            store: store.clone(),
            hub: hub.clone(),
            memory: memory.clone().filter(|_| opts.trains()),
            id: None,
        };
        if opts.checks() {
            for job in store.validating_jobs().await? {
                worker.validate(job);
            }
        }
        if !opts.trains() {
            let device = opts.device.clone();
            worker.spawn("sftd-serving", shared, move |shared| {
                serving_main(&device, rx, shared)
            });
            return Ok(worker);
        }
        for job in store.orphaned_jobs(true).await? {
            recovery::recover_interrupted(&store, &job, opts.max_attempts).await?;
        }
        let id = crate::store::new_id("wrk");
        let claimant = Claimant {
            worker_id: id.clone(),
            // The share of the memory a job may use, as the creation-time check judges.
            memory_bytes: memory.as_ref().map(|m| {
                (m.info.available_memory_bytes as f64 * crate::train::memory::USABLE_FRACTION)
                    as u64
            }),
            lease: opts.lease,
            unestimated_ok: None,
        };
        heartbeat::start(&store, &id, &opts, memory.as_ref(), &worker).await?;
        let wake = worker.tx.clone();
        store.on_queue_change(move || {
            let _ = wake.send(Command::Wake);
        });
        let rt = tokio::runtime::Handle::current();
        let ctx = Ctx {
            store,
            storage,
            hub,
            rt,
            device: opts.device.clone(),
            claimant,
            max_attempts: opts.max_attempts,
            memory,
            placement_grace: opts.placement_grace,
            started: std::time::Instant::now(),
            drops_local_copies: opts.role == Role::Trainer,
        };
        worker.spawn("sftd-worker", shared, move |shared| {
            thread_main(ctx, rx, shared)
        });
        worker.id = Some(id);
        Ok(worker)
    }

    /// Starts the thread that owns the device, which marks the worker stopped when it ends.
    fn spawn(&self, name: &str, shared: Arc<Shared>, body: impl FnOnce(&Shared) + Send + 'static) {
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _alive = ClearOnExit(shared.clone());
                body(&shared);
            })
            .expect("spawning the device thread");
        *self.thread.lock().expect("worker thread lock") = Some(thread);
    }

    /// Tells the thread to look at the queue.
    pub fn notify(&self) {
        let _ = self.tx.send(Command::Wake);
    }

    /// Stops the job if it is the one running here (the status change itself is the store's;
    /// a worker in another process sees it at its next write or heartbeat).
    pub fn cancel(&self, job_id: &str) {
        if let Some(run) = self.shared.current.lock().expect("worker lock").as_ref() {
            if run.lease.job_id == job_id {
                run.control.cancel();
            }
        }
    }

    /// Queues `task` to run on the worker thread with the device: between the running job's
    /// micro-batches, or as soon as the thread is free when no job trains. `false` when the
    /// thread is not running (the task is dropped).
    pub fn on_device(&self, task: DeviceTask) -> bool {
        if !self.is_alive() || self.shared.shutting_down.load(Ordering::SeqCst) {
            return false;
        }
        self.shared.tasks.push(task);
        let _ = self.tx.send(Command::Wake);
        if !self.is_alive() {
            // The thread ended meanwhile: nothing will run what it left queued.
            self.shared.tasks.clear();
        }
        true
    }

    /// This process's id in the worker registry (`None`: it does not train).
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Whether the thread is up (for `/readyz`).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Whether this process's worker thread is up but stuck: neither training nor generating,
    /// it has not come round to the queue for a whole lease (for `/readyz`). Always `false` in a
    /// process that does not train.
    pub fn is_stalled(&self) -> bool {
        self.id.is_some() && self.is_alive() && self.shared.liveness.stalled()
    }

    /// The id of the job being trained, if any.
    pub fn running_job(&self) -> Option<String> {
        self.shared
            .current
            .lock()
            .expect("worker lock")
            .as_ref()
            .map(|run| run.lease.job_id.clone())
    }

    /// Stops taking jobs, asks the running one to checkpoint and suspend, and waits for the
    /// thread to requeue it and exit. Blocking: call from `spawn_blocking`.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        if let Some(run) = self.shared.current.lock().expect("worker lock").as_ref() {
            run.control.suspend();
        }
        let _ = self.tx.send(Command::Shutdown);
        let handle = self.thread.lock().expect("worker thread lock").take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the worker thread panicked");
            }
        }
        if let Some(id) = &self.id {
            let store = self.store.clone();
            let id = id.clone();
            // Blocking context (see above): leave the registry on the runtime's own thread pool.
            let left = tokio::runtime::Handle::try_current()
                .map(|rt| rt.block_on(async move { store.remove_worker(&id).await }));
            if let Ok(Err(e)) = left {
                tracing::warn!(error = %e, "could not leave the worker registry");
            }
        }
    }

    /// Queues a new job for validation (its files and model, downloading the model if
    /// needed), done off the request path one job at a time so jobs reach `queued` in the
    /// order they were created.
    pub fn validate(&self, job: JobRow) {
        let _ = self.validations.send(job);
    }
}

/// Validates jobs in order: queues each or fails it with a message naming what is wrong.
async fn validation_loop(
    store: Store,
    storage: Storage,
    hub: Hub,
    wake: mpsc::Sender<Command>,
    mut jobs: tokio::sync::mpsc::UnboundedReceiver<JobRow>,
    memory: Option<MemoryBudget>,
) {
    while let Some(job) = jobs.recv().await {
        // Cancelled while waiting its turn: nothing to do.
        match store.get_job(&job.id).await {
            Ok(Some(j)) if j.status == JobStatus::ValidatingFiles => {}
            _ => continue,
        }
        let prepared = run::prepare(&store, &storage, &hub, &job)
            .await
            .and_then(|inputs| {
                submit::memory_estimate(memory.as_ref(), &inputs.model_dir, &inputs.config)
            });
        let outcome = match prepared {
            Ok(estimate) => {
                if let Some(bytes) = estimate {
                    if let Err(e) = store.set_estimated_memory(&job.id, bytes).await {
                        tracing::error!(job = %job.id, error = %e, "could not record the memory estimate");
                    }
                }
                store.mark_queued(&job.id).await.map(|_| ())
            }
            Err(err) => store
                .fail_job(&job.id, &[JobStatus::ValidatingFiles], &err)
                .await
                .map(|_| ()),
        };
        match outcome {
            Ok(()) => {
                let _ = wake.send(Command::Wake);
            }
            Err(e) => tracing::error!(job = %job.id, error = %e, "could not record validation"),
        }
    }
}

fn thread_main(ctx: Ctx, rx: mpsc::Receiver<Command>, shared: &Shared) {
    let device = match crate::train::device_from_str(&ctx.device) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(device = %ctx.device, error = %e, "cannot open the training device; the worker is not running");
            return;
        }
    };
    let (kernels, notes) = crate::train::nn::kernels_on(&device);
    for note in notes {
        tracing::warn!("{note}");
    }
    tracing::info!(device = ?device, kernels, "worker started");
    let serving = serve::Serving::new(shared.tasks.clone(), device.clone());
    let mut unestimable = estimate::Unestimable::default();
    let live = &shared.liveness;
    loop {
        live.turned();
        if shared.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        live.busy(|| serving.run_idle());
        if let Err(e) = ctx
            .rt
            .block_on(recovery::reclaim_expired(&ctx.store, ctx.max_attempts))
        {
            tracing::error!(error = %e, "could not look for expired leases");
        }
        if let Some(budget) = &ctx.memory {
            live.busy(|| {
                ctx.rt
                    .block_on(estimate::estimate_queued(&ctx, budget, &mut unestimable))
            });
            live.busy(|| ctx.rt.block_on(estimate::fail_too_big(&ctx)));
        }
        crate::fault::hang("worker_claim");
        let mut claimant = ctx.claimant.clone();
        if ctx.memory.is_some() {
            claimant.unestimated_ok = Some(unestimable.ids());
        }
        match ctx.rt.block_on(ctx.store.claim_next_job(&claimant)) {
            Ok(Some(job)) => {
                let ended = live.busy(|| run_claimed(&ctx, shared, &job, &device, &serving));
                if ended == run::Ended::StorageDown {
                    backoff(shared);
                }
                continue;
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "could not read the queue"),
        }
        match rx.recv_timeout(IDLE_POLL) {
            Ok(Command::Wake) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Ok(Command::Shutdown) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    tracing::info!("worker stopped");
}

/// The thread of a process that trains nothing (`sftd serve --no-worker`): it answers chat,
/// running the generation tasks on this node's own device (`SFTD_DEVICE`; the CPU where it has
/// no GPU) as they come.
fn serving_main(device: &str, rx: mpsc::Receiver<Command>, shared: &Shared) {
    let device = match crate::train::device_from_str(device) {
        Ok(d) => d,
        Err(e) => {
            tracing::error!(device, error = %e, "cannot open the device; chat is not served here");
            return;
        }
    };
    tracing::info!(device = ?device, "serving chat on this node's device");
    let serving = serve::Serving::new(shared.tasks.clone(), device);
    loop {
        // A wake-up sent while the tasks ran waits in the channel: none is missed.
        serving.run_idle();
        match rx.recv() {
            Ok(Command::Wake) => {}
            Ok(Command::Shutdown) | Err(_) => break,
        }
    }
}

/// Waits [`STORAGE_BACKOFF`] before the next claim, or less if the worker is shutting down.
fn backoff(shared: &Shared) {
    let until = std::time::Instant::now() + STORAGE_BACKOFF;
    while std::time::Instant::now() < until && !shared.shutting_down.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a job the thread has just claimed, unless it was cancelled meanwhile.
fn run_claimed(
    ctx: &Ctx,
    shared: &Shared,
    job: &JobRow,
    device: &candle_core::Device,
    serving: &serve::Serving,
) -> run::Ended {
    let control = Control::new();
    *shared.current.lock().expect("worker lock") = Some(Running {
        lease: job.lease(),
        control: control.clone(),
    });
    if shared.shutting_down.load(Ordering::SeqCst) {
        control.suspend();
    }
    // A cancel that landed between the claim and the line above found no control to
    // flip; it did change the status, which this re-read sees.
    let still_running = matches!(
        ctx.rt.block_on(ctx.store.get_job(&job.id)),
        Ok(Some(j)) if j.status == JobStatus::Running && j.epoch == job.epoch
    );
    let ended = if still_running {
        run::run_job(ctx, job, &control, device, serving)
    } else {
        run::Ended::Normally
    };
    *shared.current.lock().expect("worker lock") = None;
    if ctx.drops_local_copies {
        ctx.rt
            .block_on(artifacts::drop_local_copies(&ctx.store, &ctx.storage, job));
    }
    ended
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panicking_worker_thread_is_no_longer_alive() {
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            liveness: liveness::Liveness::new(Duration::from_secs(30)),
            tasks: Default::default(),
        });
        let in_thread = shared.clone();
        let joined = std::thread::spawn(move || {
            let _alive = ClearOnExit(in_thread);
            panic!("a bug outside the job's catch_unwind");
        })
        .join();
        assert!(joined.is_err());
        assert!(!shared.alive.load(Ordering::SeqCst));
    }
}
