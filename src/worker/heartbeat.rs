//! The worker's heartbeat: registers the worker, then every `heartbeat` interval renews the
//! running job's lease and reports the worker (free memory, current job). A renewal that is
//! refused means the job is no longer this worker's (cancelled, or the lease expired and
//! another worker may hold it): the run is stopped at once, and the store refuses its writes
//! anyway. Each beat also wakes the claim loop, which takes over jobs whose lease expired.

use super::{Command, MemoryBudget, Shared, Worker, WorkerOptions};
use crate::store::workers::NewWorker;
use crate::store::Store;
use crate::train::device::DeviceInfo;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

/// Registers the worker and spawns its heartbeat task (which ends with the worker thread).
pub(super) async fn start(
    store: &Store,
    id: &str,
    opts: &WorkerOptions,
    memory: Option<&MemoryBudget>,
    worker: &Worker,
) -> crate::store::Result<()> {
    let me = NewWorker {
        id: id.into(),
        hostname: hostname(),
        device: memory.map_or_else(|| opts.device.clone(), |m| m.info.id.clone()),
        memory_total_bytes: memory.map(|m| m.info.total_memory_bytes),
        memory_free_bytes: memory.map(|m| m.info.available_memory_bytes),
    };
    store.register_worker(&me).await?;
    tracing::info!(worker = id, device = %me.device, "worker registered");
    tokio::spawn(beat(
        store.clone(),
        me,
        opts.device.clone(),
        opts.heartbeat,
        opts.lease,
        worker.shared.clone(),
        worker.tx.clone(),
    ));
    Ok(())
}

async fn beat(
    store: Store,
    me: NewWorker,
    device: String,
    every: Duration,
    lease: Duration,
    shared: Arc<Shared>,
    wake: mpsc::Sender<Command>,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while shared.alive.load(std::sync::atomic::Ordering::SeqCst) {
        ticks.tick().await;
        let running = shared
            .current
            .lock()
            .expect("worker lock")
            .as_ref()
            .map(|r| (r.lease.clone(), r.control.clone()));
        if let Some((held, control)) = &running {
            match store.renew_lease(held, lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(job = %held.job_id, epoch = held.epoch, "lease lost (cancelled, or expired and taken over): stopping the run");
                    control.cancel();
                }
                Err(e) => {
                    tracing::warn!(job = %held.job_id, error = %e, "could not renew the lease")
                }
            }
        }
        let free = free_memory(&device);
        let job = running.as_ref().map(|(l, _)| l.job_id.as_str());
        match store.worker_heartbeat(&me.id, free, job).await {
            Ok(true) => {}
            // Removed from the registry by hand while alive: register again.
            Ok(false) => {
                if let Err(e) = store.register_worker(&me).await {
                    tracing::warn!(error = %e, "could not register the worker again");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not record the heartbeat"),
        }
        if wake.send(Command::Wake).is_err() {
            return;
        }
    }
}

/// Free memory of the device now (`None` if it cannot be read).
fn free_memory(device: &str) -> Option<u64> {
    let d = crate::train::device_from_str(device).ok()?;
    Some(DeviceInfo::probe(&d).ok()?.available_memory_bytes)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".into())
}
