//! Causal self-attention over packed sequences as one CPU op, with a hand-written backward.
//!
//! Composed from candle ops, each sequence's q, k and v are first copied into head-major
//! tensors, scores and probabilities pass through several graph nodes, and the output is copied
//! back into token-major order; the backward undoes each copy and zero-fills and adds every
//! gradient. Here every (sequence, head) runs two small GEMMs that read q, k and v where they
//! lie in the packed `(N, H, D)` buffers and write the output in place, only the probabilities
//! are kept for the backward, and key/value head groups are spread over the CPU threads (one
//! group's products are too small to be worth splitting).
//!
//! Shapes: N packed tokens, Hq query heads, Hkv key/value heads, G = Hq/Hkv, D head dim, T one
//! sequence's length. Query head h uses key/value head h / G, as in HF's `repeat_kv`.

use super::fused::Real;
use super::matmul::{gemm_into, Dst, SendPtr, View};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};
use std::sync::{Arc, Mutex};

/// `q (N, Hq, D)`, `k`/`v (N, Hkv, D)`, `segments`: (start, len) of each sequence, covering N
/// -> `(N, Hq·D)`: per sequence, `softmax(q kᵀ / √D)` with row i seeing keys 0..=i, times v.
pub fn packed_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[(usize, usize)],
) -> Result<Tensor> {
    let op = PackedAttention {
        segments: segments.to_vec(),
        probs: Mutex::new(None),
    };
    q.contiguous()?
        .apply_op3_arc(&k.contiguous()?, &v.contiguous()?, Arc::new(Box::new(op)))
}

/// Whether [`packed_attention`] serves these operands.
pub fn packed_attention_usable(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    super::cpu_kernels::serve(q.device())
        && matches!(q.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
}

struct PackedAttention {
    segments: Vec<(usize, usize)>,
    /// Every (sequence, head)'s T×T probabilities from the forward pass, for the backward.
    probs: Mutex<Option<CpuStorage>>,
}

/// Head counts and head dim of one attention call.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub hq: usize,
    pub hkv: usize,
    pub d: usize,
}

impl PackedAttention {
    fn dims(&self, ql: &Layout, kl: &Layout, vl: &Layout) -> Result<Dims> {
        packed_dims(ql.shape(), kl.shape(), vl.shape(), &self.segments)
    }

    fn prob_offsets(&self, hq: usize) -> (Vec<usize>, usize) {
        prob_offsets(&self.segments, hq)
    }
}

/// The head counts and head dim of packed attention over `q (N, Hq, D)`, `k`/`v (N, Hkv, D)`,
/// when the shapes agree and the segments cover the N rows in order, each once.
pub(super) fn packed_dims(
    q: &Shape,
    k: &Shape,
    v: &Shape,
    segments: &[(usize, usize)],
) -> Result<Dims> {
    let (n, hq, d) = q.dims3()?;
    let (nk, hkv, dk) = k.dims3()?;
    let contiguous_cover = segments
        .iter()
        .try_fold(0, |at, &(s, t)| (s == at).then_some(at + t))
        == Some(n);
    if nk != n || dk != d || k != v || hkv == 0 || hq % hkv != 0 || !contiguous_cover {
        candle_core::bail!(
            "packed attention: q {:?}, k {:?}, v {:?} and segments {segments:?} do not fit",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    Ok(Dims { hq, hkv, d })
}

/// Where each sequence's Hq probability blocks of T×T start, and their total size.
pub(super) fn prob_offsets(segments: &[(usize, usize)], hq: usize) -> (Vec<usize>, usize) {
    let mut at = 0;
    let offsets = segments
        .iter()
        .map(|&(_, t)| {
            let o = at;
            at += hq * t * t;
            o
        })
        .collect();
    (offsets, at)
}

/// Runs `job(sequence, kv head)` for every pair, the pairs spread over candle's CPU threads by
/// their cost (T²), largest first onto the least loaded thread.
fn par_jobs(segments: &[(usize, usize)], hkv: usize, job: impl Fn(usize, usize) + Sync) {
    let mut jobs: Vec<(usize, usize)> = (0..segments.len())
        .flat_map(|s| (0..hkv).map(move |h| (s, h)))
        .collect();
    let threads = super::threads::count().min(jobs.len()).max(1);
    if threads == 1 {
        jobs.iter().for_each(|&(s, h)| job(s, h));
        return;
    }
    jobs.sort_by_key(|&(s, _)| std::cmp::Reverse(segments[s].1));
    let mut lists = vec![(0usize, Vec::new()); threads];
    for j in jobs {
        let t = segments[j.0].1;
        let least = lists.iter_mut().min_by_key(|l| l.0).expect("threads >= 1");
        least.0 += t * t;
        least.1.push(j);
    }
    std::thread::scope(|scope| {
        let job = &job;
        let mut lists = lists.into_iter().map(|l| l.1);
        let first = lists.next().unwrap_or_default();
        for list in lists {
            scope.spawn(move || list.iter().for_each(|&(s, h)| job(s, h)));
        }
        first.iter().for_each(|&(s, h)| job(s, h));
    });
}

/// `row[..seen] = softmax(scale · row[..seen])`, `row[seen..] = 0`, in place.
fn causal_softmax_row<T: Real>(row: &mut [T], seen: usize, scale: T) {
    let (live, masked) = row.split_at_mut(seen);
    let max = T::max_of(live);
    let inv = T::from_f64(1.0 / T::exp_shifted(live, max, scale));
    live.iter_mut().for_each(|x| *x *= inv);
    masked.fill(T::zero());
}

/// Query rows per block. Rows `i0..i1` see keys `0..i1` only, so a sequence's products cover
/// about half of its T×T scores plus a strip of `T·ROW_BLOCK/2` on the diagonal, instead of
/// all of them; smaller blocks skip more but run the GEMMs at shapes they do less well.
const ROW_BLOCK: usize = 64;

/// The query row blocks `(i0, i1)` of a sequence of `t` tokens, in order.
fn row_blocks(t: usize) -> impl DoubleEndedIterator<Item = (usize, usize)> {
    (0..t.div_ceil(ROW_BLOCK)).map(move |b| (b * ROW_BLOCK, ((b + 1) * ROW_BLOCK).min(t)))
}

/// Forward: `(out (N, Hq·D), probabilities)`.
pub(super) fn forward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    Dims { hq, hkv, d }: Dims,
    segments: &[(usize, usize)],
    (offsets, total): &(Vec<usize>, usize),
) -> (Vec<T>, Vec<T>) {
    let n = q.len() / (hq * d);
    let g_size = hq / hkv;
    let scale = T::from_f64(1.0 / (d as f64).sqrt());
    let mut out: Vec<T> = Vec::with_capacity(n * hq * d);
    let mut probs: Vec<T> = Vec::with_capacity(*total);
    let (out_p, probs_p) = (SendPtr(out.as_mut_ptr()), SendPtr(probs.as_mut_ptr()));
    par_jobs(segments, hkv, |si, kv| {
        let (start, t) = segments[si];
        let kv_at = (start * hkv + kv) * d;
        let k_t = View {
            ptr: k[kv_at..].as_ptr(),
            rs: 1,
            cs: (hkv * d) as isize,
        }; // (D, T)
        let v_m = View {
            ptr: v[kv_at..].as_ptr(),
            rs: (hkv * d) as isize,
            cs: 1,
        }; // (T, D)
        for h in kv * g_size..(kv + 1) * g_size {
            let q_at = (start * hq + h) * d;
            for (i0, i1) in row_blocks(t) {
                let q_m = View {
                    ptr: q[q_at + i0 * hq * d..].as_ptr(),
                    rs: (hq * d) as isize,
                    cs: 1,
                }; // (i1 − i0, D)
                   // SAFETY: each (sequence, head) owns its T×T probability block and its T×D block
                   // of the output (rows start.., columns h·D..); row block i0..i1 writes rows
                   // i0..i1 of both whole (the scores' columns i1.. are zeroed by the softmax), so
                   // every element is written before the lengths are set after all jobs joined.
                unsafe {
                    let p = probs_p.get().add(offsets[si] + h * t * t + i0 * t);
                    gemm_into(
                        Dst::fresh(p, t),
                        (i1 - i0, i1, d),
                        q_m,
                        k_t,
                        T::one(),
                        false,
                    );
                    for i in i0..i1 {
                        let row = std::slice::from_raw_parts_mut(p.add((i - i0) * t), t);
                        causal_softmax_row(row, i + 1, scale);
                    }
                    let p_m = View {
                        ptr: p as *const T,
                        rs: t as isize,
                        cs: 1,
                    }; // (i1 − i0, i1)
                    let o = out_p.get().add((start + i0) * hq * d + h * d);
                    gemm_into(
                        Dst::fresh(o, hq * d),
                        (i1 - i0, d, i1),
                        p_m,
                        v_m,
                        T::one(),
                        false,
                    );
                }
            }
        }
    });
    // SAFETY: the segments cover all N rows (checked in `dims`) and every head, so every element
    // of both buffers was written above.
    unsafe {
        out.set_len(n * hq * d);
        probs.set_len(*total);
    }
    (out, probs)
}

/// Backward: `(dq, dk, dv)` for the output gradient `dout (N, Hq·D)`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: Real>(
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    dout: &[T],
    Dims { hq, hkv, d }: Dims,
    segments: &[(usize, usize)],
    offsets: &[usize],
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let n = q.len() / (hq * d);
    let g_size = hq / hkv;
    let scale = 1.0 / (d as f64).sqrt();
    let mut dq: Vec<T> = Vec::with_capacity(n * hq * d);
    let mut dk: Vec<T> = Vec::with_capacity(n * hkv * d);
    let mut dv: Vec<T> = Vec::with_capacity(n * hkv * d);
    let (dq_p, dk_p, dv_p) = (
        SendPtr(dq.as_mut_ptr()),
        SendPtr(dk.as_mut_ptr()),
        SendPtr(dv.as_mut_ptr()),
    );
    par_jobs(segments, hkv, |si, kv| {
        let (start, t) = segments[si];
        let kv_at = (start * hkv + kv) * d;
        let kv_rows = |s: &[T]| View {
            ptr: s[kv_at..].as_ptr(),
            rs: (hkv * d) as isize,
            cs: 1,
        }; // (T, D)
        let mut ds = vec![T::zero(); ROW_BLOCK.min(t) * t];
        let (s, v_t) = (T::from_f64(scale), kv_rows(v).transposed());
        for (gi, h) in (kv * g_size..(kv + 1) * g_size).enumerate() {
            let p_at = offsets[si] + h * t * t;
            let (q_at, do_at) = ((start * hq + h) * d, start * hq * d + h * d);
            // Last block first: it reaches every key row, so in the group's first head it
            // writes dk and dv whole and every later product adds to them.
            for (bi, (i0, i1)) in row_blocks(t).rev().enumerate() {
                let (rows, init) = (i1 - i0, gi == 0 && bi == 0);
                let p = &probs[p_at + i0 * t..][..rows * t];
                let p_m = View::rows(p, t); // (rows, i1)
                let do_m = View {
                    ptr: dout[do_at + i0 * hq * d..].as_ptr(),
                    rs: (hq * d) as isize,
                    cs: 1,
                }; // (rows, D)
                let q_m = View {
                    ptr: q[q_at + i0 * hq * d..].as_ptr(),
                    rs: (hq * d) as isize,
                    cs: 1,
                }; // (rows, D)
                   // SAFETY: the jobs of one key/value head own its T×D blocks of dk and dv and the
                   // T×D blocks of dq of its G query heads; dk/dv are written whole by the first
                   // product (see above) before any product adds to them, dq's rows i0..i1 are
                   // written whole by this block.
                unsafe {
                    // dV[..i1] (+)= Pᵀ dO
                    let dv_at = dv_p.get().add(kv_at);
                    let pt = p_m.transposed();
                    gemm_into(
                        Dst {
                            ptr: dv_at,
                            rs: hkv * d,
                            accumulate: !init,
                        },
                        (i1, d, rows),
                        pt,
                        do_m,
                        T::one(),
                        false,
                    );
                    // dP = dO Vᵀ (rows, i1), then dS = scale · P ⊙ (dP − Σ_j dP⊙P) row by row.
                    let dp = ds.as_mut_ptr();
                    gemm_into(Dst::fresh(dp, t), (rows, i1, d), do_m, v_t, T::one(), false);
                }
                for (r, (dr, pr)) in ds.chunks_mut(t).zip(p.chunks(t)).enumerate() {
                    let seen = i0 + r + 1;
                    let dot = T::from_f64(T::dot(&dr[..seen], &pr[..seen]));
                    for (x, &y) in dr[..seen].iter_mut().zip(&pr[..seen]) {
                        *x = s * y * (*x - dot);
                    }
                    dr[seen..i1].fill(T::zero());
                }
                let ds_m = View::rows(&ds, t); // (rows, i1)
                                               // SAFETY: as above.
                unsafe {
                    // dQ[i0..i1] = dS K[..i1]; dK[..i1] (+)= dSᵀ Q[i0..i1]
                    let dq_at = dq_p.get().add(do_at + i0 * hq * d);
                    let k_m = kv_rows(k);
                    gemm_into(
                        Dst::fresh(dq_at, hq * d),
                        (rows, d, i1),
                        ds_m,
                        k_m,
                        T::one(),
                        false,
                    );
                    let dk_at = dk_p.get().add(kv_at);
                    let dst = ds_m.transposed();
                    gemm_into(
                        Dst {
                            ptr: dk_at,
                            rs: hkv * d,
                            accumulate: !init,
                        },
                        (i1, d, rows),
                        dst,
                        q_m,
                        T::one(),
                        false,
                    );
                }
            }
        }
    });
    // SAFETY: the segments cover all N rows and every head (checked in `dims`), so every element
    // was written above.
    unsafe {
        dq.set_len(n * hq * d);
        dk.set_len(n * hkv * d);
        dv.set_len(n * hkv * d);
    }
    (dq, dk, dv)
}

fn elems<'a, T: Real>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("packed attention: contiguous operands expected"),
    }
}

fn cpu(s: &Storage) -> Result<&CpuStorage> {
    match s {
        Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("packed attention: CPU tensors expected"),
    }
}

impl CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-causal-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = self.dims(ql, kl, vl)?;
        let offsets = self.prob_offsets(dims.hq);
        macro_rules! run {
            ($t:ty, $wrap:path) => {{
                let (out, probs) = forward::<$t>(
                    elems(qs, ql)?,
                    elems(ks, kl)?,
                    elems(vs, vl)?,
                    dims,
                    &self.segments,
                    &offsets,
                );
                ($wrap(out), $wrap(probs))
            }};
        }
        let (out, probs) = match qs {
            CpuStorage::F32(_) => run!(f32, CpuStorage::F32),
            CpuStorage::F64(_) => run!(f64, CpuStorage::F64),
            _ => candle_core::bail!("packed attention: f32 or f64 expected"),
        };
        *self.probs.lock().expect("attention probs") = Some(probs);
        let n = ql.dims()[0];
        Ok((out, Shape::from((n, dims.hq * dims.d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        dout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dout = dout.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (ds, dl) = dout.storage_and_layout();
        let (qs, ks, vs, ds) = (cpu(&qs)?, cpu(&ks)?, cpu(&vs)?, cpu(&ds)?);
        let dims = self.dims(ql, kl, vl)?;
        let (offsets, total) = self.prob_offsets(dims.hq);
        let probs = self.probs.lock().expect("attention probs");
        let Some(probs) = probs.as_ref() else {
            candle_core::bail!("packed attention: backward before forward")
        };
        let dev = Device::Cpu;
        macro_rules! run {
            ($t:ty) => {{
                let (dq, dk, dv) = backward::<$t>(
                    elems(qs, ql)?,
                    elems(ks, kl)?,
                    elems(vs, vl)?,
                    elems(probs, &Layout::contiguous(total))?,
                    elems(ds, dl)?,
                    dims,
                    &self.segments,
                    &offsets,
                );
                (
                    Tensor::from_vec(dq, q.shape(), &dev)?,
                    Tensor::from_vec(dk, k.shape(), &dev)?,
                    Tensor::from_vec(dv, v.shape(), &dev)?,
                )
            }};
        }
        let (dq, dk, dv) = match qs {
            CpuStorage::F32(_) => run!(f32),
            CpuStorage::F64(_) => run!(f64),
            _ => candle_core::bail!("packed attention: f32 or f64 expected"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::nn::ops::packed_causal_attention_composed;
    use crate::train::nn::testing::check_fused_inputs;
    use candle_core::DType;

    /// The fused op and the composed ops agree in value and in the gradients of q, k and v,
    /// over several packed sequences of different lengths, against one random cotangent.
    fn check(dtype: DType, tol: f64, segments: &[(usize, usize)]) {
        let dev = Device::Cpu;
        let n = segments.iter().map(|s| s.1).sum();
        let (hq, hkv, d) = (6, 2, 8);
        let rnd = |shape: &[usize]| {
            Tensor::randn(0f64, 1., shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let (q0, k0, v0) = (rnd(&[n, hq, d]), rnd(&[n, hkv, d]), rnd(&[n, hkv, d]));
        let cot = rnd(&[n, hq * d]);
        check_fused_inputs(
            |fused, x| {
                if fused {
                    packed_attention(x[0], x[1], x[2], segments)
                } else {
                    packed_causal_attention_composed(x[0], x[1], x[2], segments)
                }
            },
            &[&q0, &k0, &v0],
            &cot,
            &["out", "dq", "dk", "dv"],
            tol,
            format_args!("{dtype:?}"),
        );
    }

    #[test]
    fn packed_attention_equals_composed_ops_with_gradients_f32() {
        check(DType::F32, 1e-5, &[(0, 5), (5, 1), (6, 9)]);
    }

    #[test]
    fn packed_attention_equals_composed_ops_with_gradients_f64() {
        check(DType::F64, 1e-12, &[(0, 5), (5, 1), (6, 9)]);
    }

    /// Sequences longer than one row block (one a whole number of blocks, one with a partial
    /// last block, one shorter than a block): the blocked products skip the masked scores and
    /// still give the same values and gradients.
    #[test]
    fn sequences_over_several_row_blocks_equal_composed_ops() {
        let segments = [
            (0, 2 * ROW_BLOCK),
            (2 * ROW_BLOCK, ROW_BLOCK + 37),
            (3 * ROW_BLOCK + 37, 3),
        ];
        check(DType::F64, 1e-11, &segments);
        check(DType::F32, 1e-4, &segments);
    }

    #[test]
    fn segments_that_do_not_cover_the_batch_are_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((4, 2, 4), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((4, 1, 4), DType::F32, &dev).unwrap();
        assert!(packed_attention(&q, &k, &k, &[(0, 3)]).is_err());
        assert!(packed_attention(&q, &k, &k, &[(1, 3)]).is_err());
    }
}
