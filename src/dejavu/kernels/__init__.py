"""Gathered-row kernels, dispatched by device: C++ on the CPU (cpu.py), Triton on CUDA
(triton_gather.py), plain torch where neither is available. Each reads only the selected
rows of a weight, in place."""
from __future__ import annotations

import functools

import torch

from . import cpu


@functools.cache
def _triton():
    try:
        from . import triton_gather
        return triton_gather
    except Exception:  # no triton: torch below
        return None


def gather_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [..., d], w [N, d] (rows may be strided), idx [m] -> [..., m] = x @ w[idx].T"""
    if x.is_cuda and _triton() is not None and x.numel() // x.shape[-1] <= 32:
        return _triton().gather_matvec(x, w, idx)
    return cpu.gather_matvec(x, w, idx)


def gather_axpy(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a [..., m], w [N, d], idx [m] -> [..., d] = a @ w[idx]"""
    if a.is_cuda and _triton() is not None and a.numel() // a.shape[-1] <= 32:
        return _triton().gather_axpy(a, w, idx)
    return cpu.gather_axpy(a, w, idx)


def sparse_mlp(mlp, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """MLP output for the neurons idx only. A neuron's gate and up rows are adjacent rows of
    w_in viewed as [d_ff * n_in, d], so one gather_matvec reads them together."""
    n_in = mlp.cfg.n_in
    rows = (idx[:, None] * n_in + torch.arange(n_in, device=idx.device)).flatten()
    h = gather_matvec(x, mlp.w_in.flatten(0, 1), rows).unflatten(-1, (len(idx), n_in))
    if mlp.b_in is not None:
        h = h + mlp.b_in[idx]
    a = mlp.act(h[..., 0]) * h[..., 1] if n_in == 2 else mlp.act(h[..., 0])
    return mlp.project_out(a, idx)


def sparse_mlp_reference(mlp, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The same in plain torch (gathers the rows into temporaries)."""
    out = mlp.activations(x, idx) @ mlp.w_out_t[idx]
    return out + mlp.b_out if mlp.b_out is not None else out
