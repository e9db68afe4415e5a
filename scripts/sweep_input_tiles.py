"""Input-side projections on the decode shapes of Llama-3-8B and -70B, batch 1, bf16: F.linear on
the output-major and on the input-major (transposed view) weight, and input-side sparse
(input_gather: the passing channels packed per split, then only their rows read) at sparsities
0.4/0.5 for a few tiles (rows x columns per step, pipeline stages, programs per SM) and both ways
of packing (a kernel first, or none: masked row loads). Each call timed as 32 calls back to
back in a CUDA graph over L2-defeating weight copies (bench.kernels.graph_ms). Writes JSON to argv[1];
argv[2], if given, keeps the projections whose name starts with it ("8b")."""
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
TILES = [(64, 128, 2, 4), (64, 128, 3, 4), (64, 128, 4, 4), (64, 128, 3, 2), (64, 256, 2, 4)]
PACKS = ("kernel", "mask")  # input_gather's packing: a kernel first, or none (masked row loads)
CALLS = 32


def main(out, only=""):
    bw, l2 = copy_bandwidth(), torch.cuda.get_device_properties(0).L2_cache_size
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    def add(name, mode, ms, read, **kw):
        rows.append(dict(shape=name, mode=mode, ms=ms, of_bw=read / (ms / 1e3) / bw, **kw))
        print(f"{name:<12} {mode:<34} {ms * 1e3:7.1f} us  {rows[-1]['of_bw']:4.0%} of copy bw", flush=True)

    for name, (K, N) in PROJECTIONS.items():
        if not name.startswith(only):
            continue
        copies = -(-8 * l2 // (K * N * 2))
        w_t = [torch.randn(K, N, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(copies)]
        w_out = [t.t().contiguous() for t in w_t]
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16, generator=g)
        add(name, "F.linear output-major", graph_ms([lambda j=j: F.linear(x, w_out[j % copies]) for j in range(CALLS)]),
            K * N * 2)
        add(name, "F.linear input-major view", graph_ms([lambda j=j: F.linear(x, w_t[j % copies].t())
                                                         for j in range(CALLS)]), K * N * 2)
        for sparsity in (0.4, 0.5):
            t = x.float().abs().flatten().kthvalue(round(sparsity * K)).values
            kept = int((x.float().abs() > t).sum())
            for (bm, bn, st, pps), pack in itertools.product(TILES, PACKS):
                def call(j):
                    return tg.input_gather(x, w_t[j % copies], None, t, block_m=bm, block_n=bn, num_stages=st,
                                           programs_per_sm=pps, pack=pack)
                add(name, f"sparse {sparsity} {bm}x{bn} st{st} pps{pps} pack {pack}",
                    graph_ms([lambda j=j: call(j) for j in range(CALLS)]), kept * N * 2, sparsity=sparsity,
                    tile=(bm, bn, st, pps), pack=pack)
        del w_t, w_out
        torch.cuda.empty_cache()
    json.dump(dict(card=torch.cuda.get_device_name(), copy_bandwidth=bw, rows=rows), open(out, "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
