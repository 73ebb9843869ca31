//! LoRA dropout masks on the CPU: drawn from a generator seeded by the pass's key, so a
//! checkpointed layer's recompute and a resumed run draw the same ones. The one-op layer keeps
//! them as bits between its forward and backward; the per-op path multiplies by their values.

use candle_core::WithDType;
use rand::{Rng, SeedableRng};

/// Which of `len` elements inverted dropout keeps (scaled by `1/(1-p)`) and which it zeroes.
pub(crate) struct DropMask {
    /// Bit j of word j/64: element j is kept.
    kept: Vec<u64>,
    len: usize,
    /// `1/(1-p)` in f32, as the mask's values carry it.
    keep: f32,
}

impl DropMask {
    /// The mask for `len` elements, drop probability `p`, generator seed `key`: element j is
    /// dropped when the generator's j-th f32 (`rng.random::<f32>()`) is below `p`.
    pub fn draw(len: usize, p: f64, key: u64) -> Self {
        let mut rng = rand::rngs::StdRng::seed_from_u64(key);
        // That f32 is the word's top 24 bits times 2⁻²⁴, exactly, so it is below `p` (an f32)
        // exactly when those bits are below p·2²⁴ rounded up: a comparison of integers over
        // words drawn 64 at a time, instead of a float per element.
        let below = ((p as f32) as f64 * (1u64 << 24) as f64).ceil() as u32;
        let mut kept = vec![0u64; len.div_ceil(64)];
        let mut words = [0u32; 64];
        for (w, bits) in kept.iter_mut().enumerate() {
            let count = 64.min(len - w * 64);
            rng.fill(&mut words[..count]);
            for (b, &word) in words[..count].iter().enumerate() {
                *bits |= u64::from(word >> 8 >= below) << b;
            }
        }
        DropMask {
            kept,
            len,
            keep: (1.0 / (1.0 - p)) as f32,
        }
    }

    fn value<T: WithDType>(&self, j: usize, keep: T) -> T {
        if self.kept[j / 64] >> (j % 64) & 1 == 1 {
            keep
        } else {
            T::zero()
        }
    }

    /// The mask's values, `0` or `1/(1-p)`.
    pub fn values<T: WithDType>(&self) -> Vec<T> {
        let keep = T::from_f64(self.keep as f64);
        (0..self.len).map(|j| self.value(j, keep)).collect()
    }

    /// `x ⊙ mask`, each element multiplied by its mask value (as the per-op path does).
    pub fn apply<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        assert_eq!(x.len(), self.len, "dropout mask size");
        let keep = T::from_f64(self.keep as f64);
        let mut out = Vec::with_capacity(x.len());
        for (x, &bits) in x.chunks(64).zip(&self.kept) {
            out.extend(
                x.iter()
                    .enumerate()
                    .map(|(b, &v)| v * if bits >> b & 1 == 1 { keep } else { T::zero() }),
            );
        }
        out
    }

    /// `dst += y ⊙ mask`.
    pub fn add_masked<T: WithDType>(&self, dst: &mut [T], y: &[T]) {
        assert!(
            dst.len() == self.len && y.len() == self.len,
            "dropout mask size"
        );
        let keep = T::from_f64(self.keep as f64);
        for ((d, y), &bits) in dst.chunks_mut(64).zip(y.chunks(64)).zip(&self.kept) {
            for (b, (d, &v)) in d.iter_mut().zip(y).enumerate() {
                *d += v * if bits >> b & 1 == 1 { keep } else { T::zero() };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::DropMask;

    /// Exactly the elements the generator's f32 draws drop (`random::<f32>() < p`, one per
    /// element, in order), for several p and lengths off the 64-element word.
    #[test]
    fn masks_are_the_generators_f32_draws() {
        use rand::{Rng, SeedableRng};
        for (p, len, key) in [(0.05, 1000, 1), (0.3, 64, 2), (0.5, 129, 3), (0.999, 70, 4)] {
            let mut rng = rand::rngs::StdRng::seed_from_u64(key);
            let keep = (1.0 / (1.0 - p)) as f32;
            let want: Vec<f32> = (0..len)
                .map(|_| {
                    if rng.random::<f32>() < p as f32 {
                        0.0
                    } else {
                        keep
                    }
                })
                .collect();
            assert_eq!(DropMask::draw(len, p, key).values::<f32>(), want, "p {p}");
        }
    }

    /// About p of the elements dropped, the rest scaled by 1/(1-p); the same key draws the same
    /// mask, another key another; `apply` and `add_masked` multiply by exactly `values`.
    #[test]
    fn masks_are_a_function_of_the_key() {
        let (len, p) = (10_000, 0.25);
        let m = DropMask::draw(len, p, 7);
        let v: Vec<f32> = m.values();
        let dropped = v.iter().filter(|&&x| x == 0.0).count();
        assert!(
            (2300..2700).contains(&dropped),
            "{dropped} of {len} dropped"
        );
        assert!(v.iter().all(|&x| x == 0.0 || x == (1.0 / 0.75) as f32));
        assert_eq!(DropMask::draw(len, p, 7).values::<f32>(), v);
        assert_ne!(DropMask::draw(len, p, 8).values::<f32>(), v);
        let x: Vec<f64> = (0..len).map(|j| (j % 13) as f64 - 6.5).collect();
        let want: Vec<f64> = x
            .iter()
            .zip(m.values::<f64>())
            .map(|(a, b)| a * b)
            .collect();
        assert_eq!(m.apply(&x), want);
        let mut dst = vec![1.0; len];
        m.add_masked(&mut dst, &x);
        assert!(dst.iter().zip(&want).all(|(d, w)| *d == 1.0 + w));
    }
}
