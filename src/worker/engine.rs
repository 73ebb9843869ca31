//! The engine entry points the service calls, in one place (dataset validation, the demo model,
//! the device, the training run), so the rest of the service names them through this module.

pub use crate::train::events::{Control, Outcome, TrainEvent};

// Stand-ins until the engine lands on main; replaced by `pub use crate::train::…` re-exports.
#[allow(unused_variables)]
mod pending {
    use super::*;
    use crate::train::spec::TrainConfig;
    use std::path::{Path, PathBuf};

    pub struct RowError {
        pub line: usize,
        pub code: String,
        pub message: String,
    }
    pub struct DatasetSummary {
        pub rows: usize,
    }
    pub fn validate_jsonl(bytes: &[u8]) -> Result<DatasetSummary, Vec<RowError>> {
        let text = std::str::from_utf8(bytes).map_err(|_| {
            vec![RowError {
                line: 1,
                code: "invalid_utf8".into(),
                message: "not UTF-8".into(),
            }]
        })?;
        let mut errs = vec![];
        let mut rows = 0;
        for (i, l) in text.lines().enumerate() {
            if l.trim().is_empty() {
                continue;
            }
            rows += 1;
            if serde_json::from_str::<serde_json::Value>(l).is_err() {
                errs.push(RowError {
                    line: i + 1,
                    code: "invalid_json".into(),
                    message: "bad json".into(),
                });
            }
        }
        if rows == 0 {
            errs.push(RowError {
                line: 0,
                code: "empty_file".into(),
                message: "empty".into(),
            });
        }
        if errs.is_empty() {
            Ok(DatasetSummary { rows })
        } else {
            Err(errs)
        }
    }

    pub struct TrainJob {
        pub model_dir: PathBuf,
        pub base_model_name: String,
        pub training_file: PathBuf,
        pub validation_file: Option<PathBuf>,
        pub init_adapter: Option<PathBuf>,
        pub config: TrainConfig,
        pub output_dir: PathBuf,
        pub resume_from: Option<PathBuf>,
        pub device: candle_core::Device,
    }
    pub fn run(
        job: &TrainJob,
        control: &Control,
        on_event: &mut dyn FnMut(TrainEvent),
    ) -> anyhow::Result<Outcome> {
        anyhow::bail!("the training engine has not landed yet")
    }
    pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
        None
    }
    pub fn write_demo_model(dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("config.json"), "{}")?;
        Ok(())
    }
    pub fn device_from_str(s: &str) -> anyhow::Result<candle_core::Device> {
        Ok(candle_core::Device::Cpu)
    }
}

pub use pending::*;
