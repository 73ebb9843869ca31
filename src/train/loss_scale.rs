//! Dynamic loss scaling for f16 base weights, with the semantics of torch's `GradScaler`: the
//! loss is multiplied by a scale before backward (so small gradients survive f16's narrow range),
//! gradients are divided by it before clipping, and a step whose gradients hold inf or NaN is
//! skipped and halves the scale; `growth_interval` clean steps in a row double it.

use serde::{Deserialize, Serialize};
use std::cell::RefCell;

/// torch's defaults.
pub const INIT_SCALE: f64 = 65536.0;
pub const GROWTH_FACTOR: f64 = 2.0;
pub const BACKOFF_FACTOR: f64 = 0.5;
pub const GROWTH_INTERVAL: u32 = 2000;

/// The scaler's whole state; saved in `trainer_state.json` so a resumed run scales exactly as
/// an uninterrupted one would have.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct LossScaler {
    /// The factor the next backward multiplies the loss by.
    pub scale: f64,
    /// Clean steps since the last growth or back-off.
    pub growth_tracker: u32,
    /// Optimizer steps skipped for non-finite gradients, over the whole run.
    pub skipped_steps: u64,
    pub growth_interval: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        Self::new(GROWTH_INTERVAL)
    }
}

impl LossScaler {
    pub fn new(growth_interval: u32) -> Self {
        Self {
            scale: INIT_SCALE,
            growth_tracker: 0,
            skipped_steps: 0,
            growth_interval: growth_interval.max(1),
        }
    }

    /// Records one step's outcome and adapts the scale (torch's `_amp_update_scale_`). Returns
    /// whether the optimizer step may be taken: false when the gradients were not finite.
    pub fn update(&mut self, grads_finite: bool) -> bool {
        if !grads_finite {
            self.scale *= BACKOFF_FACTOR;
            self.growth_tracker = 0;
            self.skipped_steps += 1;
            return false;
        }
        self.growth_tracker += 1;
        if self.growth_tracker >= self.growth_interval {
            let grown = self.scale * GROWTH_FACTOR;
            // torch keeps the old scale if growing would overflow it.
            if grown.is_finite() {
                self.scale = grown;
            }
            self.growth_tracker = 0;
        }
        true
    }
}

/// Fault injection for tests of the scaler inside a real training run: which optimizer steps
/// (1-based) get a non-finite gradient, and the growth interval a new scaler starts with.
/// Scoped to the calling thread (a training run executes on one thread).
#[derive(Debug, Clone, Default)]
pub struct ScalerTestHook {
    pub nonfinite_grad_at_steps: Vec<u64>,
    pub growth_interval: Option<u32>,
}

thread_local! {
    static HOOK: RefCell<Option<ScalerTestHook>> = const { RefCell::new(None) };
}

/// Runs `f` with `hook` installed on this thread.
pub fn with_test_hook<T>(hook: ScalerTestHook, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            HOOK.with(|h| *h.borrow_mut() = None);
        }
    }
    HOOK.with(|h| *h.borrow_mut() = Some(hook));
    let _reset = Reset;
    f()
}

/// A fresh scaler: torch's defaults, or the test hook's growth interval.
pub fn new_scaler() -> LossScaler {
    let interval = HOOK.with(|h| h.borrow().as_ref().and_then(|h| h.growth_interval));
    LossScaler::new(interval.unwrap_or(GROWTH_INTERVAL))
}

/// Whether the test hook poisons the gradients of optimizer step `step` (1-based).
pub fn injected_overflow(step: u64) -> bool {
    HOOK.with(|h| {
        h.borrow()
            .as_ref()
            .is_some_and(|h| h.nonfinite_grad_at_steps.contains(&step))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_at_two_to_the_sixteen_with_torchs_interval() {
        let s = LossScaler::default();
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.growth_interval, 2000);
        assert_eq!(s.skipped_steps, 0);
    }

    #[test]
    fn overflow_skips_and_halves_clean_steps_grow() {
        let mut s = LossScaler::new(3);
        assert!(s.update(true));
        assert!(s.update(true));
        assert_eq!(s.scale, 65536.0);
        assert!(s.update(true)); // third clean step in a row: ×2
        assert_eq!(s.scale, 131072.0);
        assert_eq!(s.growth_tracker, 0);
        assert!(s.update(true));
        assert!(!s.update(false)); // overflow: skip, ×0.5, tracker reset
        assert_eq!(s.scale, 65536.0);
        assert_eq!(s.growth_tracker, 0);
        assert_eq!(s.skipped_steps, 1);
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        assert_eq!(s.skipped_steps, 2);
        // Growth needs a full interval after the back-off.
        assert!(s.update(true));
        assert!(s.update(true));
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 65536.0);
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut s = LossScaler::new(5);
        s.update(false);
        s.update(true);
        let back: LossScaler = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn the_hook_is_scoped() {
        let hook = ScalerTestHook {
            nonfinite_grad_at_steps: vec![2],
            growth_interval: Some(4),
        };
        with_test_hook(hook, || {
            assert!(injected_overflow(2));
            assert!(!injected_overflow(3));
            assert_eq!(new_scaler().growth_interval, 4);
        });
        assert!(!injected_overflow(2));
        assert_eq!(new_scaler().growth_interval, 2000);
    }
}
