//! Times the frozen-weight products of one decoder layer on the CPU, per projection: the forward
//! `x·Wᵀ` and the input gradient `g·W` that every LoRA training step runs for each frozen
//! weight, at a given token count. Eight copies of each weight are used in turn, so that each
//! call reads its weight from memory as a training step does (a step touches hundreds of MB).
//!
//!   cargo run --release --example frozen_products -- [TOKENS] [REPS] [0.6b|1.7b]
//!
//! The last column, the forward's median time over the input gradient's, shows a change to one
//! of the two on a machine whose speed drifts between runs.
//!
//! Defaults: 325 tokens (about the mean batch-1 step of `sftd bench` on examples/tool_calls.jsonl
//! at `--seq-len 512`), 24 repetitions, Qwen3-0.6B's layer shape (hidden 1024, intermediate 3072, 16
//! query and 8 key/value heads of 128); `1.7b` takes Qwen3-1.7B's (hidden 2048, intermediate 6144,
//! 16 query and 8 key/value heads of 128). Threads: `CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS`.

use candle_core::{Device, Tensor};
use sftd::train::nn::{frozen_linear, frozen_linear_grad};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |i: usize, default: usize, what: &str| {
        args.get(i).map_or(default, |a| {
            a.parse()
                .unwrap_or_else(|_| panic!("{what}: a number, got {a}"))
        })
    };
    let (tokens, reps) = (number(0, 325, "TOKENS"), number(1, 24, "REPS"));
    let (hidden, intermediate) = match args.get(2).map(String::as_str) {
        None | Some("0.6b") => (1024, 3072),
        Some("1.7b") => (2048, 6144),
        Some(other) => panic!("shape: 0.6b or 1.7b, got {other}"),
    };
    let dev = Device::Cpu;
    // (name, out features, in features); 16 query and 8 key/value heads of 128 in both shapes.
    let projections = [
        ("q_proj", 2048, hidden),
        ("k_proj / v_proj", 1024, hidden),
        ("o_proj", hidden, 2048),
        ("gate_proj / up_proj", intermediate, hidden),
        ("down_proj", hidden, intermediate),
    ];
    println!("{tokens} tokens, {reps} calls each; best / median ms and GFLOP/s");
    for (name, out, inp) in projections {
        let x = Tensor::randn(0f32, 1.0, (tokens, inp), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (tokens, out), &dev)?;
        let ws = (0..8)
            .map(|_| Tensor::randn(0f32, 0.02, (out, inp), &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
        for rep in 0..reps {
            let w = &ws[rep % ws.len()];
            let t = Instant::now();
            std::hint::black_box(frozen_linear(&x, w)?);
            fwd.push(t.elapsed().as_secs_f64());
            let t = Instant::now();
            std::hint::black_box(frozen_linear_grad(&g, w)?);
            bwd.push(t.elapsed().as_secs_f64());
        }
        let flops = 2.0 * (tokens * out * inp) as f64;
        let show = |v: &mut Vec<f64>| {
            v.sort_by(f64::total_cmp);
            let (best, median) = (v[0], v[v.len() / 2]);
            format!(
                "{:6.2} / {:6.2} ms  {:4.0} / {:4.0} GFLOP/s",
                best * 1e3,
                median * 1e3,
                flops / best / 1e9,
                flops / median / 1e9
            )
        };
        let (fwd_text, bwd_text) = (show(&mut fwd), show(&mut bwd));
        // Both products move the same FLOPs through the same kernels at the same moment; their
        // ratio is steadier than either time on a machine whose speed drifts.
        let ratio = fwd[fwd.len() / 2] / bwd[bwd.len() / 2];
        println!(
            "{name:>20} ({out}×{inp})  x·Wᵀ {fwd_text}   g·W {bwd_text}   x·Wᵀ / g·W {ratio:.2}"
        );
    }
    Ok(())
}
