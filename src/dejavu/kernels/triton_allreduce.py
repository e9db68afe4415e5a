"""A one-shot all-reduce for decode-size tensors, over peer-to-peer memory, capturable in a CUDA graph.

A decode step of a tensor-parallel model all-reduces one row per token (1 x d_model) twice per
layer. NCCL's ring/tree algorithms are built for bandwidth: on two H200s one such call costs about
20 us in a graph (128 calls a token: about a quarter of a sparse OPT-66B step). Here every rank
writes its tensor straight into each peer's receive buffer (stores over NVLink), raises a flag
there, waits for the peers' flags in its own memory and sums what arrived: one one-way trip of
latency, no second barrier.

The buffers come from torch's symmetric memory (`symm_mem.empty` + `rendezvous`: the same
allocation mapped on every rank); only plain loads, stores and atomics on peer addresses are used,
never NVLink multicast.

Why no closing barrier is needed: call k writes slot k % 2 of the peers' buffers. A rank starts
call k only after its call k-1 saw every peer's call-k-1 flag, and a peer raises that flag only
after its call k-2 finished (kernels on one stream run in order), so nobody still reads slot k % 2.
Every call runs the same NPROG programs, each with its own epoch counter and flag, so all programs
agree on k. The sum runs in rank order in fp32 on every rank: all ranks get the same bits.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import triton
import triton.language as tl

NPROG = 16             # programs per call, each a contiguous range (all run every call: see above)
BLOCK = 1024
CAP_BYTES = 1 << 20    # per rank and slot: larger tensors (prefill) go to NCCL


@triton.jit
def _one_shot_kernel(x_ptr, out_ptr, n, bases_ptr, counters_ptr,
                     CAP: tl.constexpr, FLAGS_AT: tl.constexpr, RANK: tl.constexpr, WORLD: tl.constexpr,
                     NPROG: tl.constexpr, BLOCK: tl.constexpr):
    b = tl.program_id(0)
    dt = x_ptr.dtype.element_ty
    epoch = tl.load(counters_ptr + b) + 1
    slot = epoch % 2
    per = tl.cdiv(tl.cdiv(n, NPROG), 16) * 16
    start = b * per
    stop = tl.minimum(start + per, n)
    for p in tl.static_range(WORLD):               # push this rank's range into every peer's slot
        if p != RANK:
            peer = tl.load(bases_ptr + p).to(tl.pointer_type(dt)) + (slot * WORLD + RANK) * CAP
            for off in range(start, stop, BLOCK):
                o = off + tl.arange(0, BLOCK)
                m = o < stop
                tl.store(peer + o, tl.load(x_ptr + o, mask=m), mask=m)
    tl.debug_barrier()                             # every thread's stores before the flag (released below)
    for p in tl.static_range(WORLD):
        if p != RANK:
            flag = (tl.load(bases_ptr + p) + FLAGS_AT).to(tl.pointer_type(tl.int32)) + (slot * WORLD + RANK) * NPROG + b
            tl.atomic_xchg(flag, epoch, sem="release", scope="sys")
    own = tl.load(bases_ptr + RANK)
    for p in tl.static_range(WORLD):               # wait for the peers' ranges of this call
        if p != RANK:
            flag = (own + FLAGS_AT).to(tl.pointer_type(tl.int32)) + (slot * WORLD + p) * NPROG + b
            seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
            while seen != epoch:
                seen = tl.atomic_add(flag, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    for off in range(start, stop, BLOCK):
        o = off + tl.arange(0, BLOCK)
        m = o < stop
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(WORLD):           # rank order on every rank: the same bits everywhere
            if p == RANK:
                v = tl.load(x_ptr + o, mask=m, other=0.0)
            else:
                v = tl.load(own.to(tl.pointer_type(dt)) + (slot * WORLD + p) * CAP + o, mask=m, other=0.0,
                            volatile=True)
            acc += v.to(tl.float32)
        tl.store(out_ptr + o, acc.to(dt), mask=m)
    tl.store(counters_ptr + b, epoch)


class OneShotAllReduce:
    """In-place sum over the default process group for CUDA tensors of at most CAP_BYTES; a
    collective to build (every rank at once, outside graph capture)."""

    def __init__(self, device: torch.device, group=None):
        import torch.distributed._symmetric_memory as symm_mem
        group = group or dist.group.WORLD
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.flags_at = 2 * self.world * CAP_BYTES
        self.buffer = symm_mem.empty(self.flags_at + 2 * self.world * NPROG * 4, dtype=torch.uint8, device=device)
        self.buffer.zero_()
        handle = symm_mem.rendezvous(self.buffer, group)
        self.bases = torch.tensor(handle.buffer_ptrs, dtype=torch.int64, device=device)
        self.counters = torch.zeros(NPROG, dtype=torch.int32, device=device)
        torch.cuda.synchronize(device)
        dist.barrier(group)  # every rank's flags are zero before anyone raises one

    def fits(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.is_contiguous() and x.numel() * x.element_size() <= CAP_BYTES \
            and x.dtype in (torch.bfloat16, torch.float16, torch.float32)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        _one_shot_kernel[(NPROG,)](x, x, x.numel(), self.bases, self.counters, CAP=CAP_BYTES // x.element_size(),
                                   FLAGS_AT=self.flags_at, RANK=self.rank, WORLD=self.world, NPROG=NPROG,
                                   BLOCK=BLOCK, num_warps=4)
        return x
