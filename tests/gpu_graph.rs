//! The graph a GPU runs, run on the CPU: with sftd's CPU kernels off (`cpu_kernels::off_in`)
//! every op takes the composed candle path that CUDA takes. Its LoRA gradients against finite
//! differences in f64; its loss and gradients against the fused kernels' with dropout and
//! checkpointing, in f32 and with bf16 and f16 base weights; and 20 training steps against the
//! same run on the kernels. (Generation's path is checked in `generate_parity.rs`.)

mod common;

use candle_core::{DType, Device};
use common::grads::{
    assert_lora_gradients_match_finite_differences, f64_model_and_rows, loss_and_grads,
    random_lora, rel_err,
};
use common::train::{encoded_examples, run_steps, tiny_model, train_job};
use sftd::train::data::encode::Example;
use sftd::train::events::Control;
use sftd::train::model::Qwen3;
use sftd::train::nn::cpu_kernels::off_in;

#[test]
fn lora_gradients_of_the_gpu_graph_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, exs) = f64_model_and_rows(tmp.path());
    assert_eq!(
        off_in(|| assert_lora_gradients_match_finite_differences(&model, &exs)),
        56
    );
}

#[test]
fn the_gpu_graph_gives_the_fused_kernels_loss_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(tmp.path(), 3);
    let exs = encoded_examples(&dir, 3, 64);
    let refs: Vec<&Example> = exs.iter().collect();
    // f32 everywhere; then the narrow base weights, whose GEMMs run the same candle kernel on
    // both paths, so only the ops around them differ. Gradients pass each frozen projection
    // through a cast to the weights' dtype, which rounds the two paths' small differences to
    // its precision (measured here: f32 2.4e-5, bf16 8.7e-5, f16 1.3e-3).
    let cases = [
        (DType::F32, 1e-5, 1e-4),
        (DType::BF16, 1e-4, 2e-3),
        (DType::F16, 1e-4, 5e-3),
    ];
    for (dtype, loss_tol, grad_tol) in cases {
        let mut model = Qwen3::load(&dir, dtype, &Device::Cpu).unwrap();
        random_lora(&mut model, 5, 0.1);
        for checkpointing in [true, false] {
            // Dropout masks come from the CPU's keyed generator on both paths: equal keys, equal masks.
            let (l_fused, g_fused) = loss_and_grads(&model, &refs, Some(9), checkpointing);
            let (l_graph, g_graph) =
                off_in(|| loss_and_grads(&model, &refs, Some(9), checkpointing));
            let dl = (l_fused - l_graph).abs() / l_fused.abs();
            let (worst_key, worst) = g_fused
                .iter()
                .map(|(k, g)| (k.clone(), rel_err(&g_graph[k], g)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .unwrap();
            println!(
                "{dtype:?} checkpointing {checkpointing}: loss fused {l_fused:.7} graph {l_graph:.7} \
                 (rel {dl:.1e}); worst LoRA gradient rel L2 error {worst:.1e} ({worst_key})"
            );
            assert!(dl < loss_tol, "{dtype:?}: loss {l_graph} vs {l_fused}");
            assert!(
                worst < grad_tol,
                "{dtype:?}: {worst_key} differs by {worst}"
            );
        }
    }
}

#[test]
fn twenty_training_steps_on_the_gpu_graph_track_the_fused_kernels() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 1);
    let hp = serde_json::json!({
        "max_steps": 20, "batch_size": 2, "gradient_accumulation_steps": 2,
        "max_seq_len": 128, "loss_on": "all", "learning_rate": 0.01,
        "lora": {"r": 4, "dropout": 0.1}
    });
    let fused_job = train_job(tmp.path(), &model, "fused", 40, 1, hp.clone());
    let graph_job = train_job(tmp.path(), &model, "graph", 40, 1, hp);
    let (_, fused) = run_steps(&fused_job, &Control::new(), None).unwrap();
    let (_, graph) = off_in(|| run_steps(&graph_job, &Control::new(), None)).unwrap();
    assert_eq!(fused.len(), 20);
    assert_eq!(graph.len(), 20);
    for (f, g) in fused.iter().zip(&graph) {
        assert!(
            (f.train_loss - g.train_loss).abs() < 1e-4 * f.train_loss.abs(),
            "step {}: graph {} vs fused {}",
            f.step,
            g.train_loss,
            f.train_loss
        );
        let (fg, gg) = (f.grad_norm, g.grad_norm);
        assert!(
            (fg - gg).abs() < 1e-3 * fg,
            "step {}: grad norm {gg} vs {fg}",
            f.step
        );
    }
    assert!(fused[19].train_loss < fused[0].train_loss, "it learns");
}
