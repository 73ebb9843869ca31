//! Finding where an f16/bf16 forward pass overflowed: the micro-batch is replayed with a finite
//! check on each projection's GEMM output, so a job fails naming the layer instead of training
//! on inf. Only runs after a non-finite loss; a normal step pays nothing.

use super::qwen3::projection_name;
use super::{Packed, Qwen3};
use crate::train::nn::linear::overflow_probe;
use crate::train::nn::{frozen_linear, Pass};

/// Replays the forward pass of a micro-batch (same dropout masks) checking each projection's GEMM
/// output, then the LM head's logits; returns the name of the first that is not finite.
pub fn locate_overflow(
    model: &Qwen3,
    packed: &Packed,
    dropout_key: Option<u64>,
) -> anyhow::Result<Option<String>> {
    let pass = Pass {
        track: false,
        dropout_key,
    };
    let (h, hit) = overflow_probe::run(|| model.forward(packed, pass));
    if let Some(key) = hit {
        return Ok(Some(projection_name(key)));
    }
    let h = model.final_norm(&h?)?;
    let n = h.dim(0)?;
    let mut start = 0;
    while start < n {
        let rows = (n - start).min(1024);
        let logits = frozen_linear(&h.narrow(0, start, rows)?, &model.lm_head)?;
        if !overflow_probe::all_finite(&logits)? {
            return Ok(Some("lm_head".into()));
        }
        start += rows;
    }
    Ok(None)
}
