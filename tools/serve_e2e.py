#!/usr/bin/env python3
"""One fine-tuning job through a live `sftd serve` on a chosen device, standard library only (a GPU
host has python3 but maybe neither curl nor jq): upload the bundled tool-call examples, train the
demo job for a few steps, then ask the fine-tuned model a plain question and one with a forced tool
call. Prints the job's events, timings and answers; exits non-zero on any failure.

    python3 tools/serve_e2e.py --bin target/release/sftd --device cuda:0 --dir /tmp/e2e
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call(base, method, path, body=None, headers=None, timeout=300):
    req = urllib.request.Request(base + path, data=body, method=method, headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def post_json(base, path, obj):
    return call(base, "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"})


def upload(base, path):
    boundary = uuid.uuid4().hex
    with open(path, "rb") as f:
        data = f.read()
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
        f'filename="{os.path.basename(path)}"\r\nContent-Type: application/jsonl\r\n\r\n'
    ).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    return call(base, "POST", "/v1/files", body, headers)["id"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", required=True)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    base = f"http://127.0.0.1:{port}"
    env = dict(os.environ, SFTD_ADDR=f"127.0.0.1:{port}", SFTD_DATA_DIR=os.path.join(args.dir, "data"),
               SFTD_DEVICE=args.device, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    log_path = os.path.join(args.dir, "server.log")
    server = subprocess.Popen([args.bin, "serve"], env=env, stdout=open(log_path, "w"),
                              stderr=subprocess.STDOUT)
    try:
        return run(base, args, server, log_path)
    finally:
        server.terminate()
        server.wait(timeout=30)


def wait_healthy(base, server, log_path, seconds=60):
    """Returns once /healthz answers; exits, with the server's log, if it dies or stays silent."""
    deadline = time.time() + seconds
    while time.time() < deadline and server.poll() is None:
        try:
            call(base, "GET", "/healthz", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    print(open(log_path).read(), file=sys.stderr)
    sys.exit(f"sftd serve did not come up (exit status {server.poll()})")


def run(base, args, server, log_path):
    wait_healthy(base, server, log_path)
    train = upload(base, os.path.join(ROOT, "examples/tool_calls.jsonl"))
    val = upload(base, os.path.join(ROOT, "examples/tool_calls_val.jsonl"))
    job = json.load(open(os.path.join(ROOT, "examples/job.json")))
    job["training_file"], job["validation_file"] = train, val
    job["method"]["supervised"]["hyperparameters"].update(
        {"max_steps": args.max_steps, "eval_steps": max(1, args.max_steps // 2)})
    job_id = post_json(base, "/v1/fine_tuning/jobs", job)["id"]
    start = time.time()
    while True:
        state = call(base, "GET", f"/v1/fine_tuning/jobs/{job_id}")
        if state["status"] in ("succeeded", "failed", "cancelled"):
            break
        if time.time() - start > args.timeout:
            sys.exit(f"job {job_id} still {state['status']} after {args.timeout:.0f} s")
        time.sleep(1)
    print(f"job {job_id}: {state['status']} after {time.time() - start:.1f} s on {args.device}")
    events = call(base, "GET", f"/v1/fine_tuning/jobs/{job_id}/events?limit=10000")["data"]
    events.sort(key=lambda e: e["created_at"])
    for e in events:
        d = e.get("data") or {}
        if e["type"] != "metrics" or "valid_loss" in d or "tool_eval_examples" in d or d.get("step") in (1, args.max_steps):
            print(f"  [{e['type']}] {e['message']}")
    if state["status"] != "succeeded":
        print(json.dumps(state.get("error"), indent=1))
        sys.exit("the job did not succeed")

    model = state["fine_tuned_model"]
    t = time.time()
    plain = post_json(base, "/v1/chat/completions", {
        "model": model, "max_tokens": 48, "temperature": 0,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}]})
    print(f"chat ({time.time() - t:.2f} s): finish {plain['choices'][0]['finish_reason']}, "
          f"usage {plain['usage']}, message {json.dumps(plain['choices'][0]['message'])[:240]}")
    example = json.loads(open(os.path.join(ROOT, "examples/tool_calls_val.jsonl")).readline())
    t = time.time()
    forced = post_json(base, "/v1/chat/completions", {
        "model": model, "max_tokens": 96, "temperature": 0, "tools": example["tools"],
        "tool_choice": "required", "messages": example["messages"][:2]})
    choice = forced["choices"][0]
    calls = choice["message"].get("tool_calls") or []
    print(f"forced call ({time.time() - t:.2f} s): finish {choice['finish_reason']}, "
          f"calls {[(c['function']['name'], c['function']['arguments']) for c in calls]}, "
          f"content {choice['message'].get('content')!r}")
    names = {tool["function"]["name"] for tool in example["tools"]}
    if choice["finish_reason"] == "tool_calls":
        if not calls or calls[0]["function"]["name"] not in names:
            sys.exit("a forced call named no offered function")
        json.loads(calls[0]["function"]["arguments"])
    elif choice["finish_reason"] != "length":
        sys.exit(f"a forced call finished with {choice['finish_reason']}")
    print("serve end to end: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
