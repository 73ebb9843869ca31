//! Packing a micro-batch's examples into one sequence and finding its label positions.

use crate::train::data::encode::Example;
use crate::train::model::{Packed, Qwen3};
use anyhow::Result;
use candle_core::Tensor;

/// A packed micro-batch plus where its label positions are.
pub struct Batch {
    pub(super) packed: Packed,
    /// (M,) u32: packed positions whose next token is a target.
    pub(super) positions: Tensor,
    /// (M,) u32: those next tokens.
    pub(super) targets: Tensor,
    pub n_targets: usize,
    pub n_tokens: usize,
}

pub fn make_batch(model: &Qwen3, examples: &[&Example]) -> Result<Batch> {
    let seqs: Vec<&[u32]> = examples.iter().map(|e| e.ids.as_slice()).collect();
    let packed = model.pack(&seqs)?;
    let mut positions = Vec::new();
    let mut targets = Vec::new();
    for (&(start, len), ex) in packed.segments.iter().zip(examples) {
        for j in 0..len.saturating_sub(1) {
            if ex.labels[j + 1] {
                positions.push((start + j) as u32);
                targets.push(ex.ids[j + 1]);
            }
        }
    }
    let m = positions.len();
    let n_tokens = seqs.iter().map(|s| s.len()).sum();
    Ok(Batch {
        positions: Tensor::from_vec(positions, m, &model.device)?,
        targets: Tensor::from_vec(targets, m, &model.device)?,
        packed,
        n_targets: m,
        n_tokens,
    })
}
