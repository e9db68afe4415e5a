"""Tiles of input_matvec (the input-major projection, dense and input-side sparse) on the decode
projections of Llama-3-8B and -70B, against F.linear on the output-major weight, batch 1. Each
call timed as 32 calls back to back in a CUDA graph over L2-defeating weight copies (bench.kernels.graph_ms).
Prints one line per (shape, mode, tile) and the best tile per (shape, mode); writes JSON to argv[1]."""
import itertools
import json
import sys

import torch
import torch.nn.functional as F

from dejavu.bench.kernels import copy_bandwidth, graph_ms
from dejavu.kernels import triton_gather as tg

PROJECTIONS = {  # name: (K inputs, N outputs)
    "8b qkv": (4096, 6144), "8b o": (4096, 4096), "8b gate_up": (4096, 28672), "8b down": (14336, 4096),
    "70b qkv": (8192, 10240), "70b o": (8192, 8192), "70b gate_up": (8192, 57344), "70b down": (28672, 8192),
}
TILES = list(itertools.product((32, 64, 128), (64, 128, 256), (3, 4), (4, 8)))  # block_m, block_n, stages, per SM
CALLS = 32


def main(out):
    bw, l2 = copy_bandwidth(), torch.cuda.get_device_properties(0).L2_cache_size
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, (K, N) in PROJECTIONS.items():
        copies = -(-8 * l2 // (K * N * 2))
        w = [torch.randn(K, N, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
        w_out = [t.t().contiguous() for t in w]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
        dense = graph_ms([lambda j=j: F.linear(x, w_out[j % copies]) for j in range(CALLS)])
        rows.append(dict(shape=name, mode="F.linear", ms=dense, of_bw=K * N * 2 / (dense / 1e3) / bw))
        print(f"{name:<12} F.linear          {dense * 1e3:7.1f} us  {rows[-1]['of_bw']:4.0%}", flush=True)
        for mode, sparsity in (("dense", 0.0), ("sparse 0.5", 0.5), ("sparse 0.4", 0.4)):
            t = None if not sparsity else x.float().abs().flatten().kthvalue(round(sparsity * K)).values
            best = None
            for bm, bn, st, pps in TILES:
                try:
                    ms = graph_ms([lambda j=j: tg.input_matvec(x, w[j % copies], None, None, t, block_m=bm, block_n=bn,
                                                               num_stages=st, programs_per_sm=pps)
                                   for j in range(CALLS)])
                except Exception as e:  # out of shared memory and the like: skip the tile
                    print(f"{name:<12} {mode:<10} {bm}x{bn} st{st} pps{pps}: {type(e).__name__}", flush=True)
                    continue
                read = K * N * 2 * (1 - sparsity)
                row = dict(shape=name, mode=mode, block_m=bm, block_n=bn, stages=st, per_sm=pps, ms=ms,
                           of_bw=read / (ms / 1e3) / bw, vs_linear=dense / ms)
                rows.append(row)
                if best is None or ms < best["ms"]:
                    best = row
            print(f"{name:<12} {mode:<10} best {best['block_m']}x{best['block_n']} st{best['stages']} "
                  f"pps{best['per_sm']}: {best['ms'] * 1e3:7.1f} us  {best['of_bw']:4.0%} of copy bw  "
                  f"{best['vs_linear']:.2f}x F.linear", flush=True)
        del w, w_out
        torch.cuda.empty_cache()
    json.dump(dict(card=torch.cuda.get_device_name(), copy_bandwidth=bw, rows=rows), open(out, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
