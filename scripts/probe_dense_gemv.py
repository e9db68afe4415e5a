"""Dense decode projections of Llama-3-8B (batch 1, bf16): cuBLAS (F.linear) against dejavu's
gather_matvec over every row, 32 calls back to back in a CUDA graph over L2-defeating copies.
    PYTHONPATH=src python scripts/probe_dense_gemv.py"""
import torch
import torch.nn.functional as F

from dejavu.bench.kernels import copy_bandwidth, graph_ms
from dejavu.kernels import triton_gather as tg

bw, l2 = copy_bandwidth(), torch.cuda.get_device_properties(0).L2_cache_size
print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s")
for name, (N, K) in {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
                     "lm_head": (128256, 4096)}.items():
    copies = max(1, -(-8 * l2 // (K * N * 2)))
    w = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) for _ in range(min(copies, 8))]
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    rows = torch.arange(N, device="cuda", dtype=torch.int32)
    for label, fn in {"F.linear": lambda j: F.linear(x, w[j % len(w)]),
                      "gather_matvec": lambda j: tg.gather_matvec(x, w[j % len(w)], rows),
                      "gather_matvec 32x": lambda j: tg.gather_matvec(x, w[j % len(w)], rows, block_m=32),
                      "gather_matvec 16x": lambda j: tg.gather_matvec(x, w[j % len(w)], rows, block_m=16)}.items():
        ms = graph_ms([lambda j=j: fn(j) for j in range(16)])
        print(f"{name:<8} {label:<18} {ms * 1e3:7.1f} us  {N * K * 2 / (ms / 1e3) / bw:5.0%} of copy bw", flush=True)
    del w
    torch.cuda.empty_cache()
