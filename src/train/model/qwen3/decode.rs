//! The cached forward pass on plain f32 slices, for f32 weights on the CPU (every other dtype and
//! device takes the op-by-op pass in `cached`; `forward_cached` here picks). One function per
//! decoder layer, no tensor built or dispatched per operation: RMSNorm, the q/k/v projections (for
//! one token: one pass of the pool over the three weight matrices), per-head q/k norms and rotary,
//! keys and values written into the cache in place, attention over the cache, the output
//! projection, SwiGLU. LoRA pairs stay beside the base: `y += s·(x Aᵀ) Bᵀ`, never merged.
//!
//! Shapes: T new tokens, P cached positions, H hidden, Hq/Hkv heads, G = Hq/Hkv, D head dim, F
//! intermediate, I/O a projection's in/out features, r LoRA rank, V vocab.

use super::cached::{KvCache, Tuning};
use super::Qwen3;
use crate::train::nn::gemv::{self, Gemv};
use crate::train::nn::matmul::{gemm_into, Dst, View};
use anyhow::{bail, Result};
use candle_core::{CpuStorage, DType, Storage, StorageRef, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A tensor's contiguous f32 elements, read-locked while the pass runs.
struct Held<'a> {
    guard: StorageRef<'a>,
    range: (usize, usize),
}

impl<'a> Held<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some(range) = layout.contiguous_offsets() else {
            bail!("cached forward: a weight is not contiguous")
        };
        if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
            bail!("cached forward: an f32 CPU weight expected");
        }
        Ok(Self { guard, range })
    }

    fn get(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.range.0..self.range.1],
            _ => unreachable!("checked in Held::new"),
        }
    }
}

/// One projection's weights: W (O, I), its bias (O), and A (r, I), B (O, r), scaling.
struct Proj<'a> {
    w: Held<'a>,
    bias: Option<Held<'a>>,
    lora: Option<(Held<'a>, Held<'a>, f32)>,
}

/// Whether this pass serves `model`: f32 weights on the CPU.
pub(super) fn usable(model: &Qwen3) -> bool {
    crate::train::nn::cpu_kernels::serve(&model.device) && model.dtype == DType::F32
}

impl Qwen3 {
    /// Runs `ids` (T new tokens) after the `cache.len()` positions already cached, appends their
    /// keys and values, and returns the logits of the last new token, `(V,)` in f32.
    /// No autograd: every tensor here is detached. f32 weights on the CPU run on plain slices
    /// (this file), anything else op by op (`cached`); a cache serves one model.
    pub fn forward_cached<'a>(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        tuning: impl Into<Tuning<'a>>,
    ) -> Result<Tensor> {
        let tuning = tuning.into();
        let t = ids.len();
        let past = cache.len;
        if t == 0 {
            bail!("forward_cached needs at least one token");
        }
        if past + t > self.cfg.max_position_embeddings {
            bail!(
                "{} positions exceed max_position_embeddings {}",
                past + t,
                self.cfg.max_position_embeddings
            );
        }
        let slices = usable(self);
        cache.check_pass(slices)?;
        if slices {
            self.forward_slices(ids, cache, tuning)
        } else {
            self.forward_ops(ids, cache, tuning)
        }
    }

    /// [`Qwen3::forward_cached`] on slices: runs `ids` after the cached positions, appends their
    /// keys and values, returns the last token's logits `(V,)`.
    pub(super) fn forward_slices(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        tuning: Tuning<'_>,
    ) -> Result<Tensor> {
        let (t, past, h) = (ids.len(), cache.len, self.cfg.hidden_size);
        let eps = self.cfg.rms_norm_eps;
        let embed = Held::new(&self.embed)?;
        let mut x = Vec::with_capacity(t * h);
        for &id in ids {
            let Some(row) = embed.get().get(id as usize * h..(id as usize + 1) * h) else {
                bail!("token id {id} is outside the vocabulary");
            };
            x.extend_from_slice(row);
        }
        drop(embed);
        let half = self.cfg.head_dim() / 2;
        let (cos, sin) = (Held::new(&self.cos)?, Held::new(&self.sin)?);
        let rope = (
            &cos.get()[past * half..(past + t) * half],
            &sin.get()[past * half..(past + t) * half],
        );
        let kv_width = self.cfg.num_key_value_heads * self.cfg.head_dim();
        cache.reserve_rows(self.layers.len(), kv_width);
        for i in 0..self.layers.len() {
            self.layer_slices(i, &mut x, t, rope, &mut cache.rows[i], tuning)?;
        }
        cache.len = past + t;
        let last = rms_rows(&x[(t - 1) * h..], Held::new(&self.final_norm)?.get(), eps);
        let head = Held::new(&self.lm_head)?;
        let mut logits = vec![0f32; head.get().len() / h];
        let out = logits.as_mut_slice();
        gemv::gemv_group(&last, &mut [Gemv { w: head.get(), out }]);
        Ok(Tensor::from_vec(logits, self.cfg.vocab_size, &self.device)?)
    }

    /// The weights of projection `m` of layer `i` under `tuning`.
    fn proj_held<'a>(&'a self, i: usize, m: usize, tuning: Tuning<'a>) -> Result<Proj<'a>> {
        let p = &self.layers[i].proj[m];
        let lora = match tuning {
            Tuning::Base => None,
            Tuning::Attached => match &p.lora {
                Some(l) => Some((
                    Held::new(l.a.as_tensor())?,
                    Held::new(l.b.as_tensor())?,
                    l.scaling as f32,
                )),
                None => None,
            },
            Tuning::Adapter(a) => match &a.layers[i][m] {
                Some(pair) => Some((Held::new(&pair.a)?, Held::new(&pair.b)?, a.scaling as f32)),
                None => None,
            },
        };
        Ok(Proj {
            w: Held::new(&p.weight)?,
            bias: p.bias.as_ref().map(Held::new).transpose()?,
            lora,
        })
    }

    /// One decoder layer over the new tokens, `x (T, H)` updated in place; the layer's keys and
    /// values `(P+T, Hkv·D)` grow by the new tokens'.
    fn layer_slices(
        &self,
        i: usize,
        x: &mut [f32],
        t: usize,
        rope: (&[f32], &[f32]),
        kv: &mut (Vec<f32>, Vec<f32>),
        tuning: Tuning<'_>,
    ) -> Result<()> {
        let l = &self.layers[i];
        let eps = self.cfg.rms_norm_eps;
        let d = self.cfg.head_dim();
        let (hq, hkv) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads);
        let held = (0..7)
            .map(|m| self.proj_held(i, m, tuning))
            .collect::<Result<Vec<_>>>()?;
        let norms = [&l.input_norm, &l.post_attn_norm, &l.q_norm, &l.k_norm]
            .map(Held::new)
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        // 1. Attention over the cached positions and the new ones.
        let h1 = rms_rows(x, norms[0].get(), eps);
        let [mut q, mut k, v] = project_group(&h1, t, [&held[0], &held[1], &held[2]]);
        for (qk, norm, heads) in [(&mut q, &norms[2], hq), (&mut k, &norms[3], hkv)] {
            let normed = rms_rows(qk, norm.get(), eps);
            rope_rows(&normed, qk, (heads, d), rope);
        }
        kv.0.extend_from_slice(&k);
        kv.1.extend_from_slice(&v);
        let attn = attention(&q, &kv.0, &kv.1, t, (hq, hkv, d));
        let [o] = project_group(&attn, t, [&held[3]]);
        x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        // 2. SwiGLU MLP.
        let h2 = rms_rows(x, norms[1].get(), eps);
        let [mut gate, up] = project_group(&h2, t, [&held[4], &held[5]]);
        gate.iter_mut()
            .zip(&up)
            .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
        let [down] = project_group(&gate, t, [&held[6]]);
        x.iter_mut().zip(&down).for_each(|(x, y)| *x += y);
        Ok(())
    }
}

/// `x (T, I)` through each projection of a group that reads it: `(T, O)` each. One token's
/// base products run as one GEMV dispatch over the pool, several tokens' as threaded gemm.
fn project_group<const N: usize>(x: &[f32], t: usize, ps: [&Proj<'_>; N]) -> [Vec<f32>; N] {
    let i = x.len() / t;
    let mut ys: [Vec<f32>; N] = if t == 1 {
        let mut ys = ps.map(|p| vec![0f32; p.w.get().len() / i]);
        let mut group: Vec<Gemv<'_>> = ps
            .iter()
            .zip(ys.iter_mut())
            .map(|(p, y)| Gemv {
                w: p.w.get(),
                out: y.as_mut_slice(),
            })
            .collect();
        gemv::gemv_group(x, &mut group);
        ys
    } else {
        ps.map(|p| gemv::x_wt(x, p.w.get(), i))
    };
    for (y, p) in ys.iter_mut().zip(ps) {
        let o = p.w.get().len() / i;
        if let Some(b) = &p.bias {
            y.chunks_mut(o)
                .for_each(|row| row.iter_mut().zip(b.get()).for_each(|(v, b)| *v += b));
        }
        if let Some((a, b, s)) = &p.lora {
            let (a, b) = (a.get(), b.get());
            let r = a.len() / i;
            let mut xa = vec![0f32; t * r];
            // SAFETY: xa is (T, r), y is (T, O); A is (r, I), B is (O, r), x is (T, I).
            unsafe {
                // (T, I) @ (I, r) -> (T, r); y += s · (T, r) @ (r, O).
                gemm_into(
                    Dst::fresh(xa.as_mut_ptr(), r),
                    (t, r, i),
                    View::rows(x, i),
                    View::t(a, i),
                    1.0,
                    false,
                );
                gemm_into(
                    Dst::add_to(y.as_mut_ptr(), o),
                    (t, o, r),
                    View::rows(&xa, r),
                    View::t(b, r),
                    *s,
                    false,
                );
            }
        }
    }
    ys
}

/// RMSNorm of each row of C = `w.len()` elements: `w ⊙ x / √(mean(x²) + eps)`, the mean in f64
/// as the training kernels take it.
fn rms_rows(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let mut y = Vec::with_capacity(x.len());
    for row in x.chunks_exact(w.len()) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / w.len() as f64;
        let r = (1.0 / (ms + eps).sqrt()) as f32;
        y.extend(row.iter().zip(w).map(|(&v, &wj)| wj * (v * r)));
    }
    y
}

/// Rotary embedding (half-split layout) of `x (T, heads, D)` into `y`, with the new tokens'
/// `cos`/`sin (T, D/2)` rows.
fn rope_rows(x: &[f32], y: &mut [f32], (heads, d): (usize, usize), (cos, sin): (&[f32], &[f32])) {
    let half = d / 2;
    for (tok, (xt, yt)) in x.chunks(heads * d).zip(y.chunks_mut(heads * d)).enumerate() {
        let (c, s) = (&cos[tok * half..][..half], &sin[tok * half..][..half]);
        for (xh, yh) in xt.chunks(d).zip(yt.chunks_mut(d)) {
            let (x1, x2) = xh.split_at(half);
            let (y1, y2) = yh.split_at_mut(half);
            for j in 0..half {
                y1[j] = x1[j] * c[j] - x2[j] * s[j];
                y2[j] = x2[j] * c[j] + x1[j] * s[j];
            }
        }
    }
}

/// Query rows per attention job: a block of new tokens reads keys up to its own last position
/// only, so prefill skips most of the masked half.
const QUERY_BLOCK: usize = 64;

/// Causal attention of the new tokens `q (T, Hq·D)` over every cached key and value
/// `(P+T, Hkv·D)`, the new ones last; query head h reads key/value head h / G. `(T, Hq·D)`.
fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    t: usize,
    (hq, hkv, d): (usize, usize, usize),
) -> Vec<f32> {
    let total = k.len() / (hkv * d);
    let past = total - t;
    let g = hq / hkv;
    let scale = 1.0 / (d as f32).sqrt();
    let blocks = t.div_ceil(QUERY_BLOCK);
    let mut out = vec![0f32; t * hq * d];
    let out_ptr = out.as_mut_ptr() as usize;
    let job = |n: usize| {
        let (head, b) = (n / blocks, n % blocks);
        let kv = head / g;
        let (j0, j1) = (b * QUERY_BLOCK, ((b + 1) * QUERY_BLOCK).min(t));
        let (m, keys) = (j1 - j0, past + j1);
        let mut s = vec![0f32; m * keys];
        let q_rows = View {
            ptr: q[(j0 * hq + head) * d..].as_ptr(),
            rs: (hq * d) as isize,
            cs: 1,
        };
        // Kᵀ (D, keys) and V (keys, D) of this key/value head, read where they lie.
        let k_t = View {
            ptr: k[kv * d..].as_ptr(),
            rs: 1,
            cs: (hkv * d) as isize,
        };
        let v_rows = View {
            ptr: v[kv * d..].as_ptr(),
            rs: (hkv * d) as isize,
            cs: 1,
        };
        // SAFETY: s is (m, keys); q, k, v hold the rows these views address; this job alone
        // writes rows j0..j1 of head `head` in `out`, and `out` outlives the jobs.
        unsafe {
            gemm_into(
                Dst::fresh(s.as_mut_ptr(), keys),
                (m, keys, d),
                q_rows,
                k_t,
                scale,
                false,
            );
            for (jj, row) in s.chunks_mut(keys).enumerate() {
                softmax_prefix(row, past + j0 + jj + 1);
            }
            let dst = (out_ptr as *mut f32).add((j0 * hq + head) * d);
            gemm_into(
                Dst::fresh(dst, hq * d),
                (m, d, keys),
                View::rows(&s, keys),
                v_rows,
                1.0,
                false,
            );
        }
    };
    let jobs = hq * blocks;
    let pool = candle_core::utils::barrier_pool();
    if pool.n_workers() == 0 || jobs == 1 || t * total * hq * d < 1 << 16 {
        (0..jobs).for_each(job);
    } else {
        let cursor = AtomicUsize::new(0);
        pool.execute(|_| loop {
            let n = cursor.fetch_add(1, Ordering::Relaxed);
            if n >= jobs {
                break;
            }
            job(n);
        });
    }
    out
}

/// Softmax over the first `seen` entries of `row`; the rest (future positions) become 0.
fn softmax_prefix(row: &mut [f32], seen: usize) {
    let (live, masked) = row.split_at_mut(seen);
    let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in live.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    live.iter_mut().for_each(|v| *v /= sum);
    masked.fill(0.0);
}
