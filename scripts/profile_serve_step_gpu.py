"""Where the serving step's GPU time goes: sparse at one live row of the all-rows graph (each row its own
units, sparse.Gathered.per_row) against a one-row decoder with the batch-1 selection, OPT-30B shape:
the graph step's ms, then the same step's kernels run eagerly, by name.

    PYTHONPATH=src python scripts/profile_serve_step_gpu.py
"""
import torch
from torch.profiler import ProfilerActivity, profile
from dejavu.engine import GraphDecoder, side_stream
from dejavu.load import load
from dejavu.predictor import random_predictors
from dejavu.selectors import PredictorSelector
from dejavu.sparse import Gathered
m = load("opt-30b", dtype=torch.bfloat16, device="cuda", max_seq_len=2048).model
sel = PredictorSelector(random_predictors(m, mlp_rank=256, head_rank=224))
for B in (1, 16):
    d = GraphDecoder(m, B, 2048, None, lazy_kv=False, sampling=True)
    g = side_stream(Gathered(m, sel, sel, 0.1, 0.42))
    s = g.per_row(d.live) if B > 1 else g
    d.capture(B, True, s)
    print(B, "graph ms, 1 live", d.time_step(B, True, live=1), flush=True)
    d.live.zero_()
    d.live[0] = 1
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(2):
            d._step(B, s)
        torch.cuda.synchronize()
    ev = [e for e in p.key_averages() if e.device_type.name == "CUDA"]
    print(B, "kernel ms", sum(e.self_device_time_total for e in ev) / 2e3)
    for e in sorted(ev, key=lambda e: -e.self_device_time_total)[:16]:
        print(f"{e.self_device_time_total / 2e3:8.3f} {e.count / 2:5.0f}x {e.key[:100]}")
