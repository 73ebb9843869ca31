//! The run's plan: step counts, warmup and the (seeded) order examples are seen in.

use crate::train::optim::warmup_steps;
use crate::train::spec::TrainConfig;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Data order and step counts, all pure functions of the config and the dataset size.
pub struct Plan {
    pub n_examples: usize,
    pub batch_size: usize,
    pub accum: usize,
    pub micro_per_epoch: usize,
    pub windows_per_epoch: usize,
    pub total_steps: u64,
    pub warmup_steps: u64,
    seed: u64,
    shuffle: bool,
}

impl Plan {
    pub fn new(n_examples: usize, cfg: &TrainConfig) -> Self {
        let batch_size = cfg.batch_size as usize;
        let accum = cfg.gradient_accumulation_steps as usize;
        let micro_per_epoch = n_examples.div_ceil(batch_size);
        let windows_per_epoch = micro_per_epoch.div_ceil(accum);
        let total_steps = if cfg.max_steps > 0 {
            cfg.max_steps as u64
        } else {
            cfg.n_epochs as u64 * windows_per_epoch as u64
        };
        Self {
            n_examples,
            batch_size,
            accum,
            micro_per_epoch,
            windows_per_epoch,
            total_steps,
            warmup_steps: warmup_steps(cfg.warmup_ratio, total_steps),
            seed: cfg.seed,
            shuffle: cfg.shuffle,
        }
    }

    /// Example indices in epoch order (a seeded shuffle per epoch, or file order).
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.n_examples).collect();
        if self.shuffle {
            let mut rng = rand::rngs::StdRng::seed_from_u64(mix(self.seed, epoch, 0x5eed));
            order.shuffle(&mut rng);
        }
        order
    }

    /// The micro-batches (as example indices) of window `w` of an epoch's order.
    pub fn window(&self, order: &[usize], w: usize) -> Vec<Vec<usize>> {
        let first = w * self.accum;
        let last = ((w + 1) * self.accum).min(self.micro_per_epoch);
        (first..last)
            .map(|m| {
                let s = m * self.batch_size;
                order[s..(s + self.batch_size).min(order.len())].to_vec()
            })
            .collect()
    }
}

/// Evaluations still to run once step `step` is done, its own included: every `every`-th step
/// (0: none) and the last.
pub(super) fn evals_from(step: u64, total: u64, every: u32) -> u64 {
    if step > total {
        return 0;
    }
    let every = every as u64;
    let multiples_to = |n: u64| n.checked_div(every).unwrap_or(0);
    let periodic = multiples_to(total) - multiples_to(step.saturating_sub(1));
    let last_extra = every == 0 || !total.is_multiple_of(every);
    periodic + last_extra as u64
}

/// Seconds left: the remaining steps at the measured seconds per training step, plus the
/// remaining evaluations at what the last one took.
pub(super) fn eta_seconds(
    seconds_per_step: f64,
    steps_left: u64,
    evals_left: u64,
    seconds_per_eval: f64,
) -> f64 {
    seconds_per_step * steps_left as f64 + seconds_per_eval * evals_left as f64
}

/// SplitMix64-style mixing of three words into one seed.
pub(super) fn mix(a: u64, b: u64, c: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ c.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evaluations_left_count_the_cadence_and_the_last_step() {
        // 10 steps, every 4: evaluations after steps 4, 8 and 10.
        assert_eq!(evals_from(1, 10, 4), 3);
        assert_eq!(
            evals_from(4, 10, 4),
            3,
            "step 4's own evaluation is still to come"
        );
        assert_eq!(evals_from(5, 10, 4), 2);
        assert_eq!(evals_from(9, 10, 4), 1);
        assert_eq!(evals_from(10, 10, 4), 1);
        // 8 steps, every 4: the last step is a multiple, counted once.
        assert_eq!(evals_from(1, 8, 4), 2);
        // No cadence: only the last.
        assert_eq!(evals_from(3, 10, 0), 1);
        assert_eq!(eta_seconds(2.0, 6, 3, 5.0), 27.0);
    }
}
