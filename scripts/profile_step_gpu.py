"""Where a decode step's GPU time goes: the CUDA-graph step's time, then the kernels of the same
step run eagerly (device-position form: the work the graph replays), grouped by name.

    PYTHONPATH=src python scripts/profile_step_gpu.py --shape opt-30b --mlp-density 0.1 --attn-density 0.42 --mlp-rank 256
    PYTHONPATH=src python scripts/profile_step_gpu.py --shape llama-3-8b --input-sparsity 0.5   (gated: input-side)
"""
import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from dejavu.engine import GraphDecoder
from dejavu.load import load
from dejavu.predictor import random_predictors
from dejavu.selectors import PredictorSelector
from dejavu.sparse import Gathered

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="opt-30b")
ap.add_argument("--mlp-density", type=float, default=0.1)
ap.add_argument("--attn-density", type=float, default=0.42)
ap.add_argument("--mlp-rank", type=int)
ap.add_argument("--input-sparsity", type=float, help="input-side (teal) on the input-major model instead")
ap.add_argument("--rows", type=int, default=22)
args = ap.parse_args()

model = load(args.shape, dtype=torch.bfloat16, device="cuda", max_seq_len=512).model
sel = None if args.input_sparsity else PredictorSelector(random_predictors(model, mlp_rank=args.mlp_rank))
prompt = torch.randint(0, model.cfg.vocab_size, (1, 128), device="cuda")
variants = {} if args.input_sparsity else {
    "dense": lambda: None,
    "sparse, predictors on a side stream": lambda: Gathered(model, sel, sel, args.mlp_density, args.attn_density,
                                                            side_stream=torch.cuda.Stream()),
    "sparse, predictors inline": lambda: Gathered(model, sel, sel, args.mlp_density, args.attn_density),
}
if args.input_sparsity:
    from dejavu.selectors import InputSelector
    from dejavu.sparse import InputSparsity, calibrate_thresholds
    variants["dense, output-major"] = lambda: None
    variants["dense, input-major"] = lambda: model.to_input_major() and None
    def input_side():
        sel = InputSelector(model, "teal")
        return InputSparsity(model, sel, calibrate_thresholds(model, sel, prompt, 1 - args.input_sparsity), gathered=True)
    variants[f"input-side teal {args.input_sparsity:g}"] = input_side
for name, make in variants.items():
    dec = GraphDecoder(model, 1, 300, make())
    dec.prefill(prompt)
    _, ms = dec.decode(48)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            dec._step(dec.batch, dec.sparsity)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    kernels = sum(e.count for e in events) / 2
    busy = sum(e.self_device_time_total for e in events) / 2 / 1e3
    print(f"\n== {args.shape} {name}: graph step {statistics.median(ms):.2f} ms; eager step runs {kernels:.0f} "
          f"kernels ({kernels / model.cfg.n_layers:.1f} per layer), {busy:.2f} ms of kernel time")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:args.rows]:
        print(f"  {e.self_device_time_total / 2e3:8.3f} ms  {e.count / 2:6.0f}x  {e.key[:110]}")
