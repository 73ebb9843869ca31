//! The one-op decoder layer (`nn::layer`) against the same layer composed from candle's tensor
//! ops: output, input gradient and every LoRA gradient, f32 and f64, plus central finite
//! differences in f64.

use super::{Packed, Qwen3, Qwen3Config, MODULES};
use crate::train::nn::ops::{packed_causal_attention_composed, rms_norm_composed, rope_composed};
use crate::train::nn::testing::assert_close;
use crate::train::nn::Pass;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;

const SEGMENTS: [usize; 2] = [5, 3];

/// A one-layer random model (hidden 16, intermediate 24, 4/2 heads of 8) with LoRA on every
/// projection except `v_proj` (so the plain-projection path runs too).
fn model(dtype: DType) -> Qwen3 {
    model_without_lora_on(dtype, "v_proj")
}

fn model_without_lora_on(dtype: DType, plain: &str) -> Qwen3 {
    model_with(dtype, plain, 0.0)
}

/// [`model`] without LoRA on `plain` and with LoRA dropout `dropout`.
fn model_with(dtype: DType, plain: &str, dropout: f64) -> Qwen3 {
    let dev = Device::Cpu;
    let cfg = Qwen3Config {
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 1,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: Some(8),
        max_position_embeddings: 64,
        rope_theta: 10_000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: true,
        attention_bias: false,
        hidden_act: "silu".into(),
        model_type: Some("qwen3".into()),
    };
    let rnd = |shape: &[usize], mean: f64, std: f64| {
        Tensor::randn(mean, std, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let mut t = HashMap::new();
    let l = "model.layers.0";
    t.insert("model.embed_tokens.weight".into(), rnd(&[32, 16], 0., 1.));
    t.insert("model.norm.weight".into(), rnd(&[16], 1., 0.1));
    for (name, n) in [
        ("input_layernorm", 16),
        ("post_attention_layernorm", 16),
        ("self_attn.q_norm", 8),
        ("self_attn.k_norm", 8),
    ] {
        t.insert(format!("{l}.{name}.weight"), rnd(&[n], 1., 0.2));
    }
    for (name, shape) in [
        ("self_attn.q_proj", [32, 16]),
        ("self_attn.k_proj", [16, 16]),
        ("self_attn.v_proj", [16, 16]),
        ("self_attn.o_proj", [16, 32]),
        ("mlp.gate_proj", [24, 16]),
        ("mlp.up_proj", [24, 16]),
        ("mlp.down_proj", [16, 24]),
    ] {
        t.insert(format!("{l}.{name}.weight"), rnd(&shape, 0., 0.3));
    }
    let vb = candle_nn::VarBuilder::from_tensors(t, dtype, &dev);
    let mut m = Qwen3::from_vb(cfg, vb, dtype, &dev).unwrap();
    let targets: Vec<String> = MODULES
        .iter()
        .filter(|&&m| m != plain)
        .map(|m| m.to_string())
        .collect();
    m.attach_lora(&targets, 4, 1.5, dropout, |_, (r, c)| {
        Ok(Tensor::randn(0f64, 0.3, (r, c), &dev)?.to_dtype(dtype)?)
    })
    .unwrap();
    m
}

/// A random input (or output gradient) for the test layer: one row per packed token.
fn random_rows(dtype: DType) -> Tensor {
    let n: usize = SEGMENTS.iter().sum();
    Tensor::randn(0f64, 1., (n, 16), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn packed(m: &Qwen3) -> Packed {
    let seqs: Vec<Vec<u32>> = SEGMENTS
        .iter()
        .map(|&t| (0..t as u32).map(|i| (i * 7) % 32).collect())
        .collect();
    let refs: Vec<&[u32]> = seqs.iter().map(|s| s.as_slice()).collect();
    m.pack(&refs).unwrap()
}

/// The layer from candle tensor ops only (the oracle): HF Qwen3's layer with PEFT's LoRA.
fn composed(m: &Qwen3, x: &Tensor, p: &Packed) -> Tensor {
    let l = &m.layers[0];
    let (n, _) = x.dims2().unwrap();
    let eps = m.cfg.rms_norm_eps;
    let proj = |i: usize, x: &Tensor| {
        let pr = &l.proj[i];
        let y = x.matmul(&pr.weight.t().unwrap()).unwrap();
        match &pr.lora {
            Some(lo) => {
                let d = x
                    .matmul(&lo.a.as_tensor().t().unwrap())
                    .unwrap()
                    .matmul(&lo.b.as_tensor().t().unwrap())
                    .unwrap();
                (y + (d * lo.scaling).unwrap()).unwrap()
            }
            None => y,
        }
    };
    let h = rms_norm_composed(x, &l.input_norm, eps).unwrap();
    let q = proj(0, &h).reshape((n, 4, 8)).unwrap();
    let k = proj(1, &h).reshape((n, 2, 8)).unwrap();
    let v = proj(2, &h).reshape((n, 2, 8)).unwrap();
    let q = rope_composed(
        &rms_norm_composed(&q, &l.q_norm, eps).unwrap(),
        &p.cos,
        &p.sin,
    )
    .unwrap();
    let k = rope_composed(
        &rms_norm_composed(&k, &l.k_norm, eps).unwrap(),
        &p.cos,
        &p.sin,
    )
    .unwrap();
    let attn = packed_causal_attention_composed(&q, &k, &v, &p.segments).unwrap();
    let x = (x + proj(3, &attn)).unwrap();
    let h = rms_norm_composed(&x, &l.post_attn_norm, eps).unwrap();
    let z = (proj(4, &h).silu().unwrap() * proj(5, &h)).unwrap();
    (x + proj(6, &z)).unwrap()
}

const TRACK: Pass = Pass {
    track: true,
    dropout_key: None,
};

/// `(y, dL/dx, dL/d(each LoRA var))` for `L = Σ y ⊙ cot`, by the one-op layer or the oracle.
fn run(m: &Qwen3, x0: &Tensor, cot: &Tensor, one_op: bool) -> (Tensor, Tensor, Vec<Tensor>) {
    let p = packed(m);
    let x = Var::from_tensor(x0).unwrap();
    let y = if one_op {
        m.layer_forward(0, x.as_tensor(), &p, TRACK).unwrap()
    } else {
        composed(m, x.as_tensor(), &p)
    };
    let gs = (&y * cot).unwrap().sum_all().unwrap().backward().unwrap();
    let lora = m
        .lora_vars()
        .iter()
        .map(|(_, v)| {
            let sunk = m.lora_grads.take(v.id());
            gs.get(v).cloned().or(sunk).expect("LoRA gradient")
        })
        .collect();
    (y, gs.get(&x).expect("x gradient").clone(), lora)
}

fn check(dtype: DType, tol: f64) {
    let m = model(dtype);
    let n: usize = SEGMENTS.iter().sum();
    let x0 = Tensor::randn(0f64, 1., (n, 16), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let cot = Tensor::randn(0f64, 1., (n, 16), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let (fy, fx, fl) = run(&m, &x0, &cot, true);
    let (cy, cx, cl) = run(&m, &x0, &cot, false);
    // `tol` per unit of the oracle's largest magnitude (at least 1): the inputs are random, and
    // a LoRA gradient sums over tokens, so its f32 rounding grows with it (an absolute 1e-4 failed
    // about one run in 300 with a difference of 1.1e-4).
    let close = |a: &Tensor, b: &Tensor, what: String| {
        let scale = b
            .abs()
            .and_then(|v| v.max_all())
            .and_then(|v| v.to_dtype(DType::F64))
            .and_then(|v| v.to_scalar::<f64>())
            .unwrap();
        assert_close(a, b, tol * scale.max(1.0), what)
    };
    close(&fy, &cy, format!("{dtype:?} y"));
    close(&fx, &cx, format!("{dtype:?} dx"));
    assert_eq!(fl.len(), 12, "six LoRA pairs");
    for (i, (f, c)) in fl.iter().zip(&cl).enumerate() {
        close(f, c, format!("{dtype:?} LoRA grads {i}"));
    }
}

#[test]
fn one_op_layer_equals_composed_ops_with_gradients_f32() {
    check(DType::F32, 1e-4);
}

#[test]
fn one_op_layer_equals_composed_ops_with_gradients_f64() {
    check(DType::F64, 1e-11);
}

/// Analytic gradients of the one-op layer against central differences of its own forward, for
/// entries of x and of every LoRA matrix, in f64.
#[test]
fn one_op_layer_gradients_match_finite_differences() {
    let m = model(DType::F64);
    let n: usize = SEGMENTS.iter().sum();
    let x0 = Tensor::randn(0f64, 1., (n, 16), &Device::Cpu).unwrap();
    let cot = Tensor::randn(0f64, 1., (n, 16), &Device::Cpu).unwrap();
    let (_, gx, gl) = run(&m, &x0, &cot, true);
    let untracked = Pass {
        track: false,
        dropout_key: None,
    };
    check_finite_differences(&m, untracked, &x0, &cot, &gx, &gl);
}

/// Checks the input gradient `gx` and the LoRA gradients `gl` (in `lora_vars` order) of
/// `sum(layer_forward(x0) · cot)` under `pass` (untracked) against central differences, at a
/// few positions of each.
fn check_finite_differences(
    m: &Qwen3,
    pass: Pass,
    x0: &Tensor,
    cot: &Tensor,
    gx: &Tensor,
    gl: &[Tensor],
) {
    let p = packed(m);
    let loss = |x: &Tensor| -> f64 {
        let y = m.layer_forward(0, x, &p, pass).unwrap();
        (y * cot)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let eps = 1e-6;
    let nudge = |t: &Tensor, at: usize, by: f64| -> Tensor {
        let mut v = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        v[at] += by;
        Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
    };
    let close = |num: f64, ana: f64, what: &str| {
        assert!(
            (num - ana).abs() <= 1e-6 * (1.0 + ana.abs()),
            "{what}: finite difference {num} vs analytic {ana}"
        );
    };
    let gx = gx.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for at in [0, 17, 5 * 16 + 3, gx.len() - 1] {
        let num = (loss(&nudge(x0, at, eps)) - loss(&nudge(x0, at, -eps))) / (2. * eps);
        close(num, gx[at], &format!("x[{at}]"));
    }
    for (k, (name, var)) in m.lora_vars().iter().enumerate() {
        let orig = var.as_tensor().copy().unwrap();
        let ana = gl[k].flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for at in [0, orig.elem_count() / 2, orig.elem_count() - 1] {
            let f = |by: f64| {
                var.set(&nudge(&orig, at, by)).unwrap();
                loss(x0)
            };
            let num = (f(eps) - f(-eps)) / (2. * eps);
            var.set(&orig).unwrap();
            close(num, ana[at], &format!("{name}[{at}]"));
        }
    }
}

/// The first layer of an un-checkpointed step sees the embedding, which is not tracked: the op
/// still records itself (through its LoRA weights) and leaves their gradients, and no input
/// gradient is computed.
#[test]
fn untracked_input_still_gets_lora_gradients() {
    let m = model(DType::F32);
    let n: usize = SEGMENTS.iter().sum();
    let x = Tensor::randn(0f32, 1., (n, 16), &Device::Cpu).unwrap();
    let cot = Tensor::randn(0f32, 1., (n, 16), &Device::Cpu).unwrap();
    let y = m.layer_forward(0, &x, &packed(&m), TRACK).unwrap();
    let gs = (y * cot).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in m.lora_vars() {
        let sunk = m.lora_grads.take(v.id());
        assert!(
            gs.get(&v).is_some() || sunk.is_some(),
            "{name} got no gradient"
        );
    }
}

/// A checkpointed layer's backward (`layer_backward`, which skips the down projection's product)
/// gives exactly the gradients of the forward and backward it replaces, with LoRA on down_proj
/// and without.
#[test]
fn gradient_only_recompute_gives_exactly_the_full_gradients() {
    for plain in ["v_proj", "down_proj"] {
        for dtype in [DType::F32, DType::F64] {
            let m = model_without_lora_on(dtype, plain);
            let (x0, cot) = (random_rows(dtype), random_rows(dtype));
            let p = packed(&m);
            let bits = |t: &Tensor| -> Vec<u64> {
                let v = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                v.to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|f| f.to_bits())
                    .collect()
            };
            let grads = |gs: &candle_core::backprop::GradStore, x: &Var| -> Vec<Vec<u64>> {
                let mut all = vec![bits(gs.get(x).expect("x gradient"))];
                for (name, v) in m.lora_vars() {
                    let g = gs.get(&v).cloned().or(m.lora_grads.take(v.id()));
                    all.push(bits(&g.unwrap_or_else(|| panic!("{name}: no gradient"))));
                }
                all
            };
            let x = Var::from_tensor(&x0).unwrap();
            let y = m.layer_forward(0, x.as_tensor(), &p, TRACK).unwrap();
            let full = grads(
                &(y * &cot).unwrap().sum_all().unwrap().backward().unwrap(),
                &x,
            );
            let x = Var::from_tensor(&x0).unwrap();
            let gs = m.layer_backward(0, x.as_tensor(), &p, TRACK, &cot).unwrap();
            let recomputed = grads(&gs, &x);
            assert_eq!(full.len(), 13);
            for (k, (a, b)) in full.iter().zip(&recomputed).enumerate() {
                assert!(
                    a == b,
                    "{dtype:?}, no LoRA on {plain}: gradient {k} differs"
                );
            }
        }
    }
}

/// `(y, dL/dx, dL/d(each LoRA var))` for `L = Σ y ⊙ cot` under `pass`, by the one-op layer or
/// the per-op path; the one-op layer must have run (its LoRA gradients are in the sink).
fn run_pass(m: &Qwen3, x0: &Tensor, cot: &Tensor, pass: Pass, one_op: bool) -> Vec<Tensor> {
    let p = packed(m);
    let x = Var::from_tensor(x0).unwrap();
    let y = if one_op {
        m.layer_forward(0, x.as_tensor(), &p, pass).unwrap()
    } else {
        m.layer_forward_ops(0, x.as_tensor(), &p, pass).unwrap()
    };
    let gs = (&y * cot).unwrap().sum_all().unwrap().backward().unwrap();
    let mut out = vec![y, gs.get(&x).expect("x gradient").clone()];
    for (name, v) in m.lora_vars() {
        let sunk = m.lora_grads.take(v.id());
        assert_eq!(
            sunk.is_some(),
            one_op,
            "{name}: gradient from the wrong path"
        );
        out.push(gs.get(&v).cloned().or(sunk).expect("LoRA gradient"));
    }
    out
}

/// With LoRA dropout (p 0.3; a mask per projection, keyed by the pass, the layer and the
/// projection) the one-op layer equals the per-op path, which draws its masks itself: output,
/// input gradient and every LoRA gradient, f32 and f64; without LoRA on v_proj and on down_proj.
/// Another key gives another output, so the masks are really drawn.
#[test]
fn one_op_layer_with_dropout_equals_the_per_op_path() {
    for (dtype, tol) in [(DType::F32, 1e-4), (DType::F64, 1e-11)] {
        for plain in ["v_proj", "down_proj"] {
            let m = model_with(dtype, plain, 0.3);
            let (x0, cot) = (random_rows(dtype), random_rows(dtype));
            let pass = |key| Pass {
                track: true,
                dropout_key: Some(key),
            };
            let fused = run_pass(&m, &x0, &cot, pass(0x5eed), true);
            let per_op = run_pass(&m, &x0, &cot, pass(0x5eed), false);
            assert_eq!(fused.len(), 2 + 12);
            for (k, (f, c)) in fused.iter().zip(&per_op).enumerate() {
                let scale = c.abs().unwrap().max_all().unwrap();
                let scale = scale
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert_close(f, c, tol * scale.max(1.0), format!("{dtype:?} {plain} {k}"));
            }
            let other = run_pass(&m, &x0, &cot, pass(0x5eee), true);
            let moved = (&other[0] - &fused[0]).unwrap().abs().unwrap();
            let moved = moved.max_all().unwrap().to_dtype(DType::F64).unwrap();
            assert!(
                moved.to_scalar::<f64>().unwrap() > 1e-3,
                "another key, same masks"
            );
        }
    }
}

/// The one-op layer's gradients under dropout against central differences of its own forward
/// (the masks are a function of the key, so the loss is a function of x and the weights), and
/// its checkpointed recompute (`layer_backward`) gives exactly the same gradients.
#[test]
fn one_op_layer_with_dropout_matches_finite_differences_and_its_recompute() {
    let m = model_with(DType::F64, "v_proj", 0.3);
    let n: usize = SEGMENTS.iter().sum();
    let x0 = Tensor::randn(0f64, 1., (n, 16), &Device::Cpu).unwrap();
    let cot = Tensor::randn(0f64, 1., (n, 16), &Device::Cpu).unwrap();
    let pass = Pass {
        track: true,
        dropout_key: Some(77),
    };
    let grads = run_pass(&m, &x0, &cot, pass, true);
    let p = packed(&m);
    let x = Var::from_tensor(&x0).unwrap();
    let gs = m.layer_backward(0, x.as_tensor(), &p, pass, &cot).unwrap();
    let mut recomputed = vec![gs.get(&x).unwrap().clone()];
    for (_, v) in m.lora_vars() {
        recomputed.push(m.lora_grads.take(v.id()).expect("sunk gradient"));
    }
    for (k, (a, b)) in grads[1..].iter().zip(&recomputed).enumerate() {
        let (a, b) = (a.flatten_all().unwrap(), b.flatten_all().unwrap());
        assert_eq!(
            a.to_vec1::<f64>().unwrap(),
            b.to_vec1::<f64>().unwrap(),
            "{k}"
        );
    }
    let untracked = Pass {
        track: false,
        ..pass
    };
    check_finite_differences(&m, untracked, &x0, &cot, &grads[1], &grads[2..]);
}

/// What `weighted_sum_backward` relies on: a non-scalar root's backward gives the
/// gradients of its sum.
#[test]
fn a_non_scalar_backward_gives_the_gradients_of_the_sum() {
    let x = Var::from_tensor(&Tensor::randn(0f64, 1., (5, 7), &Device::Cpu).unwrap()).unwrap();
    let g = Tensor::randn(0f64, 1., (5, 7), &Device::Cpu).unwrap();
    let out = x.as_tensor().sqr().unwrap().exp().unwrap();
    let weighted = (&out * &g).unwrap();
    let of_sum = weighted.sum_all().unwrap().backward().unwrap();
    let of_root = weighted.backward().unwrap();
    assert_close(
        of_root.get(&x).unwrap(),
        of_sum.get(&x).unwrap(),
        1e-15,
        "non-scalar root",
    );
}
