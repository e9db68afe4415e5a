"""Tensor parallelism over torch.distributed, in the spirit of gpt-fast's tp.py.

Each of N ranks keeps 1/N of every block: a contiguous range of attention heads (their Q/K/V
rows and their W_o slice) and of MLP neurons (their w_in rows and W_down columns). Q/K/V and
the MLP up side are column-parallel, W_o and W_down row-parallel: every rank produces a partial
block output and one all-reduce (sum) after each half-block makes it whole. Embeddings, norms
and the LM head are replicated; output biases are added by rank 0 only.

Sparse decode needs no extra communication: each rank owns its slice of every predictor's
output and picks its own top-k/N among its own neurons and heads (sparse.Selection with
shards=N is the same rule on one rank, for evaluation and tests). The lookahead predictors on
the side stream overlap the all-reduces like any other main-stream work.

Launch with the standard launcher; the same command works for N = 1:
    torchrun --nproc-per-node N -m dejavu bench e2e --tp N --shape opt-66b
Several nodes: torchrun's rendezvous arguments (--nnodes, --node-rank, --rdzv-endpoint), as for
any torch.distributed program; NCCL on CUDA, gloo on CPU.
"""
from __future__ import annotations

import copy
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
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


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


def _all_reduce(module, inputs, output):
    dist.all_reduce(output)  # in place: capturable in a CUDA graph with NCCL
    return output


def shard(model: Transformer, rank: int, world: int) -> Transformer:
    """Keep this rank's heads and neurons, in place (works on the meta device too: load() shards
    synthetic weights before allocating them). Adds the all-reduce after each half-block."""
    cfg = model.cfg
    check_divisible(cfg, world)
    if world == 1:
        return model
    local = dataclasses.replace(cfg, n_heads=cfg.n_heads // world, n_kv_heads=cfg.n_kv_heads // world,
                                d_ff=cfg.d_ff // world)
    for block in model.layers:
        a, m = block.attn, block.mlp
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
    model.cfg = local
    return model


def shard_predictors(preds, rank: int, world: int):
    """This rank's slice of every predictor's output (its own neurons and heads), a copy (the
    caller's predictors stay whole); the shared low-rank input projection stays whole. The
    metadata's config becomes the shard's, so costs compare with the shard's block."""
    from .predictor import Predictors
    preds = copy.deepcopy(preds)
    for p in preds.mlp + preds.heads:
        p.up.weight, p.up.bias = _rows(p.up.weight, rank, world), _rows(p.up.bias, rank, world)
    sn = None if preds.static_neuron is None else [s.chunk(world)[rank] for s in preds.static_neuron]
    sh = None if preds.static_head is None else [s.chunk(world)[rank] for s in preds.static_head]
    g = preds.meta["config"]
    local = dict(g, n_heads=g["n_heads"] // world, n_kv_heads=g["n_kv_heads"] // world, d_ff=g["d_ff"] // world)
    return Predictors(preds.mlp, preds.heads, sn, sh, dict(preds.meta, config=local, tp=[rank, world]))
