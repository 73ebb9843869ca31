//! The condition a guarded write puts on the job's row, and the [`Lease`] a worker's writes
//! carry (see `lease.rs` for claims and renewals). A leaf of the store: events, checkpoints and
//! job transitions all use it.

use super::sql::Backend;
use super::status::{in_list, JobStatus};

/// The right to write for one claim of a job: its id and the epoch the claim set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub epoch: i64,
}

/// The extra condition of a guarded write on the job's row.
#[derive(Clone, Copy)]
pub(crate) enum Guard<'a> {
    /// Unconditional.
    None,
    /// The job is in one of these statuses.
    Statuses(&'a [JobStatus]),
    /// The job is running, under this lease's epoch, and the lease has not expired.
    Holding(&'a Lease),
    /// The job is running under this epoch and its lease expired.
    Expired(&'a Lease),
}

impl Guard<'_> {
    /// `AND …` on the `jobs` row; `epoch` is the parameter the caller binds the lease's epoch
    /// to (bound only for `Holding` and `Expired`).
    pub(super) fn condition(self, backend: Backend, epoch: &str) -> String {
        let now = backend.now_ms();
        let running = JobStatus::Running.as_str();
        match self {
            Guard::None => String::new(),
            Guard::Statuses(s) => format!(" AND status IN ({})", in_list(s)),
            Guard::Holding(_) => format!(
                " AND status = '{running}' AND epoch = {epoch} AND lease_expires_at > {now}"
            ),
            Guard::Expired(_) => format!(
                " AND status = '{running}' AND epoch = {epoch} \
                 AND (lease_expires_at IS NULL OR lease_expires_at <= {now})"
            ),
        }
    }

    pub(super) fn epoch(self) -> Option<i64> {
        match self {
            Guard::Holding(l) | Guard::Expired(l) => Some(l.epoch),
            _ => None,
        }
    }
}
