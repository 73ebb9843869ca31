//! The engine entry points the service calls, in one place (dataset validation, the demo model,
//! the device, the training run), so the rest of the service names them through this module.

pub use crate::train::data::{DatasetSummary, InvalidDataset, JsonlValidator, RowError};
pub use crate::train::demo::ensure_demo_model;
pub use crate::train::device_from_str;
pub use crate::train::events::{Control, Outcome, TrainEvent};
pub use crate::train::trainer::{latest_checkpoint, run, TrainJob};
