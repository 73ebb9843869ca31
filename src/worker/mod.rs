//! The worker: one `std::thread` that owns the training device and runs queued jobs oldest
//! first, serving generation requests on the same device (between a job's micro-batches, or
//! when idle), plus the file/model checks that move a new job from `validating_files` to
//! `queued`. Other code talks to it through [`Worker`]'s methods (wake, cancel, on_device,
//! shutdown).

mod artifacts;
mod recorder;
mod run;
mod serve;
mod submit;

pub use run::{fine_tuned_model_name, job_dir, metrics_csv};
pub use serve::{DeviceTask, Lease, ServingModel};
pub use submit::{MemoryBudget, SubmitError};

use crate::hub::Hub;
use crate::storage::Storage;
use crate::store::jobs::JobError;
use crate::store::{JobRow, JobStatus, Store};
use crate::train::events::Control;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How often an idle worker looks at the queue even without a wake-up (belt and braces).
const IDLE_POLL: Duration = Duration::from_secs(5);

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
}

/// State shared between the handle and the thread.
struct Shared {
    /// The job the thread is running and the flag that steers it.
    current: Mutex<Option<(String, Control)>>,
    shutting_down: AtomicBool,
    alive: AtomicBool,
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
}

impl Worker {
    /// Requeues what a previous process left running, re-validates jobs it left validating,
    /// and starts the thread. Must be called inside the tokio runtime. A job found running (its
    /// process died) is resumed unless that has happened `max_attempts` times already; then it
    /// fails with a message naming the last step reached.
    pub async fn start(
        store: Store,
        storage: Storage,
        hub: Hub,
        device: String,
        max_attempts: u32,
    ) -> crate::store::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            current: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            alive: AtomicBool::new(true),
            tasks: Default::default(),
        });
        let (validations, pending) = tokio::sync::mpsc::unbounded_channel();
        let memory = MemoryBudget::probe(&device);
        tokio::spawn(validation_loop(
            store.clone(),
            storage.clone(),
            hub.clone(),
            tx.clone(),
            pending,
            memory.clone(),
        ));
        let worker = Self {
            validations,
            tx,
            shared: shared.clone(),
            thread: Arc::new(Mutex::new(None)),
            store: store.clone(),
            hub: hub.clone(),
            memory,
        };
        for job in store.interrupted_jobs().await? {
            match job.status {
                JobStatus::Running => recover_interrupted(&store, &job.id, max_attempts).await?,
                _ => worker.validate(job),
            }
        }
        let rt = tokio::runtime::Handle::current();
        let ctx = Ctx {
            store,
            storage,
            hub,
            rt,
            device,
        };
        let thread = std::thread::Builder::new()
            .name("sftd-worker".into())
            .spawn(move || {
                let _alive = ClearOnExit(shared.clone());
                thread_main(ctx, rx, &shared);
            })
            .expect("spawning the worker thread");
        *worker.thread.lock().expect("worker thread lock") = Some(thread);
        Ok(worker)
    }

    /// Tells the thread to look at the queue.
    pub fn notify(&self) {
        let _ = self.tx.send(Command::Wake);
    }

    /// Stops the job if it is the one running (the status change itself is the store's).
    pub fn cancel(&self, job_id: &str) {
        if let Some((id, control)) = self.shared.current.lock().expect("worker lock").as_ref() {
            if id == job_id {
                control.cancel();
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

    /// Whether the thread is up (for `/readyz`).
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// The id of the job being trained, if any.
    pub fn running_job(&self) -> Option<String> {
        self.shared
            .current
            .lock()
            .expect("worker lock")
            .as_ref()
            .map(|(id, _)| id.clone())
    }

    /// Stops taking jobs, asks the running one to checkpoint and suspend, and waits for the
    /// thread to requeue it and exit. Blocking: call from `spawn_blocking`.
    pub fn shutdown(&self) {
        self.shared.shutting_down.store(true, Ordering::SeqCst);
        if let Some((_, control)) = self.shared.current.lock().expect("worker lock").as_ref() {
            control.suspend();
        }
        let _ = self.tx.send(Command::Shutdown);
        let handle = self.thread.lock().expect("worker thread lock").take();
        if let Some(h) = handle {
            if h.join().is_err() {
                tracing::error!("the worker thread panicked");
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

/// Requeues a job a dead process left running, or fails it once it has been interrupted more
/// than `max_attempts` times (a job that kills the server, e.g. by exhausting memory, would
/// otherwise crash every restart and block the queue behind it).
async fn recover_interrupted(
    store: &Store,
    id: &str,
    max_attempts: u32,
) -> crate::store::Result<()> {
    let times = store.interruptions(id).await? + 1;
    if times <= i64::from(max_attempts) {
        tracing::info!(job = %id, times, "requeueing a job interrupted by a restart");
        store
            .requeue_interrupted(
                id,
                "Job interrupted by a server restart; it will resume from its last checkpoint",
            )
            .await?;
        return Ok(());
    }
    let reached = match store.last_metrics_step(id, "train_loss").await? {
        Some(step) => format!("the last step reached was {step}"),
        None => "it never completed a step".to_string(),
    };
    let message = format!(
        "Job interrupted {times} times: the server process died while running it each time \
         (killed, out of memory, or power loss); {reached}. It was resumed {max_attempts} times \
         (SFTD_MAX_ATTEMPTS) and is not retried again; check the server's memory and logs \
         before creating it again."
    );
    tracing::warn!(job = %id, times, "failing a job interrupted too often");
    store
        .fail_job(
            id,
            &[JobStatus::Running],
            &JobError::new("job_interrupted", message, None),
        )
        .await?;
    Ok(())
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
    tracing::info!(device = ?device, "worker started");
    let serving = serve::Serving::new(shared.tasks.clone(), device.clone());
    loop {
        if shared.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        serving.run_idle();
        match ctx.rt.block_on(ctx.store.claim_next_job()) {
            Ok(Some(job)) => {
                let control = Control::new();
                *shared.current.lock().expect("worker lock") =
                    Some((job.id.clone(), control.clone()));
                if shared.shutting_down.load(Ordering::SeqCst) {
                    control.suspend();
                }
                // A cancel that landed between the claim and the line above found no control to
                // flip; it did change the status, which this re-read sees.
                let still_running = matches!(
                    ctx.rt.block_on(ctx.store.get_job(&job.id)),
                    Ok(Some(j)) if j.status == JobStatus::Running
                );
                if still_running {
                    run::run_job(&ctx, &job, &control, &device, &serving);
                }
                *shared.current.lock().expect("worker lock") = None;
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

impl JobError {
    pub fn new(code: &str, message: impl Into<String>, param: Option<&str>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            param: param.map(String::from),
        }
    }
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
