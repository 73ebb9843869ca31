//! One micro-batch's forward and backward: the chunked LM-head loss and the gradient
//! accumulation into the LoRA weights, with or without per-layer gradient checkpointing.

use super::batch::Batch;
use crate::train::model::Qwen3;
use crate::train::nn::head::head_xent;
use crate::train::nn::Pass;
use anyhow::{anyhow, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId, Var};
use std::collections::HashMap;

/// Logits rows per loss chunk for `m` label positions: equal chunks of at most 64M f32 logits
/// (256 MB) whatever the vocabulary. Each chunk streams the whole LM-head matrix through the GEMM
/// twice (logits, then input gradient), so few, large and even chunks are fastest; at Qwen3's
/// vocabulary a 441-token micro-batch is one chunk.
pub fn loss_chunk_rows(vocab: usize, m: usize) -> usize {
    let max_rows = ((64 << 20) / vocab).clamp(16, 8192);
    m.div_ceil(m.div_ceil(max_rows).max(1)).max(1)
}

/// The sum of token losses of one micro-batch, its correct predictions and targets.
pub struct MicroStats {
    pub loss_sum: f64,
    pub correct: u64,
    pub targets: u64,
}

/// Chunked LM head + cross-entropy on the final hidden states `h (N, H)`. With `scale`, also
/// backpropagates `scale · Σ CE` into `h`'s graph and returns the resulting gradients; the full
/// `(M, V)` logits never exist at once.
pub(super) fn head_loss(
    model: &Qwen3,
    h: &Tensor,
    b: &Batch,
    scale: Option<f64>,
) -> Result<(MicroStats, Option<GradStore>)> {
    let normed = model.final_norm(h)?;
    let sel = normed.index_select(&b.positions, 0)?; // (M, H)
    let sel_detached = sel.detach();
    let rows = loss_chunk_rows(model.cfg.vocab_size, b.n_targets);
    let mut stats = MicroStats {
        loss_sum: 0.0,
        correct: 0,
        targets: b.n_targets as u64,
    };
    let mut sel_grads = Vec::new();
    let mut start = 0;
    while start < b.n_targets {
        let c = rows.min(b.n_targets - start);
        let chunk = sel_detached.narrow(0, start, c)?;
        let tgt = b.targets.narrow(0, start, c)?;
        let (s, dx) = head_xent(&chunk, &model.lm_head, &tgt, scale)?;
        stats.loss_sum += s.loss_sum;
        stats.correct += s.correct;
        sel_grads.extend(dx); // (C, H)
        start += c;
    }
    let Some(_) = scale else {
        return Ok((stats, None));
    };
    if sel_grads.is_empty() {
        return Ok((stats, Some(GradStore::default())));
    }
    let g_sel = Tensor::cat(&sel_grads, 0)?; // (M, H)
    let grads = (sel * g_sel.to_dtype(sel_detached.dtype())?)?
        .sum_all()?
        .backward()?;
    Ok((stats, Some(grads)))
}

/// Forward + backward of one micro-batch; LoRA gradients are added into `acc`.
pub fn micro_step(
    model: &Qwen3,
    b: &Batch,
    scale: f64,
    dropout_key: Option<u64>,
    checkpointing: bool,
    acc: &mut HashMap<TensorId, Tensor>,
) -> Result<MicroStats> {
    // A LoRA weight's gradient is in candle's store, or where a one-op decoder layer left it.
    let mut add = |v: &Var, g: Option<&Tensor>| -> Result<()> {
        let taken = model.lora_grads.take(v.id());
        let g = g
            .or(taken.as_ref())
            .ok_or_else(|| anyhow!("a LoRA weight received no gradient (graph cut)"))?;
        match acc.get_mut(&v.id()) {
            Some(a) => *a = (&*a + g)?,
            None => {
                acc.insert(v.id(), g.clone());
            }
        }
        Ok(())
    };
    let x = model.embed(&b.packed)?;
    if !checkpointing {
        let pass = Pass {
            track: true,
            dropout_key,
        };
        let h = model.forward(&b.packed, pass)?;
        let (stats, grads) = head_loss(model, &h, b, Some(scale))?;
        let grads = grads.expect("scaled");
        for i in 0..model.layers.len() {
            for v in model.layer_vars(i) {
                add(v, grads.get(v))?;
            }
        }
        return Ok(stats);
    }
    // 1. Forward without a graph, keeping each layer's input.
    let no_grad = Pass {
        track: false,
        dropout_key,
    };
    let mut inputs = Vec::with_capacity(model.layers.len());
    let mut h = x;
    for i in 0..model.layers.len() {
        let next = model.layer_forward(i, &h, &b.packed, no_grad)?;
        inputs.push(h);
        h = next;
    }
    // 2. Loss and its gradient with respect to the last hidden state.
    let hv = Var::from_tensor(&h)?;
    let (stats, grads) = head_loss(model, hv.as_tensor(), b, Some(scale))?;
    let mut g = grads
        .and_then(|gs| gs.get(&hv).cloned())
        .ok_or_else(|| anyhow!("no gradient reached the final hidden state"))?;
    // 3. Recompute each layer with a graph, newest first, and pull the gradient through it.
    let track = Pass {
        track: true,
        dropout_key,
    };
    for i in (0..model.layers.len()).rev() {
        let xv = Var::from_tensor(&inputs[i])?;
        let gs = model.layer_backward(i, xv.as_tensor(), &b.packed, track, &g)?;
        for v in model.layer_vars(i) {
            add(v, gs.get(v))?;
        }
        if i > 0 {
            g = gs.get(&xv).context("layer input gradient missing")?.clone();
        }
    }
    Ok(stats)
}
