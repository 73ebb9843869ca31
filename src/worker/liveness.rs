//! Whether the worker thread still takes jobs: outside a job or a generation it turns its claim
//! loop at least every idle poll and at every heartbeat, so a thread that has not turned it for
//! a whole lease while not busy is stuck (a claim waiting on a lock, a deadlock), even though it
//! has not ended. `/readyz` reports such a worker as stalled.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(super) struct Liveness {
    born: Instant,
    /// Milliseconds after `born` of the loop's last turn (or of the end of its last busy spell).
    last_turn_ms: AtomicU64,
    /// Set while the thread trains a job or runs generation requests: time it may legitimately
    /// spend away from the loop, however long.
    busy: AtomicBool,
    stall_after: Duration,
}

impl Liveness {
    pub(super) fn new(stall_after: Duration) -> Self {
        Self {
            born: Instant::now(),
            last_turn_ms: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            stall_after,
        }
    }

    /// The loop has come round.
    pub(super) fn turned(&self) {
        let ms = u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_turn_ms.store(ms, Ordering::SeqCst);
    }

    /// Runs `work` as busy time; its end counts as a turn, stamped before `busy` clears so a
    /// reader that sees the thread idle again also sees the fresh stamp.
    pub(super) fn busy<T>(&self, work: impl FnOnce() -> T) -> T {
        self.busy.store(true, Ordering::SeqCst);
        let out = work();
        self.turned();
        self.busy.store(false, Ordering::SeqCst);
        out
    }

    /// Not busy, and no turn for longer than `stall_after`.
    pub(super) fn stalled(&self) -> bool {
        if self.busy.load(Ordering::SeqCst) {
            return false;
        }
        let last = Duration::from_millis(self.last_turn_ms.load(Ordering::SeqCst));
        self.born.elapsed().saturating_sub(last) > self.stall_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_is_not_a_stall_and_idle_time_past_the_limit_is() {
        let live = Liveness::new(Duration::from_millis(30));
        live.turned();
        assert!(!live.stalled());
        live.busy(|| {
            std::thread::sleep(Duration::from_millis(60));
            assert!(!live.stalled());
        });
        assert!(!live.stalled(), "the end of a busy spell counts as a turn");
        std::thread::sleep(Duration::from_millis(60));
        assert!(live.stalled());
        live.turned();
        assert!(!live.stalled());
    }
}
