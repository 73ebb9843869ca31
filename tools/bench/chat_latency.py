#!/usr/bin/env python3
"""Chat completion latency with and without a job training, against a real `sftd serve`.

Starts the given sftd binary on a fresh data directory, then sends --requests streamed greedy
chat completions (`stream: true`, `include_usage`) to the demo model while the worker is idle,
starts a long demo job and, once it has recorded a step and a checkpoint, sends the same
requests again (to the base model, served from the job's own weights, and to the job's
checkpoint), then cancels the job. Per request:

  time to first token (TTFT) = request sent -> first content delta
  decode tokens/s             = (completion_tokens - 1) / (first content delta -> last chunk)

Requests run one at a time. Reports best and median of each as a markdown table and JSON, and
the job's median optimizer-step time while it was measured (with gradient accumulation 1 a
request waits for up to one step: the trainer yields between micro-batches).
Standard library only.

    python3 tools/bench/chat_latency.py --sftd target/debug/sftd --requests 8 --new-tokens 64
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request

PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "What is the weather in Paris today? Answer in one sentence."}]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Api:
    def __init__(self, base):
        self.base = base

    def call(self, path, body=None, method=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read() or b"null")

    def upload(self, path):
        boundary = "sftdbench"
        with open(path, "rb") as f:
            content = f.read()
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.jsonl\"\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        req = urllib.request.Request(self.base + "/v1/files", data=body,
                                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.loads(r.read())["id"]

    def stream(self, model, new_tokens):
        body = {"model": model, "messages": PROMPT, "temperature": 0, "max_completion_tokens": new_tokens,
                "stream": True, "stream_options": {"include_usage": True}}
        req = urllib.request.Request(self.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        sent = time.perf_counter()
        first = last = None
        tokens = None
        with urllib.request.urlopen(req, timeout=600) as r:
            for raw in r:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    if c["delta"].get("content") and first is None:
                        first = now
                last = now
        if first is None or tokens is None:
            raise SystemExit(f"no content or usage in the answer of {model}")
        return {"ttft": first - sent, "decode": (tokens - 1) / max(last - first, 1e-9), "tokens": tokens}


def summarize(name, runs):
    ttft = [r["ttft"] for r in runs]
    dec = [r["decode"] for r in runs]
    return {"case": name, "requests": len(runs), "completion_tokens": statistics.median(r["tokens"] for r in runs),
            "ttft_ms_best": 1000 * min(ttft), "ttft_ms_median": 1000 * statistics.median(ttft),
            "decode_tokens_per_second_best": max(dec), "decode_tokens_per_second_median": statistics.median(dec)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sftd", required=True)
    ap.add_argument("--data", default="examples/tool_calls.jsonl")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json-out")
    args = ap.parse_args()
    port = free_port()
    data_dir = tempfile.mkdtemp(prefix="sftd-chat-latency-")
    env = {**os.environ, "SFTD_DATA_DIR": data_dir, "SFTD_ADDR": f"127.0.0.1:{port}", "SFTD_DEVICE": "cpu",
           "RUST_LOG": "warn"}
    server = subprocess.Popen([args.sftd, "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = Api(f"http://127.0.0.1:{port}")
    try:
        for _ in range(300):
            try:
                api.call("/healthz")
                break
            except OSError:
                time.sleep(0.2)
        api.stream("sftd-demo", 4)  # loads the demo model (untimed)
        results = [summarize("idle worker, base model", [api.stream("sftd-demo", args.new_tokens)
                                                         for _ in range(args.requests)])]
        file_id = api.upload(args.data)
        job = api.call("/v1/fine_tuning/jobs", {
            "model": "sftd-demo", "training_file": file_id, "seed": 7,
            "method": {"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1, "max_seq_len": 256,
                "max_steps": 100000, "save_steps": 2}}}})["id"]
        ckpt = None
        for _ in range(3000):
            cks = api.call(f"/v1/fine_tuning/jobs/{job}/checkpoints")["data"]
            if cks:
                ckpt = cks[0]["fine_tuned_model_checkpoint"]
                break
            time.sleep(0.2)
        if ckpt is None:
            raise SystemExit("the job saved no checkpoint")
        results.append(summarize("job training, base model (its weights)",
                                 [api.stream("sftd-demo", args.new_tokens) for _ in range(args.requests)]))
        results.append(summarize("job training, its checkpoint",
                                 [api.stream(ckpt, args.new_tokens) for _ in range(args.requests)]))
        events = api.call(f"/v1/fine_tuning/jobs/{job}/events?limit=1000")["data"]
        elapsed = sorted((e["data"]["step"], e["data"]["elapsed_seconds"]) for e in events
                         if e.get("type") == "metrics" and "train_loss" in (e.get("data") or {}))
        gaps = [b[1] - a[1] for a, b in zip(elapsed, elapsed[1:])]
        step_seconds = statistics.median(gaps) if gaps else float("nan")
        status = api.call(f"/v1/fine_tuning/jobs/{job}")["status"]
        if status != "running":
            raise SystemExit(f"the job was {status} before the measurements ended")
        api.call(f"/v1/fine_tuning/jobs/{job}/cancel", {}, "POST")
    finally:
        server.terminate()
        server.wait(timeout=60)
    print("| case | requests | tokens | TTFT ms best / median | decode tok/s best / median |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['requests']} | {r['completion_tokens']:.0f} | {r['ttft_ms_best']:.0f} / "
              f"{r['ttft_ms_median']:.0f} | {r['decode_tokens_per_second_best']:.1f} / "
              f"{r['decode_tokens_per_second_median']:.1f} |")
    print(f"job step time while measured: median {step_seconds:.2f} s over {len(gaps)} steps")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"cases": results, "job_step_seconds_median": step_seconds}, f, indent=1)


if __name__ == "__main__":
    main()
