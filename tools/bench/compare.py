#!/usr/bin/env python3
"""transformers + PEFT LoRA training throughput, to put next to `sftd bench`.

Same model dir, data and batch shape as sftd's benchmark: rows of --data encoded as in sftd (chat
template, assistant labels; see ../parity/sft_data.py), truncated to --seq-len, --batch-size
consecutive rows per micro-batch (right-padded to the longest row, or to --seq-len with
--padding max_length), cycling through the file. LoRA r 16, alpha 32, dropout 0 (--lora-dropout), all-linear
(fresh PEFT init, or --init-adapter), float32 on CPU (or --device cuda, --dtype bfloat16: base weights
in bf16, PEFT's adapters kept in float32 as it does by default), torch AdamW (lr 2e-4, wd 0), loss = sum of
token CE / number of label positions, clip_grad_norm_ 1.0, torch.set_num_threads(--threads).

Each configuration (gradient checkpointing on: model.gradient_checkpointing_enable(use_reentrant=False)
+ enable_input_require_grads; and off) runs in its own subprocess so that peak RSS
(resource.getrusage ru_maxrss, or on a GPU torch.cuda.max_memory_reserved) is per configuration.
--warmup steps are run untimed first; on a GPU each step ends with a device synchronize.

Reports, per configuration: tokens/s (real, non-pad tokens), ms per optimizer step, peak RSS, and
model FLOPs per token (4·N_linear + LoRA + attention, the DESIGN.md convention) with the achieved
GFLOP/s and MFU against a measured float32 GEMM peak on the same threads. Prints markdown table
rows and a JSON document (also to --json-out).

    python tools/bench/compare.py --model DIR --data examples/tool_calls.jsonl \\
        --batch-size 1 --seq-len 512 --steps 10 --threads 2
"""

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "parity"))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--padding", choices=["longest", "max_length"], default="longest")
    ap.add_argument("--loss-on", choices=["assistant", "all"], default="assistant")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--lora-dropout", type=float, default=0.0, help="PEFT's lora_dropout (training's default: 0.05)")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--init-adapter", help="start from this PEFT adapter instead of a fresh init")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa | eager)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="base-weight dtype")
    ap.add_argument("--gc", choices=["both", "on", "off"], default="both", help="gradient checkpointing")
    ap.add_argument("--json-out", help="also write the JSON here")
    ap.add_argument("--_child", choices=["on", "off"], help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.split(":")[0].strip() == "model name":
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gemm_peak_gflops(threads, device="cpu", dtype="float32"):
    """Best of ten square matrix products: 1024 float32 on the CPU, 8192 in --dtype on a GPU."""
    import torch

    torch.set_num_threads(threads)
    gpu = device != "cpu"
    n = 8192 if gpu else 1024
    a = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, device=device, dtype=getattr(torch, dtype))
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(10):
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def flops_per_token(cfg, r, seq_len):
    """4·N (forward + activation-gradient GEMMs of frozen weights, lm_head included) + LoRA
    (6·r·(in+out) per module: forward, input grad and weight grads of A and B) + attention
    (12·L·T·heads·head_dim for QK^T and PV, forward + backward, non-causal count)."""
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    hd = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    mods = [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]
    n_linear = L * sum(a * b for a, b in mods) + h * cfg.vocab_size
    lora = L * sum(6 * r * (a + b) for a, b in mods)
    attn = 12 * L * seq_len * q
    return 4 * n_linear + lora + attn, n_linear


def child(args):
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    import sft_data

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gc_on = args._child == "on"
    tok = AutoTokenizer.from_pretrained(args.model)
    gpu = args.device != "cpu"
    base = Qwen3ForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                            attn_implementation=args.attn)
    if args.init_adapter:
        model = PeftModel.from_pretrained(base, args.init_adapter, is_trainable=True)
    else:
        model = get_peft_model(base, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.lora_dropout,
                                                target_modules="all-linear", bias="none", task_type="CAUSAL_LM"))
    model.to(args.device)
    model.train()
    if gc_on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    examples = sft_data.load_examples(tok, args.data, args.seq_len, args.loss_on, verbose=False)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cursor = [0]

    def next_batch():
        rows = []
        for _ in range(args.batch_size):
            rows.append(examples[cursor[0] % len(examples)])
            cursor[0] += 1
        if args.padding == "max_length":
            rows = [dict(r) for r in rows]
            rows.append({"input_ids": [pad_id] * args.seq_len, "labels": [sft_data.IGNORE] * args.seq_len})
            ids, lab, attn = sft_data.collate(rows, pad_id)
            return ids[:-1], lab[:-1], attn[:-1]
        return sft_data.collate(rows, pad_id)

    def on_device(batch):
        return tuple(t.to(args.device) for t in batch)

    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def step():
        batches = [on_device(next_batch()) for _ in range(args.grad_accum)]
        n_items = sum(int((lab[:, 1:] != sft_data.IGNORE).sum()) for _, lab, _ in batches)
        real = 0
        padded = 0
        for ids, lab, attn in batches:
            logits = model(input_ids=ids, attention_mask=attn).logits.float()
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), lab[:, 1:].reshape(-1),
                                   ignore_index=sft_data.IGNORE, reduction="sum") / max(1, n_items)
            loss.backward()
            real += int(attn.sum())
            padded += ids.numel()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return real, padded

    for _ in range(args.warmup):
        step()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    real = padded = 0
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        a, b = step()
        times.append(time.perf_counter() - t)
        real += a
        padded += b
    total = sum(times)
    maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if gpu:
        maxrss_kb = torch.cuda.max_memory_reserved() // 1024
    mean_len = real / (args.steps * args.batch_size * args.grad_accum)
    fpt, n_linear = flops_per_token(base.config if hasattr(base, "config") else model.config, args.r, mean_len)
    out = {
        "gradient_checkpointing": gc_on,
        "tokens_per_second": real / total,
        "ms_per_step": 1000 * total / args.steps,
        "ms_per_step_min": 1000 * min(times),
        "peak_rss_mib": maxrss_kb / 1024,
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_waste": 1 - real / padded if padded else 0.0,
        "mean_row_tokens": mean_len,
        "model_flops_per_token": fpt,
        "n_linear_params": n_linear,
        "achieved_gflops": fpt * real / total / 1e9,
        "trainable_params": sum(p.numel() for p in params),
    }
    print("RESULT " + json.dumps(out))


def main():
    args = parse_args()
    if args._child:
        child(args)
        return 0
    import torch
    import transformers
    import peft

    modes = {"both": ["off", "on"], "on": ["on"], "off": ["off"]}[args.gc]
    results = []
    for mode in modes:
        cmd = [sys.executable, os.path.abspath(__file__)] + [a for a in sys.argv[1:]] + ["--_child", mode]
        p = subprocess.run(cmd, capture_output=True, text=True)
        line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            sys.stderr.write(p.stdout[-4000:] + p.stderr[-4000:])
            print("error: run with gradient checkpointing %s failed" % mode)
            return 1
        results.append(json.loads(line[len("RESULT "):]))
    peak = gemm_peak_gflops(args.threads, args.device, args.dtype)
    for r in results:
        r["gemm_peak_gflops"] = peak
        r["mfu"] = r["achieved_gflops"] / peak
    doc = {
        "engine": "transformers+peft",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "machine": {"cpu": cpu_model(), "os_cpus": os.cpu_count(), "threads": args.threads,
                    "device": torch.cuda.get_device_name(args.device) if args.device != "cpu" else "cpu"},
        "settings": {"model": args.model, "data": args.data, "batch_size": args.batch_size,
                     "grad_accum": args.grad_accum, "seq_len": args.seq_len, "steps": args.steps,
                     "warmup": args.warmup, "padding": args.padding, "lora_r": args.r, "lora_alpha": args.alpha,
                     "attn": args.attn, "dtype": args.dtype, "device": args.device},
        "results": results,
    }
    mem = "peak GPU MiB (reserved)" if args.device != "cpu" else "peak RSS MiB"
    print("| engine | batch | seq_len | grad ckpt | tokens/s | ms/step | %s | padding waste | GFLOP/s | MFU |" % mem)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print("| transformers %s + peft %s | %d | %d | %s | %.1f | %.1f | %.0f | %.1f%% | %.2f | %.1f%% |" % (
            transformers.__version__, peft.__version__, args.batch_size, args.seq_len,
            "on" if r["gradient_checkpointing"] else "off", r["tokens_per_second"], r["ms_per_step"],
            r["peak_rss_mib"], 100 * r["padding_waste"], r["achieved_gflops"], 100 * r["mfu"]))
    print(json.dumps(doc, indent=2))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(doc, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
