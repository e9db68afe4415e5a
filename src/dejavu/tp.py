"""Tensor parallelism over torch.distributed, in the spirit of gpt-fast's tp.py.

Each of N ranks keeps 1/N of every block: a contiguous range of attention heads (their Q/K/V
rows and their W_o slice) and of MLP neurons (their w_in rows and W_down columns). Q/K/V and
the MLP up side are column-parallel, W_o and W_down row-parallel: every rank produces a partial
block output and one all-reduce (sum) after each half-block makes it whole. Embeddings, norms
and the LM head are replicated; output biases are added by rank 0 only.

The all-reduce of a decode step (a few rows) is kernels/triton_allreduce.py's one-shot kernel over
peer-to-peer buffers, captured in the CUDA graph like any kernel; prefill-size tensors and the CPU
use torch.distributed's (NCCL, gloo). DEJAVU_ALL_REDUCE=nccl sends every call to NCCL (to compare).

Sparse decode needs no extra communication: each rank owns its slice of every predictor's
output (Predictors.shard) and picks its own top-k/N among its own neurons and heads (sparse.Selection with
shards=N is the same rule on one rank, for evaluation and tests). The lookahead predictors on
the side stream overlap the all-reduces like any other main-stream work.

Launch with the standard launcher; the same command works for N = 1:
    torchrun --nproc-per-node N -m dejavu bench e2e --tp N --shape opt-66b
Several nodes: torchrun's rendezvous arguments (--nnodes, --node-rank, --rdzv-endpoint), as for
any torch.distributed program; NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import DejavuError
from .model import Transformer


def init(world: int) -> int:
    """Join the process group torchrun set up; -> this rank. `world` is what the user asked for
    (--tp N) and must match the processes torchrun started."""
    started = int(os.environ.get("WORLD_SIZE", "1"))
    if started != world:
        raise DejavuError(f"--tp {world} but {started} process(es) were started; launch with "
                          f"`torchrun --nproc-per-node {world} -m dejavu ... --tp {world}`")
    if world == 1 and not dist.is_initialized():
        return 0
    # Our all-reduce uses peer loads and stores only: torch's symmetric memory must not create
    # NVLink multicast objects (on shared hosts a fault there can take the GPUs down).
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


def same_on_every_rank(value):
    """Rank 0's value on every rank (e.g. a fresh sampling seed: the ranks must draw alike)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def check_divisible(cfg, world: int):
    for name, n in (("attention heads", cfg.n_heads), ("key/value heads", cfg.n_kv_heads), ("MLP neurons", cfg.d_ff)):
        if n % world:
            raise DejavuError(f"tensor parallelism over {world} ranks needs the {name} ({n}) to divide evenly; "
                              f"choose --tp among the divisors of {n}")


def _rows(p: nn.Parameter | None, rank: int, world: int) -> nn.Parameter | None:
    """This rank's contiguous 1/world of the first dimension (a copy: the full tensor can go)."""
    if p is None:
        return None
    n = p.shape[0] // world
    return nn.Parameter(p.data[rank * n:(rank + 1) * n].clone(), requires_grad=p.requires_grad)


_one_shot = None  # the decode all-reduce, built by the first call that fits it (a collective)


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place; capturable in a CUDA graph either way."""
    global _one_shot
    if x.is_cuda and os.environ.get("DEJAVU_ALL_REDUCE") != "nccl":
        if _one_shot is None and not torch.cuda.is_current_stream_capturing():
            from .kernels.triton_allreduce import OneShotAllReduce
            _one_shot = OneShotAllReduce(x.device)
        if _one_shot is not None and _one_shot.fits(x):
            return _one_shot(x)
    dist.all_reduce(x)
    return x


def _all_reduce(module, inputs, output):
    return all_reduce(output)


def local_config(cfg, world: int):
    return dataclasses.replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=cfg.n_kv_heads // world,
                               d_ff=cfg.d_ff // world)


def shard_block(block, rank: int, world: int):
    """Keep this rank's heads and neurons of one block, in place (the whole tensors go), and add
    the all-reduce after each half."""
    a, m = block.attn, block.mlp
    local = local_config(a.cfg, world)
    for name in ("wqkv", "bqkv"):  # this rank's heads in each of Q, K and V (a head's rows are contiguous)
        p = getattr(a, name)
        if p is not None:
            setattr(a, name, nn.Parameter(torch.cat([_rows(t, rank, world) for t in p.data.split(a.parts)]),
                                          requires_grad=p.requires_grad))
    a.wo_t = _rows(a.wo_t, rank, world)
    for name in ("w_in", "b_in", "w_out_t"):                     # a neuron's rows likewise
        setattr(m, name, _rows(getattr(m, name), rank, world))
    if rank:  # the sum over ranks must add the output biases once
        a.bo, m.b_out = None, None
    a.cfg = m.cfg = local
    a.register_forward_hook(_all_reduce)
    m.register_forward_hook(_all_reduce)


def mark_sharded(model: Transformer, rank: int, world: int, fingerprint: str | None) -> Transformer:
    """After every block is sharded: the model's config becomes the shard's; `fingerprint` is
    the whole model's (what predictors on disk were made for: Predictors.load shards them)."""
    model.unsharded_fingerprint, model.tp = fingerprint, (rank, world)
    model.cfg = local_config(model.cfg, world)
    return model


def shard(model: Transformer, rank: int, world: int) -> Transformer:
    """Keep this rank's heads and neurons, in place (works on the meta device too: load() shards
    synthetic weights before allocating them)."""
    check_divisible(model.cfg, world)
    if world == 1:
        return model
    from .collect import model_fingerprint
    fingerprint = None if model.device.type == "meta" else model_fingerprint(model)
    for block in model.layers:
        shard_block(block, rank, world)
    return mark_sharded(model, rank, world, fingerprint)
