"""Tile sweep for the MLP gather kernels at batch 1 (the decode case), timed as `dejavu bench kernels`
times them (bench.graph_ms: 32 calls back to back in a CUDA graph, weights read from HBM).

    PYTHONPATH=src python scripts/sweep_gather_tiles.py [--shapes opt-66b,llama-3-70b] [--densities 0.1,0.25,0.5]

Prints, per shape, side and density, the best configurations and the current default's figure."""
import argparse
import itertools

import torch

from dejavu.bench import kernels as bench
from dejavu.kernels import triton_gather as tg

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--shapes", default="opt-66b,llama-3-70b")
p.add_argument("--densities", default="0.1,0.25,0.5")
p.add_argument("--batch", type=int, default=1)
args = p.parse_args()

bw = bench.copy_bandwidth()
l2 = torch.cuda.get_device_properties(0).L2_cache_size
print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
g = torch.Generator(device="cuda").manual_seed(0)
CALLS = 32
for name in args.shapes.split(","):
    d, n, gated = bench.KERNEL_SHAPES[name]
    n_in, act = (2, "silu") if gated else (1, "relu")
    copies = -(-8 * l2 // (n * d * 2))
    w_in = [torch.randn(n, n_in, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    w_out_t = [torch.randn(n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
    x = torch.randn(args.batch, d, device="cuda", dtype=torch.bfloat16, generator=g)
    for density in [float(v) for v in args.densities.split(",")]:
        k = round(density * n)
        idx = [torch.randperm(n, device="cuda", generator=g)[:k] for _ in range(CALLS)]
        a = torch.randn(args.batch, k, device="cuda", dtype=torch.bfloat16, generator=g)
        sides = {
            "up": (k * n_in * d * 2, lambda j, c: tg.gather_act(x, w_in[j % copies], None, idx[j], act, *c),
                   [(0, 0, 4, 0)] + list(itertools.product((16, 32, 64), (256, 512, 1024), (4, 8), (2, 3, 4)))),
            "down": (k * d * 2, lambda j, c: tg.gather_axpy(a, w_out_t[j % copies], idx[j], None, 1, *c),
                     [(64, 128, 4, 2, 4)] + list(itertools.product((16, 32, 64), (128, 256, 512), (4, 8), (2, 3),
                                                                    (2, 4, 8)))),
        }
        for side, (nbytes, fn, configs) in sides.items():
            results = []
            for c in configs:
                try:
                    ms = bench.graph_ms([lambda j=j: fn(j, c) for j in range(CALLS)], replays=5)
                except Exception as e:  # a tile too large for shared memory
                    print(f"  skip {c}: {type(e).__name__}", flush=True)
                    continue
                results.append((ms, c))
            default = results[0]
            results.sort()
            print(f"{name} {side} density {density} weights {nbytes / 1e6:.0f} MB: default {default[1]} "
                  f"{default[0] * 1e3:.1f} us ({nbytes / (default[0] / 1e3) / bw:.0%})", flush=True)
            for ms, c in results[:6]:
                print(f"   {c}  {ms * 1e3:.1f} us  {nbytes / (ms / 1e3) / bw:.0%} of copy bw", flush=True)
    del w_in, w_out_t
    torch.cuda.empty_cache()
