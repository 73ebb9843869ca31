//! Loss and token accuracy over a validation set.

use super::batch::make_batch;
use super::step::head_loss;
use crate::train::data::encode::Example;
use crate::train::model::Qwen3;
use crate::train::nn::Pass;
use anyhow::Result;

/// Loss and accuracy over a whole dataset, without gradients or dropout.
pub fn evaluate(model: &Qwen3, examples: &[Example], batch_size: usize) -> Result<(f64, f64, u64)> {
    let (mut loss, mut correct, mut targets) = (0.0, 0u64, 0u64);
    let pass = Pass {
        track: false,
        dropout_key: None,
    };
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let b = make_batch(model, &refs)?;
        let h = model.forward(&b.packed, pass)?;
        let (s, _) = head_loss(model, &h, &b, None)?;
        loss += s.loss_sum;
        correct += s.correct;
        targets += s.targets;
    }
    let n = targets.max(1) as f64;
    Ok((loss / n, correct as f64 / n, targets))
}
