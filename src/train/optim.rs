//! AdamW with saveable state (torch.optim.AdamW's update), global-norm clipping, and the
//! learning-rate schedules of transformers' `get_*_schedule_with_warmup`.

use crate::train::spec::LrScheduler;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

pub struct AdamW {
    /// (PEFT key, parameter) in a fixed order.
    pub params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Optimizer steps taken.
    pub step: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, weight_decay: f64) -> Result<Self> {
        let zeros = |p: &Var| p.zeros_like().map(|t| t.detach());
        let m = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            params,
            m,
            v,
            step: 0,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        })
    }

    /// One update with `grads[i]` for `params[i]`:
    /// θ ← θ(1 − lr·wd) − lr/(1−β1ᵗ) · m / (√v/√(1−β2ᵗ) + ε).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let bc1 = 1.0 - self.beta1.powi(t);
        let bc2 = 1.0 - self.beta2.powi(t);
        for (i, (_, p)) in self.params.iter().enumerate() {
            let g = &grads[i];
            let m = ((&self.m[i] * self.beta1)? + (g * (1.0 - self.beta1))?)?;
            let v = ((&self.v[i] * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + self.eps)?;
            let theta = (p.as_tensor() * (1.0 - lr * self.weight_decay))?;
            let theta = (theta - ((m.clone() / denom)? * (lr / bc1))?)?;
            p.set(&theta)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Moments and step count as named tensors (for `optimizer.safetensors`).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("{name}.exp_avg"), self.m[i].clone());
            out.insert(format!("{name}.exp_avg_sq"), self.v[i].clone());
        }
        let dev = self
            .params
            .first()
            .map(|p| p.1.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        out.insert("step".into(), Tensor::new(&[self.step as u32], &dev)?);
        Ok(out)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state()?, path)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self
            .params
            .first()
            .map(|p| p.1.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let mut st = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("reading {}", path.display()))?;
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (slot, suffix) in [(&mut self.m[i], "exp_avg"), (&mut self.v[i], "exp_avg_sq")] {
                let t = st
                    .remove(&format!("{name}.{suffix}"))
                    .with_context(|| format!("optimizer state has no {name}.{suffix}"))?;
                if t.dims() != p.dims() {
                    bail!(
                        "optimizer state {name}.{suffix} has shape {:?}, expected {:?}",
                        t.dims(),
                        p.dims()
                    );
                }
                *slot = t.to_dtype(DType::F32)?;
            }
        }
        let step = st.remove("step").context("optimizer state has no step")?;
        self.step = step.to_vec1::<u32>()?[0] as u64;
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (as torch's
/// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when below 1). Returns the pre-clip norm.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    // One device-to-host read for all tensors (a read per tensor would sync a GPU ~400 times).
    let squares: Vec<Tensor> = grads
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<_>>()?;
    let norm = match squares.as_slice() {
        [] => 0.0,
        _ => Tensor::stack(&squares, 0)?
            .sum_all()?
            .to_scalar::<f32>()?
            .sqrt() as f64,
    };
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

/// Warmup steps as transformers computes them from a ratio: ceil(ratio × total).
pub fn warmup_steps(ratio: f64, total: u64) -> u64 {
    (ratio * total as f64).ceil() as u64
}

/// Learning rate after `s` scheduler steps (so optimizer step `s + 1` uses it).
pub fn lr_at(kind: LrScheduler, base: f64, s: u64, warmup: u64, total: u64) -> f64 {
    let (s_f, w, t) = (s as f64, warmup as f64, total as f64);
    let factor = match kind {
        // transformers' "constant" schedule has no warmup.
        LrScheduler::Constant => 1.0,
        _ if s < warmup => s_f / w.max(1.0),
        LrScheduler::Linear => ((t - s_f) / (t - w).max(1.0)).max(0.0),
        LrScheduler::Cosine => {
            let progress = (s_f - w) / (t - w).max(1.0);
            (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    };
    base * factor
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cosine_with_warmup_matches_transformers() {
        // get_cosine_schedule_with_warmup(opt, 3, 10) with lr 1.0, values before each step.
        let expect = [
            0.0,
            1.0 / 3.0,
            2.0 / 3.0,
            1.0,
            0.9504844339512095,
            0.8117449009293668,
            0.6112604669781572,
            0.38873953302184283,
            0.1882550990706332,
            0.04951556604879043,
        ];
        for (s, e) in expect.iter().enumerate() {
            let lr = lr_at(LrScheduler::Cosine, 1.0, s as u64, 3, 10);
            assert!((lr - e).abs() < 1e-12, "step {s}: {lr} vs {e}");
        }
        assert_eq!(warmup_steps(0.1, 21), 3);
        assert_eq!(lr_at(LrScheduler::Linear, 1.0, 6, 2, 10), 0.5);
        assert_eq!(lr_at(LrScheduler::Constant, 2.0, 0, 2, 10), 2.0);
    }

    #[test]
    fn adamw_matches_torch_formula() {
        // torch.optim.AdamW(lr=0.1, weight_decay=0.01), p=[1,-2], grads [0.5,0.5] then [-1, 2].
        let dev = Device::Cpu;
        let p = Var::new(&[1f32, -2.0], &dev).unwrap();
        let mut opt = AdamW::new(vec![("p".into(), p.clone())], 0.01).unwrap();
        opt.step(&[Tensor::new(&[0.5f32, 0.5], &dev).unwrap()], 0.1)
            .unwrap();
        opt.step(&[Tensor::new(&[-1f32, 2.0], &dev).unwrap()], 0.1)
            .unwrap();
        let got = p.to_vec1::<f32>().unwrap();
        // Reference computed by hand from torch's update rule.
        let mut want = [1f64, -2.0];
        let grads = [[0.5, 0.5], [-1.0, 2.0]];
        let (mut m, mut v) = ([0f64; 2], [0f64; 2]);
        for (t, g) in grads.iter().enumerate() {
            let t = (t + 1) as i32;
            for i in 0..2 {
                want[i] *= 1.0 - 0.1 * 0.01;
                m[i] = 0.9 * m[i] + 0.1 * g[i];
                v[i] = 0.999 * v[i] + 0.001 * g[i] * g[i];
                let denom = v[i].sqrt() / (1.0 - 0.999f64.powi(t)).sqrt() + 1e-8;
                want[i] -= 0.1 / (1.0 - 0.9f64.powi(t)) * m[i] / denom;
            }
        }
        for i in 0..2 {
            assert!(
                (got[i] as f64 - want[i]).abs() < 1e-6,
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn clipping_reports_pre_clip_norm() {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3f32, 4.0], &dev).unwrap()];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-6);
        let after: f32 = g[0]
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((after - 1.0).abs() < 1e-5);
    }
}
