#!/usr/bin/env python3
"""Load benchmark of the sftd service (Python standard library only; not a test, not in CI).

    python3 tools/loadbench.py [--bin target/debug/sftd] [--rate 200] [--seconds 10] [--subscribers 1000]

It starts its own server (fresh temporary data dir, loopback, CPU) for each part:

1. Job creation: POST /v1/fine_tuning/jobs open-loop at --rate requests/s for --seconds over a
   pool of keep-alive connections, while the worker trains the jobs as they queue. Latency is
   measured from each request's scheduled send time, so queueing delay counts
   (no coordinated omission). Reports p50/p90/p99/max.
2. Stream fan-out: one training job on the demo model; after a baseline window without
   subscribers, --subscribers SSE clients follow it. Reports, per delivered event, the lag
   behind the first subscriber that received the same event and behind the end of the
   training step it reports (p50/p99/max of each), events lost or
   duplicated (expected 0), server RSS before and with the subscribers, the training
   tokens/s reported by the trainer without and with subscribers, and the cores used in each
   window by the server's training thread, its other threads, and this client.
"""
import argparse
import asyncio
import json
import os
import pathlib
import re
import resource
import statistics
import subprocess
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def thread_cpu(pid):
    """CPU seconds used so far by a process's live threads, by thread name."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[comm] = out.get(comm, 0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


class CpuMeter:
    """Cores used over a window by the server's training thread (sftd-worker), by its other
    threads (HTTP and the event fan-out on tokio's, SQLite's, and any further training threads
    of candle's pool, which take the name of whichever thread started them) and by this client.
    With CANDLE_NUM_THREADS=1 the first is all of the training."""

    def __init__(self, pid):
        self.pid = pid
        self.start = self._sample()

    def _sample(self):
        threads = thread_cpu(self.pid)
        training = sum(v for k, v in threads.items() if k.startswith("sftd-worker"))
        t = os.times()
        return time.perf_counter(), training, sum(threads.values()) - training, t.user + t.system

    def stop(self):
        end = self._sample()
        wall = end[0] - self.start[0]
        return {name: (b - a) / wall for name, a, b in
                zip(("worker_thread", "other_server_threads", "client"), self.start[1:], end[1:])}


class Server:
    def __init__(self, binary):
        self.dir = tempfile.TemporaryDirectory(prefix="sftd-loadbench-")
        env = dict(os.environ, SFTD_ADDR="127.0.0.1:0", SFTD_DATA_DIR=f"{self.dir.name}/data",
                   SFTD_DEVICE="cpu", RUST_LOG="warn,sftd::api=info", NO_COLOR="1",
                   HF_ENDPOINT="http://127.0.0.1:9")
        self.proc = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in self.proc.stdout:
            m = re.search(r"listening on http://([0-9.]+):(\d+)", line)
            if m:
                self.host, self.port = m.group(1), int(m.group(2))
                break
        else:
            raise SystemExit("server did not start")
        # Keep draining the log so the server never blocks on a full pipe.
        self._drain = asyncio.get_event_loop().run_in_executor(None, lambda: [None for _ in self.proc.stdout])

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.dir.cleanup()


async def request(host, port, method, path, body=None, headers=None, conn=None):
    """A minimal HTTP/1.1 client; returns (status, body bytes, connection for reuse)."""
    if conn is None:
        conn = await asyncio.open_connection(host, port)
    reader, writer = conn
    data = b"" if body is None else body
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(data)}\r\n"
    for k, v in (headers or {}).items():
        head += f"{k}: {v}\r\n"
    writer.write(head.encode() + b"\r\n" + data)
    await writer.drain()
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        k, _, v = line.decode().partition(":")
        if k.lower() == "content-length":
            length = int(v)
    return status, await reader.readexactly(length), conn


def upload_body(path):
    boundary = "sftdloadbench"
    content = pathlib.Path(path).read_bytes()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{pathlib.Path(path).name}\"\r\n"
            "Content-Type: application/jsonl\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


async def upload(srv, path):
    body, headers = upload_body(path)
    st, resp, (_, w) = await request(srv.host, srv.port, "POST", "/v1/files", body, headers)
    w.close()
    assert st == 200, resp
    return json.loads(resp)["id"]


def job_body(file_id, max_steps):
    return json.dumps({"model": "sftd-demo", "training_file": file_id, "method": {"type": "supervised",
        "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2, "gradient_accumulation_steps": 1,
        "max_seq_len": 128, "max_steps": max_steps, "learning_rate": 0.003,
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}}}}).encode()


async def bench_create(binary, rate, seconds):
    srv = Server(binary)
    try:
        file_id = await upload(srv, ROOT / "examples" / "text.jsonl")
        body = job_body(file_id, 2)
        headers = {"Content-Type": "application/json"}
        # Warm up: the first job generates the demo model.
        st, _, (_, w) = await request(srv.host, srv.port, "POST", "/v1/fine_tuning/jobs", body, headers)
        w.close()
        assert st == 200
        pool = asyncio.Queue()
        for _ in range(64):
            pool.put_nowait(None)
        lat, errors = [], 0

        async def one(scheduled):
            nonlocal errors
            conn = await pool.get()
            try:
                st, _, conn = await request(srv.host, srv.port, "POST", "/v1/fine_tuning/jobs", body, headers, conn)
                if st != 200:
                    errors += 1
                lat.append((time.perf_counter() - scheduled) * 1000)
            except (ConnectionError, asyncio.IncompleteReadError):
                errors += 1
                conn = None
            pool.put_nowait(conn)

        n = int(rate * seconds)
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            scheduled = start + i / rate
            delay = scheduled - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(scheduled)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        return {"requests": n, "errors": errors, "achieved_rps": n / wall,
                "p50_ms": pct(lat, 50), "p90_ms": pct(lat, 90), "p99_ms": pct(lat, 99), "max_ms": max(lat)}
    finally:
        srv.stop()


async def subscriber(srv, job_id, after, received, ready):
    reader, writer = await asyncio.open_connection(srv.host, srv.port)
    # HTTP/1.0: the stream is close-delimited, no chunk framing to strip.
    writer.write(f"GET /v1/fine_tuning/jobs/{job_id}/events?stream=true&after={after} HTTP/1.0\r\nHost: x\r\n"
                 "Accept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    ready.set()
    seqs = []
    try:
        while line := await reader.readline():
            if line.startswith(b"id: "):
                seqs.append((int(line[4:]), time.perf_counter()))
            elif line.startswith(b"data: ") and b'"status":"' in line and re.search(rb'"status":"(succeeded|failed|cancelled)"', line):
                break
    finally:
        writer.close()
    received.append(seqs)


async def metrics_events(srv, job_id):
    events, after = [], 0
    while True:
        st, body, (_, w) = await request(srv.host, srv.port, "GET", f"/v1/fine_tuning/jobs/{job_id}/events?after={after}&limit=1000")
        w.close()
        page = json.loads(body)
        events += page["data"]
        if not page["has_more"]:
            return events
        after = page["data"][-1]["seq"]


async def bench_fanout(binary, subscribers, steps, baseline_steps):
    srv = Server(binary)
    try:
        file_id = await upload(srv, ROOT / "examples" / "text.jsonl")
        st, body, (_, w) = await request(srv.host, srv.port, "POST", "/v1/fine_tuning/jobs",
                                         job_body(file_id, steps), {"Content-Type": "application/json"})
        w.close()
        job_id = json.loads(body)["id"]

        async def last_step():
            evs = await metrics_events(srv, job_id)
            return max([e["data"]["step"] for e in evs if e["type"] == "metrics"] or [0])

        while await last_step() < 3:
            await asyncio.sleep(0.2)
        rss_before = rss_mb(srv.proc.pid)
        cpu = CpuMeter(srv.proc.pid)
        while await last_step() < baseline_steps:
            await asyncio.sleep(0.2)
        attach_step = await last_step()
        cpu_without = cpu.stop()
        live_from = len(await metrics_events(srv, job_id))
        received, tasks = [], []
        for _ in range(subscribers):
            ready = asyncio.Event()
            tasks.append(asyncio.create_task(subscriber(srv, job_id, live_from, received, ready)))
            await ready.wait()
        await asyncio.sleep(2)
        # Only events committed after every subscriber is attached count for lag.
        measured_from = len(await metrics_events(srv, job_id))
        rss_with = rss_mb(srv.proc.pid)
        rss_peak = rss_with
        cpu = CpuMeter(srv.proc.pid)

        async def watch_rss():
            nonlocal rss_peak
            while True:
                rss_peak = max(rss_peak, rss_mb(srv.proc.pid))
                await asyncio.sleep(0.5)

        watcher = asyncio.create_task(watch_rss())
        await asyncio.gather(*tasks)
        cpu_with = cpu.stop()
        watcher.cancel()
        events = await metrics_events(srv, job_id)
        n_events = len(events)
        first = {}
        for seqs in received:
            for seq, t in seqs:
                first[seq] = min(first.get(seq, t), t)
        lags, bad = [], 0
        for seqs in received:
            got = [s for s, _ in seqs]
            if got != list(range(live_from + 1, n_events + 1)):
                bad += 1
            lags += [(t - first[s]) * 1000 for s, t in seqs if s > measured_from]
        # Delivery behind the end of the step itself: receive time minus the trainer's
        # elapsed_seconds for that step, less the smallest such difference over all deliveries
        # (the unknown offset between the two clocks; so this slightly understates the lag).
        step_end = {i + 1: e["data"]["elapsed_seconds"] for i, e in enumerate(events)
                    if e["type"] == "metrics" and "elapsed_seconds" in (e["data"] or {})}
        behind = [t - step_end[s] for seqs in received for s, t in seqs if s > measured_from and s in step_end]
        offset = min(behind)
        behind = [(d - offset) * 1000 for d in behind]
        # Per-step throughput from consecutive metrics events (the trainer's own tokens_per_second
        # is a run average, which would smear the attach transition over the whole run).
        steps = [(i + 1, e["data"]) for i, e in enumerate(events)
                 if e["type"] == "metrics" and "num_tokens" in (e["data"] or {})]
        rates = []
        for (_, a), (seq, b) in zip(steps, steps[1:]):
            dt = b["elapsed_seconds"] - a["elapsed_seconds"]
            if dt > 0:
                rates.append((b["step"], seq, (b["num_tokens"] - a["num_tokens"]) / dt))
        # Skip the first steps (warm-up); "with" counts only steps committed after every
        # subscriber had attached and caught up.
        without = [v for step, _, v in rates if 3 < step <= attach_step]
        with_subs = [v for _, seq, v in rates if seq > measured_from]
        return {"subscribers": subscribers, "events_per_subscriber": n_events - live_from,
                "events_measured": n_events - measured_from, "subscribers_with_gap_or_dup": bad,
                "lag_p50_ms": pct(lags, 50), "lag_p99_ms": pct(lags, 99), "lag_max_ms": max(lags),
                "lag_behind_step_p50_ms": pct(behind, 50), "lag_behind_step_p99_ms": pct(behind, 99),
                "lag_behind_step_max_ms": max(behind),
                "rss_before_mb": rss_before, "rss_with_subscribers_mb": rss_with, "rss_peak_mb": rss_peak,
                "tokens_per_s_without": statistics.median(without), "tokens_per_s_with": statistics.median(with_subs),
                **{f"cores_{k}_without": v for k, v in cpu_without.items()},
                **{f"cores_{k}_with": v for k, v in cpu_with.items()}}
    finally:
        srv.stop()


async def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=str(ROOT / "target" / "debug" / "sftd"))
    ap.add_argument("--rate", type=float, default=200)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--subscribers", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--baseline-steps", type=int, default=200)
    ap.add_argument("--skip-create", action="store_true")
    ap.add_argument("--skip-fanout", action="store_true")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.subscribers * 2 + 256)), hard))
    if not args.skip_create:
        r = await bench_create(args.bin, args.rate, args.seconds)
        print("create:", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))
    if not args.skip_fanout:
        r = await bench_fanout(args.bin, args.subscribers, args.steps, args.baseline_steps)
        print("fanout:", json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    asyncio.run(main())
