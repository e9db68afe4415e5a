"""Fused sparse MLP for the CPU: one pass over the selected neurons, fp32.

For each selected neuron i (a contiguous row of w_in: gate and up interleaved, or fc1) the
kernel takes the dot products with x, applies the activation, and adds a_i * w_out_t[i] (a
contiguous row: W_down transposed) into a per-thread output; the threads' outputs are summed
at the end. Nothing is gathered into a temporary, so each selected weight byte is read once.
Compiled on first use with torch's cpp_extension (needs a C++ compiler and ninja); where that
fails, `available()` is False and the torch reference below is used instead.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import torch.nn.functional as F

ACT_CODES = {"silu": 0, "gelu_tanh": 1, "relu": 2}
ENABLED = True  # benchmarks switch the kernel off to time the torch reference

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <vector>

static inline float act(float v, int code) {
  if (code == 0) return v / (1.f + std::exp(-v));
  if (code == 1) return 0.5f * v * (1.f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));
  return v > 0.f ? v : 0.f;
}

static inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+:s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

// x [B, d], w_in [F, n_in, d], b_in [F, n_in] or empty, w_out_t [F, d], idx [k] -> [B, d]
torch::Tensor sparse_mlp(torch::Tensor x, torch::Tensor w_in, torch::Tensor b_in, torch::Tensor w_out_t,
                         torch::Tensor idx, int64_t act_code) {
  TORCH_CHECK(x.is_contiguous() && w_in.is_contiguous() && w_out_t.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && w_in.scalar_type() == torch::kFloat, "fp32 only");
  const int64_t B = x.size(0), d = x.size(1), n_in = w_in.size(1), k = idx.size(0);
  const bool gated = n_in == 2, has_bias = b_in.numel() > 0;
  const float* X = x.data_ptr<float>();
  const float* W = w_in.data_ptr<float>();
  const float* Wo = w_out_t.data_ptr<float>();
  const float* Bi = has_bias ? b_in.data_ptr<float>() : nullptr;
  const int64_t* I = idx.data_ptr<int64_t>();
  const int nt = at::get_num_threads();
  std::vector<float> partial((size_t)nt * B * d, 0.f);
  at::parallel_for(0, k, 16, [&](int64_t begin, int64_t end) {
    float* out = partial.data() + (size_t)at::get_thread_num() * B * d;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = I[t];
      const float* row = W + n * n_in * d;
      const float* orow = Wo + n * d;
      for (int64_t b = 0; b < B; ++b) {
        const float* xb = X + b * d;
        float h0 = dot(row, xb, d) + (has_bias ? Bi[n * n_in] : 0.f);
        float a = act(h0, (int)act_code);
        if (gated) a *= dot(row + d, xb, d) + (has_bias ? Bi[n * n_in + 1] : 0.f);
        if (a == 0.f) continue;  // ReLU zeros cost no down-projection read
        float* ob = out + b * d;
#pragma omp simd
        for (int64_t j = 0; j < d; ++j) ob[j] += a * orow[j];
      }
    }
  });
  auto result = torch::zeros({B, d}, x.options());
  float* R = result.data_ptr<float>();
  for (int th = 0; th < nt; ++th) {
    const float* p = partial.data() + (size_t)th * B * d;
    for (int64_t j = 0; j < B * d; ++j) R[j] += p[j];
  }
  return result;
}
"""


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load_inline
    print("dejavu: compiling the fused CPU sparse-MLP kernel (once, about a minute)...", file=sys.stderr, flush=True)
    return load_inline(name="dejavu_cpu_kernels", cpp_sources=[SOURCE], functions=["sparse_mlp"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp-simd"], verbose=False)


@functools.cache
def available() -> bool:
    if os.environ.get("DEJAVU_NO_CPU_KERNEL"):
        return False
    try:
        _extension()
        return True
    except Exception as e:  # no compiler, no ninja, ...: the torch reference still works
        print(f"dejavu: fused CPU kernel unavailable ({type(e).__name__}: {str(e)[:200]}); using torch",
              file=sys.stderr)
        return False


def sparse_mlp(mlp, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """MLP output for the neurons idx only. x [..., d] fp32 on the CPU."""
    shape = x.shape
    b_in = mlp.b_in if mlp.b_in is not None else torch.empty(0)
    out = _extension().sparse_mlp(x.reshape(-1, shape[-1]).contiguous(), mlp.w_in, b_in, mlp.w_out_t,
                                  idx.to(torch.int64).contiguous(), ACT_CODES[mlp.cfg.act])
    out = out.view(shape)
    return out + mlp.b_out if mlp.b_out is not None else out


def sparse_mlp_reference(mlp, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The same in torch (gathers the rows into temporaries)."""
    return mlp.project_out(mlp.activations(x, idx), idx)


def usable(x: torch.Tensor) -> bool:
    return ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() \
        and available()
