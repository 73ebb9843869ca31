//! The GPU precision policies run on the CPU (candle's CPU backend has f16 and bf16): bf16 and
//! f16 base weights train within a stated tolerance of f32, the f16 loss scaler skips, backs off,
//! grows and survives a resume, a forward f16 overflow fails naming the layer, and the frozen
//! linear's input gradient under narrow weights matches f32.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::train::{run_steps, tiny_model, train_job};
use sftd::train::events::{Control, Outcome, StepMetrics};
use sftd::train::loss_scale::{with_test_hook, ScalerTestHook};
use sftd::train::nn::frozen_linear;
use sftd::train::trainer;
use std::path::{Path, PathBuf};

/// Largest |Δ loss| allowed between a bf16 or f16 run and the f32 run, per step (docs/gpu.md).
const LOSS_TOLERANCE_BF16: f64 = 2e-2;
const LOSS_TOLERANCE_F16: f64 = 2e-3;
/// Relative difference allowed in the first step's gradient norm.
const GRAD_NORM_REL_TOLERANCE: f64 = 1e-2;

fn hp(precision: &str) -> serde_json::Value {
    serde_json::json!({
        "max_steps": 8, "batch_size": 2, "gradient_accumulation_steps": 1, "max_seq_len": 96,
        "loss_on": "all", "learning_rate": 0.01, "warmup_ratio": 0,
        "lora": {"r": 4, "dropout": 0.1}, "precision": precision
    })
}

#[test]
fn bf16_and_f16_base_weights_train_within_tolerance_of_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 11);
    let (_, reference) = run_steps(
        &train_job(tmp.path(), &model, "f32", 24, 5, hp("f32")),
        &Control::new(),
        None,
    )
    .unwrap();
    assert_eq!(reference.len(), 8);
    assert!(reference
        .iter()
        .all(|m| m.loss_scale.is_none() && m.skipped_steps == 0));
    for (precision, tol) in [("bf16", LOSS_TOLERANCE_BF16), ("f16", LOSS_TOLERANCE_F16)] {
        let (outcome, steps) = run_steps(
            &train_job(tmp.path(), &model, precision, 24, 5, hp(precision)),
            &Control::new(),
            None,
        )
        .unwrap();
        assert!(matches!(outcome, Outcome::Completed { steps: 8, .. }));
        let mut worst = 0f64;
        for (a, b) in reference.iter().zip(&steps) {
            eprintln!(
                "{precision} step {}: loss {:.6} vs f32 {:.6} (Δ {:.2e}); grad norm {:.5} vs {:.5}",
                a.step,
                b.train_loss,
                a.train_loss,
                (a.train_loss - b.train_loss).abs(),
                b.grad_norm,
                a.grad_norm
            );
        }
        for (a, b) in reference.iter().zip(&steps) {
            let d = (a.train_loss - b.train_loss).abs();
            worst = worst.max(d);
            assert!(
                d < tol,
                "{precision} step {}: loss {} vs f32 {}",
                a.step,
                b.train_loss,
                a.train_loss
            );
        }
        // Step 1 starts from identical weights: its gradient differs by the GEMM rounding alone.
        // Later steps follow trajectories that drift apart (AdamW amplifies small differences).
        let (a, b) = (&reference[0], &steps[0]);
        assert!(
            (a.grad_norm - b.grad_norm).abs() < GRAD_NORM_REL_TOLERANCE * a.grad_norm,
            "{precision} step 1: grad norm {} vs f32 {}",
            b.grad_norm,
            a.grad_norm
        );
        eprintln!("{precision}: largest per-step |Δ loss| vs f32 = {worst:.2e}");
        // bf16 has no scaler; f16 scales from 2^16 and never needed to skip here.
        for m in &steps {
            match precision {
                "f16" => assert_eq!(m.loss_scale, Some(65536.0)),
                _ => assert_eq!(m.loss_scale, None),
            }
            assert_eq!(m.skipped_steps, 0);
        }
        // The loss still falls.
        assert!(steps[7].train_loss < steps[0].train_loss);
    }
}

#[test]
fn injected_overflows_skip_the_step_back_off_and_grow_again() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 11);
    let mut h = hp("f16");
    h["max_steps"] = 6.into();
    let j = train_job(tmp.path(), &model, "out", 24, 5, h);
    let hook = ScalerTestHook {
        nonfinite_grad_at_steps: vec![3],
        growth_interval: Some(2),
    };
    let (outcome, steps) = with_test_hook(hook, || run_steps(&j, &Control::new(), None)).unwrap();
    assert!(matches!(outcome, Outcome::Completed { steps: 6, .. }));
    let scales: Vec<f64> = steps.iter().map(|m| m.loss_scale.unwrap()).collect();
    // Two clean steps grow 2^16 to 2^17; the overflow at step 3 halves it; two more clean
    // steps grow it again.
    assert_eq!(
        scales,
        [65536.0, 65536.0, 131072.0, 65536.0, 65536.0, 131072.0]
    );
    let skipped: Vec<u64> = steps.iter().map(|m| m.skipped_steps).collect();
    assert_eq!(skipped, [0, 0, 1, 1, 1, 1]);
    assert!(!steps[2].grad_norm.is_finite());
    assert!(steps
        .iter()
        .enumerate()
        .all(|(i, m)| i == 2 || m.grad_norm.is_finite()));
    // The skipped step took no optimizer step: AdamW counted 5 updates in 6 steps.
    let ckpt = trainer::latest_checkpoint(&j.output_dir).unwrap();
    let opt =
        candle_core::safetensors::load(ckpt.join("optimizer.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(opt["step"].to_vec1::<u32>().unwrap(), [5]);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["loss_scaler"]["scale"], 131072.0);
    assert_eq!(state["loss_scaler"]["skipped_steps"], 1);
    // The emitted metrics carry the new fields; a skipped step's grad norm is null.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(j.output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[2]["loss_scale"], 131072.0);
    assert_eq!(lines[2]["skipped_steps"], 1);
    assert!(lines[2]["grad_norm"].is_null());
    let back: StepMetrics = serde_json::from_value(lines[2].clone()).unwrap();
    assert!(back.grad_norm.is_nan());
}

#[test]
fn an_overflow_without_loss_scaling_is_a_divergence() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 11);
    let j = train_job(tmp.path(), &model, "out", 24, 5, hp("bf16"));
    let hook = ScalerTestHook {
        nonfinite_grad_at_steps: vec![2],
        growth_interval: None,
    };
    let err = with_test_hook(hook, || run_steps(&j, &Control::new(), None)).unwrap_err();
    assert!(err.to_string().contains("diverged at step 2"), "{err}");
}

#[test]
fn resume_restores_the_loss_scaler_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 11);
    let mut h = hp("f16");
    h["save_steps"] = 3.into();
    let hook = ScalerTestHook {
        nonfinite_grad_at_steps: vec![2],
        growth_interval: Some(3),
    };
    let full = train_job(tmp.path(), &model, "full", 24, 5, h.clone());
    let (_, reference) =
        with_test_hook(hook.clone(), || run_steps(&full, &Control::new(), None)).unwrap();

    let mut split = train_job(tmp.path(), &model, "split", 24, 5, h);
    let (outcome, first) =
        with_test_hook(hook.clone(), || run_steps(&split, &Control::new(), Some(4))).unwrap();
    let Outcome::Suspended { checkpoint, .. } = outcome else {
        panic!("{outcome:?}")
    };
    split.resume_from = Some(checkpoint);
    // A resumed scaler keeps its own growth interval (3), not the default 2000.
    let (_, rest) = with_test_hook(
        ScalerTestHook {
            nonfinite_grad_at_steps: vec![2],
            growth_interval: None,
        },
        || run_steps(&split, &Control::new(), None),
    )
    .unwrap();
    let resumed: Vec<&StepMetrics> = first.iter().chain(&rest).collect();
    assert_eq!(resumed.len(), reference.len());
    for (a, b) in reference.iter().zip(resumed) {
        assert_eq!(a.step, b.step);
        assert_eq!(a.loss_scale, b.loss_scale, "step {}", a.step);
        assert_eq!(a.skipped_steps, b.skipped_steps, "step {}", a.step);
        assert!(
            (a.train_loss - b.train_loss).abs() < 1e-6,
            "step {}: {} vs {}",
            a.step,
            a.train_loss,
            b.train_loss
        );
    }
    // The scale moved during the run: 2^16, skip at 2 (→ 2^15), growth after steps 3-5 (→ 2^16).
    let scales: Vec<f64> = reference.iter().map(|m| m.loss_scale.unwrap()).collect();
    assert_eq!(
        scales,
        [65536.0, 65536.0, 32768.0, 32768.0, 32768.0, 65536.0, 65536.0, 65536.0]
    );
}

/// The tiny model with layer 1's `up_proj` able to overflow f16 (|output| > 65504) but not f32:
/// the post-attention norm passes only feature 0 (×10), and every weight of `up_proj` is 60000.
fn overflowing_model(dir: &Path) -> PathBuf {
    let m = tiny_model(dir, 11);
    let path = m.join("model.safetensors");
    let mut w = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let norm = "model.layers.1.post_attention_layernorm.weight";
    let h = w[norm].dim(0).unwrap();
    let mut v = vec![0f32; h];
    v[0] = 10.0;
    w.insert(norm.into(), Tensor::from_vec(v, h, &Device::Cpu).unwrap());
    let up = "model.layers.1.mlp.up_proj.weight";
    let shape = w[up].shape().clone();
    w.insert(
        up.into(),
        Tensor::full(60000f32, shape, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(&w, &path).unwrap();
    m
}

#[test]
fn a_forward_f16_overflow_fails_naming_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let model = overflowing_model(tmp.path());
    let mut h = hp("f16");
    h["max_steps"] = 2.into();
    let err = run_steps(
        &train_job(tmp.path(), &model, "f16", 24, 5, h.clone()),
        &Control::new(),
        None,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "f16 overflow in model.layers.1.mlp.up_proj output at step 1; use precision f32 or bf16"
    );
    // The same model trains in f32 and bf16 (whose exponent range is f32's).
    for p in ["f32", "bf16"] {
        h["precision"] = p.into();
        let (outcome, steps) = run_steps(
            &train_job(tmp.path(), &model, p, 24, 5, h.clone()),
            &Control::new(),
            None,
        )
        .unwrap();
        assert!(
            matches!(outcome, Outcome::Completed { steps: 2, .. }),
            "{p}"
        );
        assert!(steps.iter().all(|m| m.train_loss.is_finite()), "{p}");
    }
}

/// Relative L2 error of `got` against `want`.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    let d: f64 = (got - want)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap();
    let n: f64 = want
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap();
    (d / n).sqrt()
}

#[test]
fn narrow_frozen_linear_keeps_f32_in_and_out_and_matches_f32_gradients() {
    let dev = Device::Cpu;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., (24, 96), &dev).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 0.1, (40, 96), &dev).unwrap();
    let g = Tensor::randn(0f32, 1., (24, 40), &dev).unwrap();
    let forward_and_grad = |w: &Tensor| {
        let y = frozen_linear(x.as_tensor(), w).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = grads.get(&x).expect("input gradient").clone();
        assert_eq!(gx.dtype(), DType::F32);
        assert!(grads.get(w).is_none(), "the frozen weight got a gradient");
        (y, gx)
    };
    let (y32, gx32) = forward_and_grad(&w);
    // bf16 keeps 8 significant bits, f16 11: relative errors of about 2^-9 and 2^-11 per value.
    for (dtype, tol) in [(DType::BF16, 1e-2), (DType::F16, 2e-3)] {
        let (y, gx) = forward_and_grad(&w.to_dtype(dtype).unwrap());
        let (ey, eg) = (rel_err(&y, &y32), rel_err(&gx, &gx32));
        assert!(
            ey < tol && eg < tol,
            "{dtype:?}: output {ey:.1e}, input gradient {eg:.1e}"
        );
        assert!(ey > 0.0, "{dtype:?} ran in f32");
    }
}
