"""PyTorch's side of `frozen_products` (examples/frozen_products.rs): the forward `x @ w.T` and
the input gradient `g @ w` of each projection of a Qwen3-0.6B decoder layer, at a given token
count, f32 on the CPU, timed per call over eight copies of each weight used in turn.

    python tools/bench/torch_products.py [TOKENS] [REPS] [THREADS]

Defaults: 325 tokens, 24 repetitions, 2 threads. Prints the same columns as the Rust example.
"""

import statistics
import sys
import time

import torch

PROJECTIONS = [
    ("q_proj", 2048, 1024),
    ("k_proj / v_proj", 1024, 1024),
    ("o_proj", 1024, 2048),
    ("gate_proj / up_proj", 3072, 1024),
    ("down_proj", 1024, 3072),
]


def main() -> None:
    args = [int(a) for a in sys.argv[1:]]
    tokens, reps, threads = (args + [325, 24, 2][len(args):])[:3]
    torch.set_num_threads(threads)
    print(f"{tokens} tokens, {reps} calls each; best / median ms and GFLOP/s (torch {torch.__version__})")
    for name, out, inp in PROJECTIONS:
        x, g = torch.randn(tokens, inp), torch.randn(tokens, out)
        weights = [torch.randn(out, inp) * 0.02 for _ in range(8)]
        fwd, bwd = [], []
        for rep in range(reps):
            w = weights[rep % len(weights)]
            t = time.perf_counter()
            x @ w.t()
            fwd.append(time.perf_counter() - t)
            t = time.perf_counter()
            g @ w
            bwd.append(time.perf_counter() - t)
        flops = 2.0 * tokens * out * inp

        def show(times: list) -> str:
            best, median = min(times), statistics.median(times)
            return (f"{best * 1e3:6.2f} / {median * 1e3:6.2f} ms  "
                    f"{flops / best / 1e9:4.0f} / {flops / median / 1e9:4.0f} GFLOP/s")

        ratio = statistics.median(fwd) / statistics.median(bwd)
        print(f"{name:>20} ({out}×{inp})  x·Wᵀ {show(fwd)}   g·W {show(bwd)}   x·Wᵀ / g·W {ratio:.2f}")


if __name__ == "__main__":
    main()
