"""Where a CUDA-graph decode step's time goes, kernel by kernel, from a CUPTI trace of graph
replays: for each kind of kernel, how many run, their summed duration, and their share of the
critical path (the time from the previous kernel's end to this one's end: launch gaps and waits
included, so the shares add up to the step).

    PYTHONPATH=src python scripts/trace_step_gpu.py --shape llama-3-8b --input-sparsity 0.5
"""
import argparse
import collections
import json
import os
import tempfile

import torch
from torch.profiler import ProfilerActivity, profile

from dejavu.engine import GraphDecoder
from dejavu.load import load
from dejavu.selectors import InputSelector
from dejavu.sparse import InputSparsity, calibrate_thresholds

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="llama-3-8b")
ap.add_argument("--input-sparsity", type=float, default=0.5)
ap.add_argument("--replays", type=int, default=5)
args = ap.parse_args()

KINDS = [("norm", "_norm_kernel"), ("gather", "_gather_axpy_kernel"), ("pack", "_compact_kernel"),
         ("attention split", "_decode_split_kernel"), ("attention combine", "_decode_reduce_kernel"),
         ("act", "_act_kernel"), ("cuBLAS", "gemv"), ("cuBLAS", "gemm"), ("cuBLAS", "sm90"), ("cuBLAS", "cutlass"),
         ("cuBLAS", "splitKreduce")]


def kind(name: str) -> str:
    return next((k for k, pat in KINDS if pat in name), "other: " + name[:60])


def role(k: str, seen: collections.Counter, order: collections.Counter) -> str:
    """An input-side step's gathers (and packing kernels) by projection, from their order in the
    layer, where each layer runs all four (and both)."""
    roles = {"gather": ("q/k/v", "o", "gate/up", "down"), "pack": ("gate/up", "down")}.get(k)
    i = order[k]
    order[k] += 1
    if roles is None or seen[k] != len(roles) * model.cfg.n_layers:
        return k
    return f"{k} {roles[i % len(roles)]}"


model = load(args.shape, dtype=torch.bfloat16, device="cuda", max_seq_len=300).model
prompt = torch.randint(0, model.cfg.vocab_size, (1, 128), device="cuda")


def input_side():
    sel = InputSelector(model, "teal")
    return InputSparsity(model, sel, calibrate_thresholds(model, sel, prompt, 1 - args.input_sparsity), gathered=True)


for name, make in (("dense, output-major (cuBLAS)", lambda: None), ("dense, input-major", "input-major"),
                   (f"input-side teal {args.input_sparsity:g}", input_side)):
    if make == "input-major":
        model.to_input_major()
        make = lambda: None
    dec = GraphDecoder(model, 1, 260, make())
    dec.prefill(prompt)
    dec.decode(32)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.replays):
            dec.graph.replay()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    kernels = sorted((e for e in json.load(open(path))["traceEvents"] if e.get("cat") == "kernel"),
                     key=lambda e: e["ts"])
    per = len(kernels) // args.replays
    rows = collections.defaultdict(lambda: [0, 0.0, 0.0])
    steps = []
    for r in range(1, args.replays):  # the first replay's start is cold
        step = kernels[r * per:(r + 1) * per]
        prev_end = kernels[r * per - 1]["ts"] + kernels[r * per - 1]["dur"]
        steps.append(max(e["ts"] + e["dur"] for e in step) - prev_end)
        seen, order = collections.Counter(kind(e["name"]) for e in step), collections.Counter()
        for e in step:
            end = e["ts"] + e["dur"]
            row = rows[role(kind(e["name"]), seen, order)]
            row[0] += 1
            row[1] += e["dur"]
            row[2] += max(0.0, end - prev_end)
            prev_end = max(prev_end, end)
    n = args.replays - 1
    print(f"\n== {args.shape} {name}: {per} kernels a step, step {sum(steps) / n / 1e3:.3f} ms (end to end)")
    print(f"  {'kernel':<28}{'per step':>9}{'duration us':>13}{'critical us':>13}{'critical each':>15}")
    for k, (count, dur, crit) in sorted(rows.items(), key=lambda kv: -kv[1][2]):
        print(f"  {k[:28]:<28}{count / n:9.0f}{dur / n:13.1f}{crit / n:13.1f}{crit / count:15.2f}")
    del dec
