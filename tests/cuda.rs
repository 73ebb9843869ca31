//! CUDA against the CPU on a tiny generated Qwen3: forward loss and LoRA gradients in f32, f16
//! and (compute capability 8.0+) bf16, sftd's CUDA kernels against its CPU kernels one by one,
//! dropout masks drawn on the device, the cached causal mask,
//! a 20-step training run, and greedy generation with a PEFT adapter token for token against
//! transformers + PEFT (the serving path: prefill and KV-cached decode). Built only with `--features cuda`; run by `scripts/gpu-check.sh`.
//! Without a GPU each test says so and passes, unless `SFTD_REQUIRE_GPU=1` (as gpu-check sets).
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use common::grads::{loss_and_grads, random_lora, rel_err};
use common::train::{encoded_examples, run_steps, tiny_model, train_job};
use sftd::train::data::encode::Example;
use sftd::train::device::DeviceInfo;
use sftd::train::events::{Control, StepMetrics};
use sftd::train::model::Qwen3;
use std::collections::HashMap;
use std::path::Path;

fn gpu() -> Option<(Device, DeviceInfo)> {
    match Device::new_cuda(0) {
        Ok(d) => {
            let info = DeviceInfo::probe(&d).expect("probing cuda:0");
            eprintln!(
                "cuda:0 = {} (compute capability {:?})",
                info.name, info.compute_capability
            );
            Some((d, info))
        }
        Err(e) => {
            assert!(
                std::env::var("SFTD_REQUIRE_GPU").as_deref() != Ok("1"),
                "SFTD_REQUIRE_GPU=1 but no CUDA device: {e}"
            );
            eprintln!("no CUDA device ({e}); skipped");
            None
        }
    }
}

/// The base-weight dtypes this GPU runs: f32, f16, and bf16 from compute capability 8.0.
fn dtypes(info: &DeviceInfo) -> Vec<DType> {
    let mut v = vec![DType::F32, DType::F16];
    if info.compute_capability.is_some_and(|cc| cc >= (8, 0)) {
        v.push(DType::BF16);
    }
    v
}

/// The model with the same random non-zero LoRA (dropout 0.1) on `dev`.
fn model_on(dir: &Path, dtype: DType, dev: &Device) -> Qwen3 {
    let mut model = Qwen3::load(dir, dtype, dev).unwrap();
    random_lora(&mut model, 5, 0.1);
    model
}

/// Mean loss and LoRA gradients (moved to the CPU) of one micro-batch.
fn loss_and_grads_on_cpu(model: &Qwen3, exs: &[Example]) -> (f64, HashMap<String, Tensor>) {
    let refs: Vec<&Example> = exs.iter().collect();
    let (loss, grads) = loss_and_grads(model, &refs, None, true);
    let on_cpu = grads
        .into_iter()
        .map(|(k, g)| (k, g.to_device(&Device::Cpu).unwrap()))
        .collect();
    (loss, on_cpu)
}

#[test]
fn forward_and_gradients_match_the_cpu() {
    let Some((dev, info)) = gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tiny_model(tmp.path(), 13);
    let exs = encoded_examples(&dir, 3, 64);
    for dtype in dtypes(&info) {
        // Without dropout: the CPU and the GPU draw their masks from different generators.
        let (l_cpu, g_cpu) = loss_and_grads_on_cpu(&model_on(&dir, dtype, &Device::Cpu), &exs);
        let (l_gpu, g_gpu) = loss_and_grads_on_cpu(&model_on(&dir, dtype, &dev), &exs);
        let tol = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
        let dl = (l_cpu - l_gpu).abs() / l_cpu.abs();
        let worst = g_cpu
            .iter()
            .map(|(k, g)| rel_err(&g_gpu[k], g))
            .fold(0f64, f64::max);
        println!("{dtype:?}: loss cpu {l_cpu:.6} gpu {l_gpu:.6} (rel {dl:.1e}); worst LoRA gradient rel L2 error {worst:.1e}");
        assert!(dl < tol, "{dtype:?}: loss {l_gpu} vs {l_cpu}");
        assert!(worst < 5.0 * tol, "{dtype:?}: gradients differ by {worst}");
    }
}

#[test]
fn dropout_masks_are_drawn_on_the_device_from_their_key() {
    use sftd::train::nn::linear::dropout_mask;
    let Some((dev, _)) = gpu() else { return };
    let shape = candle_core::Shape::from((64, 256));
    let a = dropout_mask(DType::F32, &shape, 0.1, 42, &dev).unwrap();
    let b = dropout_mask(DType::F32, &shape, 0.1, 42, &dev).unwrap();
    let c = dropout_mask(DType::F32, &shape, 0.1, 43, &dev).unwrap();
    assert!(a.device().is_cuda());
    let same = |x: &Tensor, y: &Tensor| -> f32 {
        (x - y)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    assert_eq!(same(&a, &b), 0.0, "equal keys gave different masks");
    assert!(same(&a, &c) > 0.0, "different keys gave equal masks");
    let kept: f32 = a
        .ne(0f32)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    println!("dropout p=0.1: kept fraction {kept:.3}");
    assert!((kept - 0.9).abs() < 0.02, "kept {kept}");
}

#[test]
fn composed_causal_softmax_on_the_gpu_equals_the_cpu_kernel() {
    use sftd::train::nn::ops::{causal_softmax, causal_softmax_composed};
    let Some((dev, _)) = gpu() else { return };
    for t in [7usize, 300, 5] {
        let s = Tensor::randn(0f32, 1., (2, 3, t, t), &Device::Cpu).unwrap();
        let want = causal_softmax(&s, 0.3).unwrap();
        let got = causal_softmax_composed(&s.to_device(&dev).unwrap(), 0.3)
            .unwrap()
            .to_device(&Device::Cpu)
            .unwrap();
        let d: f32 = (got - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(d < 1e-5, "t={t}: {d}");
    }
}

/// Value and input gradients of `f` on the GPU (sftd's CUDA kernels) against the CPU (its CPU
/// kernels), for `inputs` made on the CPU and a random cotangent; relative L2 error below `tol`.
fn gpu_kernel_matches_cpu(
    what: &str,
    dev: &Device,
    inputs: &[Tensor],
    tol: f64,
    f: impl Fn(&[&Tensor], &Device) -> Tensor,
) {
    use candle_core::Var;
    // Each op here keeps its first input's shape.
    let cot = Tensor::randn(0f64, 1., inputs[0].shape(), &Device::Cpu)
        .and_then(|c| c.to_dtype(inputs[0].dtype()))
        .unwrap();
    let run = |d: &Device| -> Vec<Tensor> {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(d).unwrap()).unwrap())
            .collect();
        let xs: Vec<&Tensor> = vars.iter().map(|v| v.as_tensor()).collect();
        let out = f(&xs, d);
        let grads = (&out * cot.to_device(d).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut all = vec![out.to_device(&Device::Cpu).unwrap()];
        for x in &vars {
            all.push(grads.get(x).unwrap().to_device(&Device::Cpu).unwrap());
        }
        all
    };
    let want = run(&Device::Cpu);
    let got = run(dev);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        let err = rel_err(a, b);
        let name = if i == 0 {
            "value".to_string()
        } else {
            format!("gradient {i}")
        };
        println!("{what}: {name} relative L2 error {err:.1e}");
        assert!(err < tol, "{what}: {name} differs by {err}");
    }
}

/// sftd's CUDA kernels against its CPU kernels, value and gradient: causal softmax (rows
/// shorter than a warp, past a block's threads, f32 and f64), RMSNorm (a head's 128, a hidden
/// size's 2048, an odd 37), rotary embedding, and the SwiGLU gate.
#[test]
fn each_cuda_kernel_matches_its_cpu_kernel() {
    use sftd::train::nn::ops::{causal_softmax, rms_norm, rope, rope_tables};
    use sftd::train::nn::swiglu::swiglu;
    let Some((dev, _)) = gpu() else { return };
    assert!(
        sftd::train::nn::kernels_on(&dev).0 == "cuda",
        "SFTD_CUDA_KERNELS=off: this test checks the kernels"
    );
    let cpu = |shape: &[usize], dtype: DType| {
        Tensor::randn(0f64, 1., shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    for (t, dtype, tol) in [
        (1, DType::F32, 1e-5),
        (7, DType::F32, 1e-5),
        (300, DType::F32, 1e-5),
        (1030, DType::F32, 1e-5),
        (300, DType::F64, 1e-12),
    ] {
        gpu_kernel_matches_cpu(
            &format!("causal softmax, rows of {t}, {dtype:?}"),
            &dev,
            &[cpu(&[2, 3, t, t], dtype)],
            tol,
            |x, _| causal_softmax(x[0], 0.3).unwrap(),
        );
    }
    for c in [37, 128, 2048] {
        let w = cpu(&[c], DType::F32);
        gpu_kernel_matches_cpu(
            &format!("RMSNorm, rows of {c}"),
            &dev,
            &[cpu(&[50, c], DType::F32)],
            1e-5,
            |x, d| rms_norm(x[0], &w.to_device(d).unwrap(), 1e-6).unwrap(),
        );
    }
    let pos = Tensor::new(&[5u32, 0, 1, 2, 3, 700, 31], &Device::Cpu).unwrap();
    gpu_kernel_matches_cpu(
        "rotary embedding, 7 tokens of 4 heads of 128",
        &dev,
        &[cpu(&[7, 4, 128], DType::F32)],
        1e-5,
        |x, d| {
            let (cos, sin) = rope_tables(128, 1024, 1e6, d).unwrap();
            let p = pos.to_device(d).unwrap();
            let (cos, sin) = (
                cos.index_select(&p, 0).unwrap(),
                sin.index_select(&p, 0).unwrap(),
            );
            rope(x[0], &cos, &sin).unwrap()
        },
    );
    gpu_kernel_matches_cpu(
        "SwiGLU gate, 33 × 300",
        &dev,
        &[cpu(&[33, 300], DType::F32), cpu(&[33, 300], DType::F32)],
        1e-5,
        |x, _| swiglu(x[0], x[1]).unwrap(),
    );
}

#[test]
fn twenty_training_steps_on_the_gpu_track_the_cpu() {
    let Some((dev, info)) = gpu() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = tiny_model(tmp.path(), 13);
    // The GPU's own policy (auto), and f32; each against the CPU running the same policy.
    let auto = sftd::train::precision::Precision::Auto
        .resolve(&info)
        .unwrap()
        .name();
    for precision in [auto, "f32"] {
        let hp = serde_json::json!({
            "max_steps": 20, "batch_size": 2, "gradient_accumulation_steps": 1,
            "max_seq_len": 128, "loss_on": "all", "learning_rate": 0.01,
            "lora": {"r": 4, "dropout": 0.0}, "precision": precision
        });
        let run = |device: Device, out: String| -> Vec<StepMetrics> {
            let mut job = train_job(tmp.path(), &model, &out, 40, 1, hp.clone());
            job.device = device;
            run_steps(&job, &Control::new(), None).unwrap().1
        };
        let cpu = run(Device::Cpu, format!("cpu-{precision}"));
        let gpu = run(dev.clone(), format!("gpu-{precision}"));
        assert_eq!(cpu.len(), 20);
        assert_eq!(gpu.len(), 20);
        let tol = if precision == "f32" { 1e-3 } else { 2e-2 };
        println!("step,precision,cpu_loss,gpu_loss,gpu_loss_scale");
        for (c, g) in cpu.iter().zip(&gpu) {
            println!(
                "{},{precision},{:.6},{:.6},{:?}",
                c.step, c.train_loss, g.train_loss, g.loss_scale
            );
            assert!(
                (c.train_loss - g.train_loss).abs() < tol,
                "{precision} step {}: gpu {} vs cpu {}",
                c.step,
                g.train_loss,
                c.train_loss
            );
        }
        println!(
            "{precision}: gpu {:.0} tok/s, cpu {:.0} tok/s",
            gpu[19].tokens_per_second, cpu[19].tokens_per_second
        );
    }
}

/// The serving path on the GPU: the generation fixture (as `tests/generate_parity.rs` uses it
/// on the CPU) prefilled and decoded through the KV cache, with and without its adapter, token
/// for token against transformers + PEFT.
#[test]
fn greedy_generation_on_the_gpu_is_token_identical_to_transformers_peft() {
    let Some((dev, _)) = gpu() else { return };
    let generated = common::generate_fixture::assert_greedy_matches_transformers_peft(&dev);
    println!("greedy generation on the GPU: {generated} tokens, all equal to transformers + PEFT");
}

/// The GPU's attention node (candle's softmax, hand-written backward) at lengths past a tile,
/// several sequences packed, against the op-by-op composition on the CPU: value and q/k/v
/// gradients in f32.
#[test]
fn packed_attention_on_the_gpu_equals_the_composed_ops_on_the_cpu() {
    use candle_core::Var;
    use sftd::train::nn::attention_device::packed_attention_device;
    use sftd::train::nn::ops::packed_causal_attention_composed;
    let Some((dev, _)) = gpu() else { return };
    let segments = [(0usize, 300usize), (300, 1), (301, 700)];
    let n = 1001;
    let cpu = |shape: (usize, usize, usize)| Tensor::randn(0f32, 1., shape, &Device::Cpu).unwrap();
    let (q, k, v) = (cpu((n, 4, 64)), cpu((n, 2, 64)), cpu((n, 2, 64)));
    let g = cpu((n, 4, 64)).reshape((n, 256)).unwrap();
    type Attention =
        fn(&Tensor, &Tensor, &Tensor, &[(usize, usize)]) -> candle_core::Result<Tensor>;
    let run = |f: Attention, d: &Device| -> Vec<Tensor> {
        let vars: Vec<Var> = [&q, &k, &v]
            .iter()
            .map(|t| Var::from_tensor(&t.to_device(d).unwrap()).unwrap())
            .collect();
        let out = f(
            vars[0].as_tensor(),
            vars[1].as_tensor(),
            vars[2].as_tensor(),
            &segments,
        )
        .unwrap();
        let grads = (&out * g.to_device(d).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut all = vec![out.to_device(&Device::Cpu).unwrap()];
        for x in &vars {
            all.push(grads.get(x).unwrap().to_device(&Device::Cpu).unwrap());
        }
        all
    };
    let want = run(packed_causal_attention_composed, &Device::Cpu);
    let got = run(packed_attention_device, &dev);
    for (name, (a, b)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(got.iter().zip(&want))
    {
        let err = rel_err(a, b);
        println!("packed attention on the GPU: {name} relative L2 error {err:.1e}");
        assert!(err < 1e-4, "{name}: {err}");
    }
}
