"""Decode attention alone: one split per head (no combine kernel) against the default split, at
several cache sizes, 32 layers' caches chained in a CUDA graph (as a step runs them), Llama-3-8B
heads (32 query, 8 KV, head_dim 128), batch 1, bf16.

    PYTHONPATH=src python scripts/probe_attention_splits.py
"""
import torch

from dejavu.kernels import triton_attention as ta

H, KV, HD, LAYERS = 32, 8, 128, 32
torch.manual_seed(0)
heads = torch.arange(H, device="cuda")
for S in (260, 512, 1024, 2048, 4096):
    k = torch.randn(LAYERS, 1, KV, S, HD, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, H, HD, device="cuda", dtype=torch.bfloat16)
    valid = torch.ones(1, S, device="cuda", dtype=torch.bool)
    for length in sorted({128, S // 2, S - 2}):
        L = torch.tensor(length, device="cuda")
        row = []
        for n_splits, block_s in ((0, 64), (1, 64), (1, 128)):
            def step():
                for i in range(LAYERS):
                    ta.decode_attention(q, k[i], v[i], heads, H, L, valid, HD ** -0.5, n_splits, block_s)
            step()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                step()
            for _ in range(5):
                g.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(20):
                start.record()
                g.replay()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) * 1e3 / LAYERS)
            times.sort()
            splits = n_splits or ta._n_splits(1, H, S, block_s, ta.sm_count(q))
            row.append(f"{splits:2d} splits x {block_s:3d}: {times[len(times) // 2]:5.2f} us")
        print(f"S {S:5d} length {length:5d}  " + "  |  ".join(row), flush=True)
