"""Where a sparse decode step's time goes on the GPU (eager): torch profiler, CPU and CUDA.

`PYTHONPATH=src python scripts/profile_decode_gpu.py opt-6.7b`
"""
import sys

import torch

from dejavu.generate import generate_ids
from dejavu.load import load
from dejavu.predictor import random_predictors
from dejavu.selectors import default_selectors
from dejavu.sparse import Gathered

model = load(sys.argv[1] if len(sys.argv) > 1 else "opt-6.7b", device="cuda").model
n, h = default_selectors(model, random_predictors(model))
prompt = torch.randint(0, model.cfg.vocab_size, (128,)).tolist()
sparse = Gathered(model, mlp=n, heads=h, mlp_density=0.1, attn_density=0.42)
generate_ids(model, [prompt], 4, sparsity=sparse)
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as p:
    generate_ids(model, [prompt], 8, sparsity=sparse)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
print(p.key_averages().table(sort_by="self_device_time_total", row_limit=12))
