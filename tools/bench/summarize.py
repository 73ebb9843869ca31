#!/usr/bin/env python3
"""Summarizes the runs of side_by_side.sh: per shape, batch, checkpointing and loss setting, the
best and median tokens/s and peak RSS of sftd and of transformers + PEFT, and their ratios
(best to best, median to median; RSS of sftd's lowest to transformers' lowest); with runs of a
second sftd binary (side_by_side.sh's SFTD_BEFORE), its figures and after / before ratios too.

    python tools/bench/summarize.py WORKDIR/runs
"""

import glob
import json
import os
import re
import statistics
import sys
from collections import defaultdict

NAME = re.compile(r"^(?P<shape>[\w.-]+?)_b(?P<b>\d+)_ckpt(?P<c>on|off)_(?:(?P<loss>assistant|all)_)?(?P<eng>sftd|before|hf)_r\d+\.json$")


def main(runs_dir):
    sftd = defaultdict(list)  # (shape, b, ckpt, loss) -> [(tok/s, rss MB)]
    hf = defaultdict(list)  # (shape, b, ckpt) -> [(tok/s, rss MiB)]
    before = defaultdict(list)  # as sftd, for SFTD_BEFORE's runs
    machine = None
    for path in sorted(glob.glob(os.path.join(runs_dir, "*.json"))):
        m = NAME.search(os.path.basename(path))
        if not m:
            continue
        with open(path) as f:
            text = f.read().strip()
        if not text:
            continue
        doc = json.loads(text)
        key = (m["shape"], int(m["b"]), m["c"])
        if m["eng"] == "before":
            before[key + (m["loss"],)].append((doc["tokens_per_second"], doc["peak_rss_mb"]))
        elif m["eng"] == "sftd":
            sftd[key + (m["loss"],)].append((doc["tokens_per_second"], doc["peak_rss_mb"]))
            machine = machine or (doc.get("cpu"), doc.get("isa"), doc.get("gemm_kernel"), doc.get("threads"))
        else:
            r = doc["results"][0]
            hf[key].append((r["tokens_per_second"], r["peak_rss_mib"]))
    if machine:
        print("CPU: %s; ISA: %s; sftd's GEMM kernel: %s; %s threads\n" % machine)
    print("| shape | batch | ckpt | loss on | sftd tok/s best / median | transformers + PEFT tok/s best / median "
          "| ratio best / median | sftd peak RSS MiB | transformers peak RSS MiB | RSS ratio | runs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for key in sorted(sftd, key=lambda k: (not k[0].startswith("layers"), k[0], k[1], k[2] == "off", k[3] != "assistant")):
        s = sftd[key]
        h = hf.get(key[:3], [])
        st = [t for t, _ in s]
        srss = min(r for _, r in s)
        row = [key[0], str(key[1]), key[2], key[3], "%.1f / %.1f" % (max(st), statistics.median(st))]
        if h:
            ht = [t for t, _ in h]
            hrss = min(r for _, r in h)
            row += ["%.1f / %.1f" % (max(ht), statistics.median(ht)),
                    "%.2f× / %.2f×" % (max(st) / max(ht), statistics.median(st) / statistics.median(ht)),
                    "%.0f" % srss, "%.0f" % hrss, "%.2f×" % (srss / hrss), "%d + %d" % (len(s), len(h))]
        else:
            row += ["–", "–", "%.0f" % srss, "–", "–", "%d" % len(s)]
        print("| " + " | ".join(row) + " |")
    if before:
        print("\n| shape | batch | ckpt | loss on | before tok/s best / median | after tok/s best / median "
              "| after / before best / median | before peak RSS MiB | after peak RSS MiB | runs |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for key in sorted(before, key=lambda k: (not k[0].startswith("layers"), k[0], k[1], k[2] == "off", k[3] != "assistant")):
            bt = [t for t, _ in before[key]]
            at = [t for t, _ in sftd.get(key, [])]
            if not at:
                continue
            print("| %s | %d | %s | %s | %.1f / %.1f | %.1f / %.1f | %.2f× / %.2f× | %.0f | %.0f | %d + %d |" % (
                key[0], key[1], key[2], key[3], max(bt), statistics.median(bt), max(at), statistics.median(at),
                max(at) / max(bt), statistics.median(at) / statistics.median(bt),
                min(r for _, r in before[key]), min(r for _, r in sftd[key]), len(bt), len(at)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sftd-bench/runs"))
