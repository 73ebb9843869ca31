//! How a completion picks its tokens: the request's sampling parameters (temperature, top-p,
//! seed, budget, stop strings, a forced opening, guided calls) and the sampler that draws each
//! token from the logits, greedily or by nucleus sampling.

use super::opening::Lead;
use rand::{Rng, SeedableRng};

/// How to pick tokens and when to stop.
#[derive(Debug, Clone)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Seeds the sampler; `None` draws a seed.
    pub seed: Option<u64>,
    /// `None`: until an end-of-turn token or the end of the context.
    pub max_new_tokens: Option<usize>,
    /// Text that ends the completion (not included in it).
    pub stop: Vec<String>,
    /// What the completion must begin with (empty: whatever the model writes).
    pub opening: Vec<Lead>,
    /// Calls the model opens itself in a free turn, guided (`None`: written freely).
    pub guided_calls: Option<GuidedCalls>,
}

/// When the model itself writes `opener` (one token, such as Qwen3's `<tool_call>`) outside a
/// thinking block, `body` follows it under an opening's rules: the function picked among the
/// offered names, the arguments written under their schema's mask, the call closed. Then the
/// model goes on freely (another call, or the end of its turn).
#[derive(Debug, Clone, PartialEq)]
pub struct GuidedCalls {
    pub opener: String,
    pub body: Vec<Lead>,
}

impl SamplingParams {
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            max_new_tokens: Some(max_new_tokens),
            stop: Vec::new(),
            opening: Vec::new(),
            guided_calls: None,
        }
    }
}

/// Greedy (argmax, the first of equal maxima as torch does) or temperature + top-p sampling.
pub(super) struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: rand::rngs::StdRng,
}

impl Sampler {
    pub(super) fn new(p: &SamplingParams) -> Self {
        let seed = p.seed.unwrap_or_else(|| rand::rng().random());
        Self {
            temperature: p.temperature,
            top_p: p.top_p,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    pub(super) fn next(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let t = self.temperature as f32;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, ((l - max) / t).exp()))
            .collect();
        let sum: f32 = probs.iter().map(|p| p.1).sum();
        probs.iter_mut().for_each(|p| p.1 /= sum);
        probs.sort_by(|a, b| b.1.total_cmp(&a.1));
        // Nucleus: the fewest most likely tokens whose mass reaches top_p (at least one).
        let mut mass = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            mass += p.1;
            if mass as f64 >= self.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f32 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f32>() * total;
        for &(id, p) in &probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs.last().map_or(0, |p| p.0)
    }

    /// [`Sampler::next`] over `allowed` alone: the other tokens' probabilities are zero, so
    /// temperature and top-p act on the allowed tokens' renormalised distribution. `allowed`
    /// is ascending.
    pub(super) fn next_among(&mut self, logits: &[f32], allowed: &[u32]) -> u32 {
        let mut masked = vec![f32::NEG_INFINITY; logits.len()];
        for &t in allowed {
            masked[t as usize] = logits[t as usize];
        }
        let next = self.next(&masked);
        // Logits that are all -inf or NaN leave nothing to weigh; the first allowed token stands.
        if allowed.binary_search(&next).is_ok() {
            next
        } else {
            allowed[0]
        }
    }
}

pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum_and_top_p_keeps_the_head() {
        assert_eq!(argmax(&[0.0, 3.0, 3.0, 1.0]), 1);
        let mut s = Sampler::new(&SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..SamplingParams::greedy(1)
        });
        // Token 2 alone holds > 50% of the mass, so nucleus sampling can only pick it.
        for _ in 0..20 {
            assert_eq!(s.next(&[0.0, 0.0, 5.0, 0.0]), 2);
        }
        let mut s = Sampler::new(&SamplingParams {
            temperature: 1.0,
            top_p: 1.0,
            seed: Some(7),
            ..SamplingParams::greedy(1)
        });
        let draws: std::collections::HashSet<u32> =
            (0..200).map(|_| s.next(&[0.0, 0.0, 0.0, 0.0])).collect();
        assert_eq!(draws.len(), 4, "a flat distribution draws every token");
    }
}
