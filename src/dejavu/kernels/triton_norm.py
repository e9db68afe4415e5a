"""LayerNorm / RMSNorm for decode rows on the GPU: one program per row, the whole row in
registers. torch's layer_norm takes ~12 us on one 7168-wide row (H100: one block walks the
row); this takes a few, and runs twice per layer in every decode step, dense or sparse.
Rounding as model.Norm: LayerNorm in fp32 then cast; RMSNorm casts x * rstd before the weight.
With a residual r it also adds x + r first (rounded to x's dtype, as torch adds) and writes that
sum: the block's residual add and the next norm in one kernel."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gather import _wait_for_inputs, launcher


@triton.jit
def _norm_kernel(x_ptr, r_ptr, sum_ptr, w_ptr, b_ptr, out_ptr, N, eps, stride_x, stride_r, stride_o,
                 RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    _wait_for_inputs()
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * stride_o + offs, x, mask=mask)
    x = x.to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0) if HAS_WEIGHT else 1.0
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
        y = (x * rstd).to(out_ptr.dtype.element_ty).to(tl.float32) * w
    else:
        mean = tl.sum(x, axis=0) / N
        xc = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / N + eps)
        y = xc * rstd * w
        if HAS_BIAS:
            y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, rms: bool,
         residual: torch.Tensor | None = None):
    """norm(x), or with a residual (x + residual, norm(x + residual)). weight None: no scale."""
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x2.shape, device=x.device, dtype=x.dtype)
    total = torch.empty_like(out) if residual is not None else out
    N = x2.shape[1]
    block = triton.next_power_of_2(N)
    launcher(_norm_kernel)[(x2.shape[0],)](x2, r2, total, weight, bias, out, N, eps, x2.stride(0), r2.stride(0),
                                           out.stride(0), RMS=rms, HAS_WEIGHT=weight is not None,
                                           HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK=block,
                                           num_warps=min(16, max(1, block // 512)))
    if residual is None:
        return out.view(x.shape)
    return total.view(x.shape), out.view(x.shape)


def norm_reference(x, weight, bias, eps, rms):
    if not rms:
        return torch.nn.functional.layer_norm(x, x.shape[-1:], weight, bias, eps)
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight
