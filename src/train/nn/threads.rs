//! How many CPU threads sftd's kernels split their work over, decided once per process.
//!
//! candle's `get_num_threads()` derives the number afresh on every call: an environment lookup
//! and, unless `RAYON_NUM_THREADS` is set, a read and parse of `/proc/cpuinfo` (about 40 µs on a
//! 2-core VM, `docs/benchmarks.md`). The kernels ask for every product, a few hundred
//! times per training step and several times per layer per generated token, so the answer is
//! kept. The thread pools it sizes are built once too, so a later change of those variables
//! would not be honoured by them either.

use std::sync::OnceLock;

/// The thread count candle's CPU pools use (at least 1).
pub fn count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| candle_core::utils::get_num_threads().max(1))
}

#[cfg(test)]
mod tests {
    #[test]
    fn count_is_candles_thread_count() {
        assert_eq!(super::count(), candle_core::utils::get_num_threads().max(1));
    }
}
