//! Fault injection for the crash tests. `SFTD_FAULT_POINT=name:n` aborts the process (no
//! cleanup, like `kill -9`) the n-th time execution reaches `fault::point("name")`;
//! `SFTD_FAULT_FAIL=name:n` makes `fault::fails("name")` true from its n-th call on (a store
//! write that keeps failing); `SFTD_FAULT_HANG=name:n` blocks the calling thread for good at
//! the n-th `fault::hang("name")` (a thread that is stuck rather than dead);
//! `SFTD_FAULT_PAUSE=name:n` stops the calling thread for `SFTD_FAULT_PAUSE_MS` (default 3000)
//! at the n-th `fault::pause("name")`, so a test can change the world in between. Unset, each
//! check only reads a once-initialised static.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// A configured fault and how many times its point has been reached.
struct Armed {
    name: String,
    nth: u64,
    hits: AtomicU64,
}

impl Armed {
    fn from_env(var: &str) -> Option<Self> {
        let v = std::env::var(var).ok()?;
        let (name, n) = v.split_once(':').unwrap_or((v.as_str(), "1"));
        Some(Self {
            name: name.to_string(),
            nth: n.parse().unwrap_or(1),
            hits: AtomicU64::new(0),
        })
    }

    /// Counts a hit of `name`; which hit this is (1-based), or `None` for another point.
    fn hit(&self, name: &str) -> Option<u64> {
        (self.name == name).then(|| self.hits.fetch_add(1, Ordering::Relaxed) + 1)
    }
}

static ABORT: OnceLock<Option<Armed>> = OnceLock::new();
static FAIL: OnceLock<Option<Armed>> = OnceLock::new();
static HANG: OnceLock<Option<Armed>> = OnceLock::new();
static PAUSE: OnceLock<Option<Armed>> = OnceLock::new();

/// Whether this hit of `name` is the n-th that the fault armed through `var` names; if so,
/// says so on stderr (`… reached; {what}`), which the tests wait for.
fn reached(cell: &OnceLock<Option<Armed>>, var: &str, name: &str, what: &str) -> bool {
    let Some(armed) = cell.get_or_init(|| Armed::from_env(var)) else {
        return false;
    };
    let now = armed.hit(name) == Some(armed.nth);
    if now {
        eprintln!("sftd: {var} {name}:{} reached; {what}", armed.nth);
    }
    now
}

/// Aborts here if this is the n-th hit of the point `SFTD_FAULT_POINT` names.
pub fn point(name: &str) {
    if reached(&ABORT, "SFTD_FAULT_POINT", name, "aborting") {
        std::process::abort();
    }
}

/// Whether the operation `name` should fail now (`SFTD_FAULT_FAIL`).
pub fn fails(name: &str) -> bool {
    let Some(armed) = FAIL.get_or_init(|| Armed::from_env("SFTD_FAULT_FAIL")) else {
        return false;
    };
    armed.hit(name).is_some_and(|n| n >= armed.nth)
}

/// Blocks the calling thread for good if this is the n-th hit of the point `SFTD_FAULT_HANG`
/// names.
pub fn hang(name: &str) {
    if reached(&HANG, "SFTD_FAULT_HANG", name, "this thread hangs") {
        loop {
            std::thread::park();
        }
    }
}

/// Sleeps `SFTD_FAULT_PAUSE_MS` (default 3000) here if this is the n-th hit of the point
/// `SFTD_FAULT_PAUSE` names.
pub fn pause(name: &str) {
    if reached(&PAUSE, "SFTD_FAULT_PAUSE", name, "pausing") {
        let ms = std::env::var("SFTD_FAULT_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}
