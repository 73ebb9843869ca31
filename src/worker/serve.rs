//! Generation on the device the worker owns: requests queue here and run on the worker thread,
//! between the running job's micro-batches (with the job's own model when they use its base, so
//! no second copy of it is loaded) or at once when no job trains.

use crate::train::generate::{
    generate, BaseModel, ChatFormat, Generation, ModelCache, SamplingParams,
};
use crate::train::interlude::Interlude;
use crate::train::model::qwen3::AdapterWeights;
use crate::train::model::Qwen3;
use anyhow::Result;
use candle_core::DType;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Base models kept loaded beside the one being trained, and adapters kept prepared.
const MAX_BASES: usize = 2;
const MAX_ADAPTERS: usize = 32;

/// Work to run on the device, with what the device holds at that moment.
pub type DeviceTask = Box<dyn FnOnce(&DeviceLoan<'_>) + Send>;

/// Tasks waiting for the worker thread, oldest first.
#[derive(Default)]
pub(super) struct TaskQueue {
    tasks: Mutex<VecDeque<DeviceTask>>,
    len: AtomicUsize,
}

impl TaskQueue {
    pub(super) fn push(&self, task: DeviceTask) {
        let mut tasks = self.tasks.lock().expect("task queue lock");
        tasks.push_back(task);
        self.len.store(tasks.len(), Ordering::SeqCst);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len.load(Ordering::SeqCst) == 0
    }

    /// Drops every waiting task (their requests see their channels close).
    pub(super) fn clear(&self) {
        let dropped = std::mem::take(&mut *self.tasks.lock().expect("task queue lock"));
        self.len.store(0, Ordering::SeqCst);
        drop(dropped);
    }

    /// Runs the tasks waiting now (not those queued meanwhile: a stream of requests cannot
    /// starve the training job, which gets at least one micro-batch between two rounds). A task
    /// that panics is logged and does not take the worker (or its job) down.
    pub(super) fn run_waiting(&self, loan: &DeviceLoan<'_>) {
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("task queue lock"));
        self.len.store(0, Ordering::SeqCst);
        for task in tasks {
            let run = std::panic::AssertUnwindSafe(|| task(loan));
            if std::panic::catch_unwind(run).is_err() {
                tracing::error!("a generation task panicked");
            }
        }
        // Tasks queued while these ran are counted again for the next round.
        let n = self.tasks.lock().expect("task queue lock").len();
        self.len.store(n, Ordering::SeqCst);
    }
}

/// What the worker thread serves with: the queue and the models loaded for serving.
#[derive(Clone)]
pub(super) struct Serving {
    pub queue: Arc<TaskQueue>,
    pub cache: Arc<ModelCache>,
}

impl Serving {
    pub(super) fn new(queue: Arc<TaskQueue>, device: candle_core::Device) -> Self {
        Self {
            queue,
            cache: Arc::new(ModelCache::new(device, MAX_BASES, MAX_ADAPTERS)),
        }
    }

    /// Serves what waits while no job trains.
    pub(super) fn run_idle(&self) {
        self.queue.run_waiting(&DeviceLoan {
            cache: &self.cache,
            training: None,
        });
    }

    /// The interlude a job running on `model_dir` yields to between micro-batches.
    pub(super) fn for_job(&self, model_dir: PathBuf) -> Arc<dyn Interlude> {
        Arc::new(JobInterlude {
            serving: self.clone(),
            model_dir,
        })
    }
}

struct JobInterlude {
    serving: Serving,
    model_dir: PathBuf,
}

impl Interlude for JobInterlude {
    fn pending(&self) -> bool {
        !self.serving.queue.is_empty()
    }

    fn run(&self, model: &Qwen3) {
        self.serving.queue.run_waiting(&DeviceLoan {
            cache: &self.serving.cache,
            training: Some((&self.model_dir, model)),
        });
    }
}

/// The device lent to a task: the serving models, and the model being trained if a job runs.
pub struct DeviceLoan<'a> {
    cache: &'a ModelCache,
    training: Option<(&'a Path, &'a Qwen3)>,
}

enum ModelRef<'a> {
    Loaded(Arc<BaseModel>),
    /// The running job's model: its frozen weights serve its base.
    Training(&'a Qwen3),
}

/// A base model ready to generate, with or without an adapter.
pub struct ServingModel<'a> {
    model: ModelRef<'a>,
    dir: PathBuf,
    cache: &'a ModelCache,
    pub format: Arc<ChatFormat>,
}

impl<'a> DeviceLoan<'a> {
    /// The base model in `dir`: the running job's own weights when it trains that base in f32,
    /// else a serving copy (loaded on first use). Blocking.
    pub fn model(&self, dir: &Path) -> Result<ServingModel<'a>> {
        let (model, format) = match self.training {
            // The cached forward pass is verified on f32 weights only; a job training f16/bf16
            // base weights (on a GPU) serves its base from an f32 copy instead.
            Some((train_dir, m)) if m.dtype == DType::F32 && same_dir(train_dir, dir) => {
                (ModelRef::Training(m), self.cache.format(dir)?)
            }
            _ => {
                let b = self.cache.base(dir)?;
                let f = b.format.clone();
                (ModelRef::Loaded(b), f)
            }
        };
        Ok(ServingModel {
            model,
            dir: dir.to_path_buf(),
            cache: self.cache,
            format,
        })
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

impl ServingModel<'_> {
    fn weights(&self) -> &Qwen3 {
        match &self.model {
            ModelRef::Loaded(b) => &b.model,
            ModelRef::Training(m) => m,
        }
    }

    /// Whether this is the running job's model (no copy of the base was loaded for it).
    pub fn is_training_model(&self) -> bool {
        matches!(self.model, ModelRef::Training(_))
    }

    /// The PEFT adapter in `dir` prepared for this base (cached). Blocking.
    pub fn adapter(&self, dir: &Path) -> Result<Arc<AdapterWeights>> {
        self.cache.adapter(&self.dir, self.weights(), dir)
    }

    /// Generates with `adapter` beside the frozen base (or the base alone); the LoRA the running
    /// job trains is never applied here.
    pub fn generate(
        &self,
        adapter: Option<&AdapterWeights>,
        prompt: &[u32],
        params: &SamplingParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation> {
        let tuning = adapter.into();
        generate(
            self.weights(),
            tuning,
            &self.format,
            prompt,
            params,
            on_text,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn the_training_model_serves_its_own_base_and_a_copy_serves_when_idle() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = crate::train::demo::ensure_demo_model(tmp.path()).unwrap();
        let serving = Serving::new(Default::default(), Device::Cpu);
        let trained = Qwen3::load(&dir, DType::F32, &Device::Cpu).unwrap();
        let busy = DeviceLoan {
            cache: &serving.cache,
            training: Some((&dir, &trained)),
        };
        assert!(busy.model(&dir).unwrap().is_training_model());
        let half = Qwen3::load(&dir, DType::BF16, &Device::Cpu).unwrap();
        let busy_half = DeviceLoan {
            cache: &serving.cache,
            training: Some((&dir, &half)),
        };
        assert!(!busy_half.model(&dir).unwrap().is_training_model());
        let idle = DeviceLoan {
            cache: &serving.cache,
            training: None,
        };
        assert!(!idle.model(&dir).unwrap().is_training_model());
    }

    #[test]
    fn a_round_runs_only_what_waited_and_survives_a_panicking_task() {
        let queue = Arc::new(TaskQueue::default());
        let serving = Serving::new(queue.clone(), Device::Cpu);
        let ran = Arc::new(AtomicBool::new(false));
        let requeue = queue.clone();
        let flag = ran.clone();
        queue.push(Box::new(|_: &DeviceLoan<'_>| {
            panic!("a bug in one request")
        }));
        queue.push(Box::new(move |_: &DeviceLoan<'_>| {
            // Queued during the round: waits for the next one.
            requeue.push(Box::new(move |_: &DeviceLoan<'_>| {
                flag.store(true, Ordering::SeqCst)
            }));
        }));
        serving.run_idle();
        assert!(!queue.is_empty() && !ran.load(Ordering::SeqCst));
        serving.run_idle();
        assert!(queue.is_empty() && ran.load(Ordering::SeqCst));
    }
}
