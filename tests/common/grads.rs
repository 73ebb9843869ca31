//! Gradient fixtures for tests that drive the model directly: a random non-zero LoRA, one
//! micro-batch's loss and LoRA gradients, and the check of those gradients against central finite
//! differences.

use candle_core::{DType, Device, Tensor};
use sftd::train::data::encode::Example;
use sftd::train::model::Qwen3;
use sftd::train::trainer::{self, make_batch, micro_step};
use std::collections::HashMap;

/// LoRA r 4 on all seven projections with random non-zero A and B (drawn from `seed`), so every
/// gradient is informative; `dropout` on each module's input.
pub fn random_lora(model: &mut Qwen3, seed: u64, dropout: f64) {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let dev = model.device.clone();
    let dtype = model.dtype;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let normal = rand_distr::Normal::new(0f32, 0.3).unwrap();
    let targets = sftd::train::spec::ALL_LINEAR.map(String::from);
    model
        .attach_lora(&targets, 4, 2.0, dropout, |_, (rows, cols)| {
            let data: Vec<f32> = (0..rows * cols).map(|_| normal.sample(&mut rng)).collect();
            Ok(Tensor::from_vec(data, (rows, cols), &dev)?.to_dtype(dtype)?)
        })
        .unwrap();
}

/// Loss (Σ CE / N) and LoRA gradients of a micro-batch; `dropout_key` draws the dropout masks.
pub fn loss_and_grads(
    model: &Qwen3,
    exs: &[&Example],
    dropout_key: Option<u64>,
    checkpointing: bool,
) -> (f64, HashMap<String, Tensor>) {
    let b = make_batch(model, exs).unwrap();
    let mut acc = HashMap::new();
    let s = micro_step(
        model,
        &b,
        1.0 / b.n_targets as f64,
        dropout_key,
        checkpointing,
        &mut acc,
    )
    .unwrap();
    let grads = model
        .lora_vars()
        .into_iter()
        .map(|(k, v)| (k, acc.remove(&v.id()).unwrap()))
        .collect();
    (s.loss_sum / b.n_targets as f64, grads)
}

/// ‖got − want‖ / ‖want‖, in f64.
pub fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let sq = |t: Tensor| -> f64 {
        t.to_dtype(DType::F64)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    (sq((got - want).unwrap()) / sq(want.clone()).max(1e-30)).sqrt()
}

/// The finite-difference fixture: the tiny model from seed 7 in f64 on the CPU with a random
/// LoRA (no dropout), and two rows of up to 48 tokens, written under `dir`.
pub fn f64_model_and_rows(dir: &std::path::Path) -> (Qwen3, Vec<Example>) {
    let model_dir = super::train::tiny_model(dir, 7);
    let mut model = Qwen3::load(&model_dir, DType::F64, &Device::Cpu).unwrap();
    random_lora(&mut model, 1, 0.0);
    (model, super::train::encoded_examples(&model_dir, 2, 48))
}

/// Σ CE / N of a micro-batch by a forward pass alone (for finite differences).
pub fn loss_only(model: &Qwen3, exs: &[Example]) -> f64 {
    trainer::evaluate(model, exs, exs.len()).unwrap().0
}

/// Checks the backward pass of an f64 `model` without dropout: for every LoRA tensor, its
/// largest gradient element and one drawn at random against central differences of the loss
/// (relative 1e-4). Returns how many elements were checked.
pub fn assert_lora_gradients_match_finite_differences(model: &Qwen3, exs: &[Example]) -> usize {
    use rand::{Rng, SeedableRng};
    let refs: Vec<&Example> = exs.iter().collect();
    let (loss, grads) = loss_and_grads(model, &refs, None, true);
    assert!((loss - loss_only(model, exs)).abs() < 1e-12);
    let vars = model.lora_vars();
    // Every LoRA tensor of the fixture: A and B of the 7 projections in both layers.
    assert_eq!(vars.len(), 28);
    let eps = 1e-5;
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut checked = 0;
    for (key, var) in &vars {
        let analytic = grads[key].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = var.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Its largest gradient element (an informative one) and one drawn at random.
        let largest = (0..analytic.len())
            .max_by(|&a, &b| analytic[a].abs().total_cmp(&analytic[b].abs()))
            .unwrap();
        assert!(analytic[largest].abs() > 1e-6, "{key}: no gradient");
        for idx in [largest, rng.random_range(0..base.len())] {
            let set = |values: Vec<f64>| {
                var.set(&Tensor::from_vec(values, var.shape(), &Device::Cpu).unwrap())
                    .unwrap()
            };
            let mut plus = base.clone();
            plus[idx] += eps;
            set(plus);
            let lp = loss_only(model, exs);
            let mut minus = base.clone();
            minus[idx] -= eps;
            set(minus);
            let lm = loss_only(model, exs);
            set(base.clone());
            let numeric = (lp - lm) / (2.0 * eps);
            let err =
                (numeric - analytic[idx]).abs() / numeric.abs().max(analytic[idx].abs()).max(1e-8);
            assert!(
                err < 1e-4 || (numeric - analytic[idx]).abs() < 1e-9,
                "{key}[{idx}]: analytic {} vs numeric {numeric}",
                analytic[idx]
            );
            checked += 1;
        }
    }
    checked
}
