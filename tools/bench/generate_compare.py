#!/usr/bin/env python3
"""Greedy generation speed, sftd next to transformers, in one run on the same model and prompt.

The prompt is the first chat row of --data up to its first assistant turn, rendered with the
model's chat template and the generation prompt (as `sftd bench --generate` builds it), batch 1.
transformers: `generate(do_sample=False, use_cache=True, min_new_tokens=max_new_tokens=N)` in
float32 on CPU with torch.set_num_threads(--threads); prefill = one forward over the prompt with
`use_cache=True`, decode = (N-1) tokens / (time of generate(N) - time of that prefill).
sftd: `sftd bench --generate --json` (prefill, then N-1 cached decode steps, same stopping rule).

The two engines alternate --rounds times (the machine is shared and noisy); each round of sftd is
its own process with --runs timed runs, each round of transformers --runs timed runs in this
process. Reports best and median tokens/s of each, as a markdown table and JSON.

    python tools/bench/generate_compare.py --sftd target/release/sftd --model DATA/models/sftd-demo \\
        --data examples/tool_calls.jsonl --new-tokens 128 --rounds 3 --runs 3 --threads 2
"""

import argparse
import json
import os
import statistics
import subprocess
import time


def prompt_ids(tok, data):
    with open(data) as f:
        for line in f:
            row = json.loads(line)
            if "messages" not in row:
                continue
            msgs = row["messages"]
            turn = next((i for i, m in enumerate(msgs) if m["role"] == "assistant"), len(msgs))
            text = tok.apply_chat_template(msgs[:turn], tools=row.get("tools"), tokenize=False,
                                           add_generation_prompt=True)
            return tok(text, add_special_tokens=False)["input_ids"]
    raise SystemExit("no chat row in %s" % data)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sftd", required=True, help="the sftd binary")
    ap.add_argument("--model", required=True, help="a model directory")
    ap.add_argument("--data", default="examples/tool_calls.jsonl")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer, Qwen3ForCausalLM

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = Qwen3ForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(tok, args.data)])
    mask = torch.ones_like(ids)
    n = args.new_tokens

    def hf_run():
        with torch.no_grad():
            t = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, use_cache=True)
            prefill = time.perf_counter() - t
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, use_cache=True,
                                 max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
            total = time.perf_counter() - t
        assert out.shape[1] - ids.shape[1] == n
        return ids.shape[1] / prefill, (n - 1) / max(total - prefill, 1e-9)

    hf_run()  # warm-up
    results = {"sftd (candle)": {"prefill": [], "decode": []},
               "transformers": {"prefill": [], "decode": []}}
    env_threads = {"RAYON_NUM_THREADS": str(args.threads)}
    for _ in range(args.rounds):
        cmd = [args.sftd, "bench", "--generate", "--json", "--model", args.model, "--data", args.data,
               "--new-tokens", str(n), "--steps", str(args.runs)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env_threads})
        if p.returncode != 0:
            raise SystemExit("sftd bench failed:\n" + p.stderr)
        r = json.loads(p.stdout.strip().splitlines()[-1])
        assert r["prompt_tokens"] == ids.shape[1], (r["prompt_tokens"], ids.shape[1])
        # Per round: (best, median) of its runs.
        for k in ("prefill", "decode"):
            results["sftd (candle)"][k].append((r["%s_tokens_per_second_best" % k],
                                                r["%s_tokens_per_second_median" % k]))
        runs = [hf_run() for _ in range(args.runs)]
        for i, k in enumerate(("prefill", "decode")):
            v = [x[i] for x in runs]
            results["transformers"][k].append((max(v), statistics.median(v)))

    report = {"prompt_tokens": ids.shape[1], "new_tokens": n, "threads": args.threads,
              "torch": torch.__version__, "engines": {}}
    print("| engine | prompt | new | prefill tok/s best / median | decode tok/s best / median |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        # Best over every run; median of the rounds' medians.
        row = {k: {"best": max(b for b, _ in v), "median": statistics.median(m for _, m in v)}
               for k, v in r.items()}
        report["engines"][name] = row
        print("| %s | %d | %d | %.0f / %.0f | %.1f / %.1f |" % (
            name, ids.shape[1], n, row["prefill"]["best"], row["prefill"]["median"],
            row["decode"]["best"], row["decode"]["median"]))
    print(json.dumps(report))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
