//! One Qwen3 decoder layer as a single CPU op with a hand-written backward.
//!
//! Built from the per-op kernels (LoRA linear, RMSNorm, rotary, packed attention, SwiGLU) a layer
//! is some twenty autograd nodes, and candle's backward gives each node's gradient a zero-filled
//! buffer plus an add pass and a fresh output buffer. As one op the backward is written out in
//! order: the input gradients of sibling projections (q, k, v; gate, up) accumulate into one buffer
//! inside the GEMMs, the residual stream's gradient is added inside the RMSNorm backward, the
//! residual adds of the forward happen in place, and no GEMM output is zero-filled first. The LoRA
//! gradients cannot pass through candle's gradient store (an op takes at most three tensors), so
//! the backward leaves them in a [`GradSink`] that the trainer reads after `backward()`.
//!
//! Shapes: N packed tokens, H hidden, Hq/Hkv heads, D head dim, F intermediate, r LoRA rank.

use super::attention::{self, Dims};
use super::dropout::DropMask;
use super::fused::{rope_rows, Real};
use super::lora_op::{adapter_input, project, project_bwd, DxInto, Proj};
use super::rms_norm::{rms_rows, rms_rows_bwd};
use super::{swiglu, LoraLinear, Pass};
use candle_core::{
    CpuStorage, CustomOp2, DType, Device, Layout, Result, Shape, Storage, Tensor, TensorId,
};
use rayon::prelude::*;
use std::any::Any;
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

/// LoRA gradients left by layer ops' backwards, by the id of the Var they belong to.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl GradSink {
    fn add(&self, id: TensorId, g: Tensor) -> Result<()> {
        let mut map = self.0.lock().expect("grad sink");
        let sum = match map.remove(&id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        map.insert(id, sum);
        Ok(())
    }

    /// Removes and returns the gradient left for `id`.
    pub fn take(&self, id: TensorId) -> Option<Tensor> {
        self.0.lock().expect("grad sink").remove(&id)
    }
}

/// What the layer op reads of one decoder layer.
pub struct LayerParams<'a> {
    /// (H,), (H,), (D,), (D,) in the activations' dtype.
    pub input_norm: &'a Tensor,
    pub post_attn_norm: &'a Tensor,
    pub q_norm: &'a Tensor,
    pub k_norm: &'a Tensor,
    /// q, k, v, o, gate, up, down.
    pub proj: &'a [LoraLinear],
    pub eps: f64,
    pub dims: (usize, usize, usize),
    /// The layer's index: with the projection's, it keys the dropout masks (as the per-op
    /// path keys them).
    pub index: usize,
}

/// What the caller does with a layer's output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Reads it: the next layer's input.
    Value,
    /// Only pulls a gradient through it (a checkpointed layer recomputed for its backward). The
    /// op then skips the down projection's product, which only the output's value needs, and
    /// returns the residual stream before the MLP in its place.
    GradientOnly,
}

/// The layer `x (N, H) -> (N, H)` as one op, or `None` where it does not serve (another device or
/// dtype, biases, a layer without LoRA).
pub fn decoder_layer(
    x: &Tensor,
    p: &LayerParams,
    (cos, sin): (&Tensor, &Tensor),
    segments: &[(usize, usize)],
    pass: Pass,
    sink: &GradSink,
    output: Output,
) -> Result<Option<Tensor>> {
    let dtype = x.dtype();
    let same = |t: &Tensor| t.dtype() == dtype && t.device().is_cpu();
    let usable = cfg!(not(feature = "openblas"))
        && super::cpu_kernels::serve(x.device())
        && matches!(dtype, DType::F32 | DType::F64)
        && p.proj.len() == 7
        && p.proj.iter().all(|l| {
            same(&l.weight)
                && l.bias.is_none()
                && l.lora.as_ref().is_none_or(|a| same(a.a.as_tensor()))
        });
    let Some(anchor) = p.proj.iter().find_map(|l| l.lora.as_ref()) else {
        return Ok(None);
    };
    if !usable {
        return Ok(None);
    }
    let anchor = if pass.track {
        anchor.a.as_tensor().clone()
    } else {
        anchor.a.as_detached_tensor()
    };
    let lora = p
        .proj
        .iter()
        .enumerate()
        .map(|(m, l)| {
            l.lora.as_ref().map(|a| LoraParts {
                a: a.a.as_detached_tensor(),
                b: a.b.as_detached_tensor(),
                ids: (a.a.id(), a.b.id()),
                scaling: a.scaling,
                dropout: pass
                    .dropout_key
                    .filter(|_| a.dropout > 0.0)
                    .map(|key| (a.dropout, key ^ module_key(p.index, m))),
            })
        })
        .collect();
    let op = LayerOp {
        w: p.proj
            .iter()
            .map(|l| l.weight.contiguous())
            .collect::<Result<_>>()?,
        lora,
        norms: [p.input_norm, p.post_attn_norm, p.q_norm, p.k_norm]
            .iter()
            .map(|t| t.to_dtype(DType::F64)?.to_vec1::<f64>())
            .collect::<Result<_>>()?,
        eps: p.eps,
        dims: Dims {
            hq: p.dims.0,
            hkv: p.dims.1,
            d: p.dims.2,
        },
        cos: cos.flatten_all()?.to_vec1::<f32>()?,
        sin: sin.flatten_all()?.to_vec1::<f32>()?,
        segments: segments.to_vec(),
        keep: pass.track,
        output,
        saved: Mutex::new(None),
        sink: sink.clone(),
    };
    x.contiguous()?
        .apply_op2_arc(&anchor, Arc::new(Box::new(op)))
        .map(Some)
}

/// The key of projection `m` (q, k, v, o, gate, up, down) of layer `layer`, which a pass's
/// dropout key is combined with.
pub fn module_key(layer: usize, m: usize) -> u64 {
    ((layer as u64) << 8) | m as u64
}

struct LoraParts {
    a: Tensor,
    b: Tensor,
    ids: (TensorId, TensorId),
    scaling: f64,
    /// `(p, generator key)` when this pass draws a dropout mask for the adapter's input.
    dropout: Option<(f64, u64)>,
}

struct LayerOp {
    /// q, k, v, o, gate, up, down (O, I), contiguous.
    w: Vec<Tensor>,
    lora: Vec<Option<LoraParts>>,
    /// input, post-attention, q and k norm weights.
    norms: Vec<Vec<f64>>,
    eps: f64,
    dims: Dims,
    /// (N, D/2) each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    segments: Vec<(usize, usize)>,
    /// Whether the forward keeps its activations for a backward.
    keep: bool,
    output: Output,
    saved: Mutex<Option<Box<dyn Any + Send>>>,
    sink: GradSink,
}

/// The forward's activations the backward reads.
struct Saved<T> {
    h1: Vec<T>,
    xa: Vec<Vec<T>>,
    q_pre: Vec<T>,
    k_pre: Vec<T>,
    q: Vec<T>,
    k: Vec<T>,
    v: Vec<T>,
    probs: Vec<T>,
    attn: Vec<T>,
    x_mid: Vec<T>,
    h2: Vec<T>,
    gate: Vec<T>,
    up: Vec<T>,
    z: Vec<T>,
    /// Each LoRA projection's dropout mask, when the forward drew them.
    masks: Vec<Option<DropMask>>,
}

/// A tensor's contiguous CPU elements.
pub(super) fn elems<'a, T: Real>(s: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    let (Storage::Cpu(c), Some((a, b))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("contiguous CPU tensors expected")
    };
    Ok(&c.as_slice::<T>()?[a..b])
}

impl LayerOp {
    fn norm(&self, i: usize) -> &[f64] {
        &self.norms[i]
    }

    /// (N, H, Hq·D, Hkv·D, F).
    fn sizes(&self, x: &Layout) -> Result<(usize, usize, usize, usize, usize)> {
        let (n, h) = x.shape().dims2()?;
        let Dims { hq, hkv, d } = self.dims;
        let f = self.w[4].dim(0)?;
        Ok((n, h, hq * d, hkv * d, f))
    }

    fn forward<T: Real>(&self, x: &[T], xl: &Layout) -> Result<Vec<T>> {
        let (n, h, qd, kd, f) = self.sizes(xl)?;
        let norm = |i: usize| -> Vec<T> { self.norm(i).iter().map(|&v| T::from_f64(v)).collect() };
        let guards = self.operands();
        let p = self.views::<T, _>(&guards)?;
        let eps = self.eps;
        // Each LoRA projection's dropout mask, when this pass draws them.
        let inputs = [h, h, h, qd, h, h, f];
        let masks: Vec<Option<DropMask>> = (self.lora.par_iter().zip(inputs))
            .map(|(l, i)| {
                let (p, key) = l.as_ref()?.dropout?;
                Some(DropMask::draw(n * i, p, key))
            })
            .collect();
        let h1 = rms_rows(x, &norm(0), eps);
        let [q_pre, xa_q] = project(&h1, p[0], (n, h, qd), masks[0].as_ref());
        let [k_pre, xa_k] = project(&h1, p[1], (n, h, kd), masks[1].as_ref());
        let [v, xa_v] = project(&h1, p[2], (n, h, kd), masks[2].as_ref());
        let Dims { hq, hkv, d } = self.dims;
        let q = rope_rows(
            &rms_rows(&q_pre, &norm(2), eps),
            (hq, d),
            &self.cos,
            &self.sin,
            false,
        );
        let k = rope_rows(
            &rms_rows(&k_pre, &norm(3), eps),
            (hkv, d),
            &self.cos,
            &self.sin,
            false,
        );
        let offsets = attention::prob_offsets(&self.segments, hq);
        let (attn, probs) = attention::forward(&q, &k, &v, self.dims, &self.segments, &offsets);
        let [mut x_mid, xa_o] = project(&attn, p[3], (n, qd, h), masks[3].as_ref());
        x_mid.iter_mut().zip(x).for_each(|(o, &r)| *o += r);
        let h2 = rms_rows(&x_mid, &norm(1), eps);
        let [gate, xa_g] = project(&h2, p[4], (n, h, f), masks[4].as_ref());
        let [up, xa_u] = project(&h2, p[5], (n, h, f), masks[5].as_ref());
        let z = swiglu::fwd(&gate, &up);
        let (y, xa_d) = match self.output {
            Output::Value => {
                let [mut y, xa_d] = project(&z, p[6], (n, f, h), masks[6].as_ref());
                y.iter_mut().zip(&x_mid).for_each(|(o, &r)| *o += r);
                (y, xa_d)
            }
            // The backward needs only down's LoRA input product z Aᵀ (N, r).
            Output::GradientOnly => {
                let xa_d = adapter_input(&z, p[6], (n, f), masks[6].as_ref());
                (x_mid.clone(), xa_d)
            }
        };
        if self.keep {
            let saved = Saved {
                h1,
                xa: vec![xa_q, xa_k, xa_v, xa_o, xa_g, xa_u, xa_d],
                q_pre,
                k_pre,
                q,
                k,
                v,
                probs,
                attn,
                x_mid,
                h2,
                gate,
                up,
                z,
                masks,
            };
            *self.saved.lock().expect("layer saved") = Some(Box::new(saved));
        }
        Ok(y)
    }

    /// Read guards on every weight, per projection: W, then A and B where present.
    fn operands(&self) -> Vec<Vec<impl Deref<Target = Storage> + '_>> {
        self.w
            .iter()
            .zip(&self.lora)
            .map(|(w, l)| {
                let mut g = vec![w.storage_and_layout().0];
                if let Some(l) = l {
                    g.push(l.a.storage_and_layout().0);
                    g.push(l.b.storage_and_layout().0);
                }
                g
            })
            .collect()
    }

    fn views<'a, T: Real, G: Deref<Target = Storage>>(
        &'a self,
        guards: &'a [Vec<G>],
    ) -> Result<Vec<Proj<'a, T>>> {
        guards
            .iter()
            .zip(self.w.iter().zip(&self.lora))
            .map(|(g, (w, l))| {
                let w = elems::<T>(&g[0], w.layout())?;
                let lora = match l {
                    Some(l) => Some((
                        elems::<T>(&g[1], l.a.layout())?,
                        elems::<T>(&g[2], l.b.layout())?,
                        l.scaling,
                    )),
                    None => None,
                };
                Ok((w, lora))
            })
            .collect()
    }

    /// `(dx if wanted, LoRA gradients by Var id)` for the output gradient `g (N, H)`.
    #[allow(clippy::type_complexity)]
    fn backward<T: Real>(
        &self,
        x: &[T],
        xl: &Layout,
        s: &Saved<T>,
        g: &[T],
        want_dx: bool,
    ) -> Result<(Option<Vec<T>>, Vec<(TensorId, Vec<T>, (usize, usize))>)> {
        let (n, h, qd, kd, f) = self.sizes(xl)?;
        let guards = self.operands();
        let p = self.views::<T, _>(&guards)?;
        let eps = self.eps;
        let mut grads = Vec::new();
        let mut keep = |m: usize, ab: Option<(Vec<T>, Vec<T>)>, (i, o): (usize, usize)| {
            if let (Some((da, db)), Some(l)) = (ab, &self.lora[m]) {
                let r = da.len() / i;
                grads.push((l.ids.0, da, (r, i)));
                grads.push((l.ids.1, db, (o, r)));
            }
        };
        let write = |v: &mut Vec<T>| DxInto {
            dst: v.as_mut_ptr(),
            accumulate: false,
        };
        let add = |v: &mut Vec<T>| DxInto {
            dst: v.as_mut_ptr(),
            accumulate: true,
        };
        // SAFETY (every project_bwd and set_len below): each destination was allocated with
        // capacity for the (N, I) input gradient it receives; `write` fills it whole before any
        // `add` reads it, and its length is set only after that.
        // MLP: y = x_mid + down(silu(gate) ⊙ up).
        let mut dz = Vec::with_capacity(n * f);
        let ab = unsafe {
            project_bwd(
                &s.z,
                p[6],
                (&s.xa[6], s.masks[6].as_ref()),
                g,
                (n, f, h),
                Some(write(&mut dz)),
            )
        };
        unsafe { dz.set_len(n * f) };
        keep(6, ab, (f, h));
        let (dgate, dup) = swiglu::bwd(&s.gate, &s.up, &dz);
        drop(dz);
        let mut dh2 = Vec::with_capacity(n * h);
        let ab = unsafe {
            project_bwd(
                &s.h2,
                p[4],
                (&s.xa[4], s.masks[4].as_ref()),
                &dgate,
                (n, h, f),
                Some(write(&mut dh2)),
            )
        };
        keep(4, ab, (h, f));
        let ab = unsafe {
            project_bwd(
                &s.h2,
                p[5],
                (&s.xa[5], s.masks[5].as_ref()),
                &dup,
                (n, h, f),
                Some(add(&mut dh2)),
            )
        };
        unsafe { dh2.set_len(n * h) };
        keep(5, ab, (h, f));
        // Each gradient buffer is dropped as soon as it is consumed: the backward's peak is
        // then its widest moment, not the sum of every buffer it makes.
        drop((dgate, dup));
        let mut dxm = g.to_vec();
        rms_rows_bwd(&s.x_mid, &dh2, self.norm(1), eps, &mut dxm, true);
        drop(dh2);
        // Attention: x_mid = x + o(attention(rope(norm(q)), rope(norm(k)), v)).
        let mut dattn = Vec::with_capacity(n * qd);
        let ab = unsafe {
            project_bwd(
                &s.attn,
                p[3],
                (&s.xa[3], s.masks[3].as_ref()),
                &dxm,
                (n, qd, h),
                Some(write(&mut dattn)),
            )
        };
        unsafe { dattn.set_len(n * qd) };
        keep(3, ab, (qd, h));
        let Dims { hq, hkv, d } = self.dims;
        let (offsets, _) = attention::prob_offsets(&self.segments, hq);
        let (dq, dk, dv) = attention::backward(
            &s.q,
            &s.k,
            &s.v,
            &s.probs,
            &dattn,
            self.dims,
            &self.segments,
            &offsets,
        );
        drop(dattn);
        let mut dq_pre = vec![T::zero(); n * qd];
        let dqn = rope_rows(&dq, (hq, d), &self.cos, &self.sin, true);
        drop(dq);
        rms_rows_bwd(&s.q_pre, &dqn, self.norm(2), eps, &mut dq_pre, false);
        drop(dqn);
        let mut dk_pre = vec![T::zero(); n * kd];
        let dkn = rope_rows(&dk, (hkv, d), &self.cos, &self.sin, true);
        drop(dk);
        rms_rows_bwd(&s.k_pre, &dkn, self.norm(3), eps, &mut dk_pre, false);
        drop(dkn);
        let mut dh1 = want_dx.then(|| Vec::with_capacity(n * h));
        let ab = unsafe {
            project_bwd(
                &s.h1,
                p[0],
                (&s.xa[0], s.masks[0].as_ref()),
                &dq_pre,
                (n, h, qd),
                dh1.as_mut().map(write),
            )
        };
        keep(0, ab, (h, qd));
        drop(dq_pre);
        let ab = unsafe {
            project_bwd(
                &s.h1,
                p[1],
                (&s.xa[1], s.masks[1].as_ref()),
                &dk_pre,
                (n, h, kd),
                dh1.as_mut().map(add),
            )
        };
        keep(1, ab, (h, kd));
        drop(dk_pre);
        let ab = unsafe {
            project_bwd(
                &s.h1,
                p[2],
                (&s.xa[2], s.masks[2].as_ref()),
                &dv,
                (n, h, kd),
                dh1.as_mut().map(add),
            )
        };
        keep(2, ab, (h, kd));
        let dx = dh1.map(|mut dh1| {
            unsafe { dh1.set_len(n * h) };
            let mut dx = dxm;
            rms_rows_bwd(x, &dh1, self.norm(0), eps, &mut dx, true);
            dx
        });
        Ok((dx, grads))
    }
}

impl CustomOp2 for LayerOp {
    fn name(&self) -> &'static str {
        "qwen3-decoder-layer"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        _anchor: &CpuStorage,
        _al: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = xl
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("decoder layer: contiguous x".into()))?;
        let y = match xs {
            CpuStorage::F32(v) => CpuStorage::F32(self.forward(&v[a..b], xl)?),
            CpuStorage::F64(v) => CpuStorage::F64(self.forward(&v[a..b], xl)?),
            _ => candle_core::bail!("decoder layer: f32 or f64 expected"),
        };
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        let saved = self.saved.lock().expect("layer saved").take();
        let Some(saved) = saved else {
            candle_core::bail!("decoder layer: backward without a tracked forward")
        };
        let (xs, xl) = x.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let want_dx = x.track_op();
        let dev = Device::Cpu;
        macro_rules! run {
            ($t:ty) => {{
                let Ok(s) = saved.downcast::<Saved<$t>>() else {
                    candle_core::bail!("decoder layer: saved activations of another dtype")
                };
                let (dx, grads) =
                    self.backward::<$t>(elems(&*xs, xl)?, xl, &s, elems(&*gs, gl)?, want_dx)?;
                drop(s);
                for (id, v, shape) in grads {
                    self.sink.add(id, Tensor::from_vec(v, shape, &dev)?)?;
                }
                dx.map(|d| Tensor::from_vec(d, x.shape(), &dev))
                    .transpose()?
            }};
        }
        let dx = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            _ => candle_core::bail!("decoder layer: f32 or f64 expected"),
        };
        Ok((dx, None))
    }
}
