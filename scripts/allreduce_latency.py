"""What one decode all-reduce costs inside a CUDA graph: NCCL, torch's symmetric-memory one-shot,
and ours (kernels/triton_allreduce.py), at the row widths of OPT-30B/66B/175B.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 scripts/allreduce_latency.py --out results/gpu

Each figure: a graph of CALLS back-to-back all-reduces of one [rows, d] bf16 tensor, replayed
REPLAYS times; us per call = elapsed / (CALLS * REPLAYS), median over 5 timings. Before timing,
every variant's sum is checked against NCCL's on random data (ours must match it bit for bit).
Writes tp_allreduce.json and .md (rank 0)."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dejavu.kernels.triton_allreduce import OneShotAllReduce  # noqa: E402

CALLS, REPLAYS = 64, 20


def graph_us(fn, x) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn(x)
    times = []
    for _ in range(5):
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(REPLAYS):
            g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (CALLS * REPLAYS))
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("results/gpu"))
    ap.add_argument("--widths", default="7168,9216,12288")
    ap.add_argument("--rows", default="1,8,32")
    args = ap.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    ours = OneShotAllReduce(torch.device("cuda", rank))
    variants = {"nccl": lambda x: dist.all_reduce(x), "ours (one-shot, triton)": ours}
    try:  # torch's own one-shot needs its input in a symmetric buffer: one copy in, one op out
        import torch.distributed._symmetric_memory as symm_mem
        staging = symm_mem.empty(ours.buffer.numel() // 4, dtype=torch.bfloat16, device="cuda")
        symm_mem.rendezvous(staging, dist.group.WORLD)
        name = dist.group.WORLD.group_name

        def torch_one_shot(x):
            s = staging[:x.numel()].view_as(x)
            s.copy_(x)
            torch.ops.symm_mem.one_shot_all_reduce_out(s, "sum", name, x)
        variants["torch symm_mem one_shot_all_reduce"] = torch_one_shot
    except Exception as e:
        if rank == 0:
            print(f"torch one-shot unavailable: {type(e).__name__}: {e}")
    rows_out = []
    for d in map(int, args.widths.split(",")):
        for r in map(int, args.rows.split(",")):
            gen = torch.Generator(device="cuda").manual_seed(rank)
            ref = torch.randn(r, d, device="cuda", dtype=torch.bfloat16, generator=gen)
            want = ref.clone()
            dist.all_reduce(want)
            for label, fn in variants.items():
                x = ref.clone()
                fn(x)
                torch.cuda.synchronize()
                equal = torch.equal(x, want)
                us = graph_us(fn, torch.zeros_like(ref))  # zeros: repeated in-place sums stay finite
                row = dict(variant=label, d=d, rows=r, bytes=r * d * 2, us_per_call=round(us, 2),
                           equal_to_nccl=equal, world=world, card=torch.cuda.get_device_name())
                rows_out.append(row)
                if rank == 0:
                    print(json.dumps(row), flush=True)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tp_allreduce.json").write_text(json.dumps(rows_out, indent=1) + "\n")
        lines = [f"# One decode all-reduce in a CUDA graph, {world} x {rows_out[0]['card']}, bf16",
                 "", "`torchrun --nproc-per-node 2 scripts/allreduce_latency.py` (multicast off)", "",
                 "| variant | d | rows | us per call | equal to NCCL |", "|---|---|---|---|---|"]
        lines += [f"| {r['variant']} | {r['d']} | {r['rows']} | {r['us_per_call']} | {r['equal_to_nccl']} |" for r in rows_out]
        (args.out / "tp_allreduce.md").write_text("\n".join(lines) + "\n")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
