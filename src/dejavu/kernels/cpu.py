"""Sparse kernels for the CPU, fp32: each reads only the selected weight rows, once.

gather_matvec   out[b, j] = W[idx[j]] . x[b]       (gate/up rows, Q rows of selected heads)
gather_axpy     out[b]   = sum_j a[b, j] W[idx[j]] (W_down / W_o rows, transposed layouts)
gate_first_mlp  one token's gate-first selection and sparse MLP in a single call
input_gather    input-side sparsity: the channels past a threshold, then gather_axpy over their rows

The selected rows are read in place (no gathered temporary, which plain `W[idx] @ x` writes
and reads again), four rows at a time so that more cache-line fills are in flight, with the
next rows prefetched; gather_axpy sums into per-thread outputs added at the end. Compiled on
first use with torch's cpp_extension (needs a C++ compiler and ninja); where that fails,
`available()` is False and the same functions run in torch.
"""
from __future__ import annotations

import functools
import os
import sys

import torch

ENABLED = True  # benchmarks switch the kernel off to time the torch reference

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
// Four independent accumulators: a single FMA chain would be latency-bound, not bandwidth-bound.
static inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(b + j + 16), s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(b + j + 24), s3);
  }
  __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  h = _mm_hadd_ps(h, h);
  h = _mm_hadd_ps(h, h);
  float r = _mm_cvtss_f32(h);
  for (; j < n; ++j) r += a[j] * b[j];
  return r;
}
// Four rows at once: four independent streams keep more cache-line fills in flight.
static inline void dot4(const float* r0, const float* r1, const float* r2, const float* r3,
                        const float* __restrict x, int64_t n, float* out) {
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 xv = _mm256_loadu_ps(x + j);
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(r0 + j), xv, s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(r1 + j), xv, s1);
    s2 = _mm256_fmadd_ps(_mm256_loadu_ps(r2 + j), xv, s2);
    s3 = _mm256_fmadd_ps(_mm256_loadu_ps(r3 + j), xv, s3);
  }
  __m256 acc[4] = {s0, s1, s2, s3};
  const float* rows[4] = {r0, r1, r2, r3};
  for (int r = 0; r < 4; ++r) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float v = _mm_cvtss_f32(h);
    for (int64_t t = j; t < n; ++t) v += rows[r][t] * x[t];
    out[r] = v;
  }
}
#else
static inline float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+:s)
  for (int64_t j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}
static inline void dot4(const float* r0, const float* r1, const float* r2, const float* r3,
                        const float* __restrict x, int64_t n, float* out) {
  out[0] = dot(r0, x, n); out[1] = dot(r1, x, n); out[2] = dot(r2, x, n); out[3] = dot(r3, x, n);
}
#endif

// Ask for the next row while this one is used: rows are scattered, so the hardware
// prefetcher restarts at every row.
static inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) __builtin_prefetch(p + j, 0, 0);
}

static inline float act(float v, int code) {
  if (code == 0) return v / (1.f + std::exp(-v));                                     // silu
  return 0.5f * v * (1.f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));  // gelu (tanh)
}

// Gate-first gated MLP for one token, in one call (the selection's small steps cost more
// than the weights they save when each is a separate torch op):
//   g = act(W_gate x + b_gate) for every neuron; candidates = top n_cand by |g| * down_norm;
//   a = g * (W_up x + b_up) for the candidates; keep the top k by |a| * down_norm; out = sum a_i W_down[i].
// x [d], w_in [F, 2, d], b_in [F, 2] or empty, w_out_t [F, d], down_norm [F] -> (out [d], kept neuron ids [k])
std::vector<torch::Tensor> gate_first_mlp(torch::Tensor x, torch::Tensor w_in, torch::Tensor b_in, torch::Tensor w_out_t,
                                          torch::Tensor down_norm, int64_t n_cand, int64_t k, int64_t act_code) {
  TORCH_CHECK(x.is_contiguous() && w_in.is_contiguous() && w_out_t.is_contiguous() && b_in.is_contiguous(),
              "contiguous inputs");
  const int64_t F = w_in.size(0), d = x.numel();
  const float* X = x.data_ptr<float>();
  const float* W = w_in.data_ptr<float>();
  std::vector<float> zeros(b_in.numel() ? 0 : 2 * F, 0.f);  // no bias: adds of zero
  const float* Bi = b_in.numel() ? b_in.data_ptr<float>() : zeros.data();
  const float* Wo = w_out_t.data_ptr<float>();
  const float* DN = down_norm.data_ptr<float>();
  std::vector<float> g(F), score(F);
  at::parallel_for(0, F, 64, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    float v[4];
    for (; i + 4 <= end; i += 4) {
      dot4(W + i * 2 * d, W + (i + 1) * 2 * d, W + (i + 2) * 2 * d, W + (i + 3) * 2 * d, X, d, v);
      for (int q = 0; q < 4; ++q) g[i + q] = act(v[q] + Bi[(i + q) * 2], (int)act_code);
    }
    for (; i < end; ++i) g[i] = act(dot(W + i * 2 * d, X, d) + Bi[i * 2], (int)act_code);
    for (int64_t t = begin; t < end; ++t) score[t] = std::fabs(g[t]) * DN[t];
  });
  std::vector<int64_t> order(F);
  for (int64_t i = 0; i < F; ++i) order[i] = i;
  n_cand = std::min(n_cand, F);
  std::nth_element(order.begin(), order.begin() + n_cand - 1, order.end(),
                   [&](int64_t a, int64_t b) { return score[a] > score[b]; });
  std::vector<float> a(n_cand), imp(n_cand);
  at::parallel_for(0, n_cand, 64, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    float v[4];
    for (; j + 4 <= end; j += 4) {
      dot4(W + order[j] * 2 * d + d, W + order[j + 1] * 2 * d + d, W + order[j + 2] * 2 * d + d,
           W + order[j + 3] * 2 * d + d, X, d, v);
      for (int q = 0; q < 4; ++q) a[j + q] = g[order[j + q]] * (v[q] + Bi[order[j + q] * 2 + 1]);
    }
    for (; j < end; ++j) a[j] = g[order[j]] * (dot(W + order[j] * 2 * d + d, X, d) + Bi[order[j] * 2 + 1]);
    for (int64_t t = begin; t < end; ++t) imp[t] = std::fabs(a[t]) * DN[order[t]];
  });
  k = std::min(k, n_cand);
  std::vector<int64_t> pos(n_cand);
  for (int64_t j = 0; j < n_cand; ++j) pos[j] = j;
  std::nth_element(pos.begin(), pos.begin() + k - 1, pos.end(), [&](int64_t p, int64_t q) { return imp[p] > imp[q]; });
  auto kept = torch::empty({k}, torch::kLong);
  int64_t* K = kept.data_ptr<int64_t>();
  for (int64_t j = 0; j < k; ++j) K[j] = order[pos[j]];
  const int nt = at::get_num_threads();
  std::vector<float> partial((size_t)nt * d, 0.f);
  at::parallel_for(0, k, 16, [&](int64_t begin, int64_t end) {
    float* ob = partial.data() + (size_t)at::get_thread_num() * d;
    for (int64_t j = begin; j < end; ++j) {
      const float s = a[pos[j]];
      const float* row = Wo + K[j] * d;
      if (j + 1 < end) prefetch_row(Wo + K[j + 1] * d, d);
#pragma omp simd
      for (int64_t c = 0; c < d; ++c) ob[c] += s * row[c];
    }
  });
  auto out = torch::zeros({d}, x.options());
  float* R = out.data_ptr<float>();
  for (int th = 0; th < nt; ++th)
    for (int64_t c = 0; c < d; ++c) R[c] += partial[(size_t)th * d + c];
  return {out, kept};
}

// x [B, d], W [N, d] with any row stride (unit column stride), idx [m] -> [B, m]
torch::Tensor gather_matvec(torch::Tensor x, torch::Tensor W, torch::Tensor idx) {
  TORCH_CHECK(x.is_contiguous() && W.stride(1) == 1, "x contiguous, W rows contiguous");
  const int64_t B = x.size(0), d = x.size(1), m = idx.size(0), rs = W.stride(0);
  auto out = torch::empty({B, m}, x.options());
  const float* X = x.data_ptr<float>();
  const float* Wp = W.data_ptr<float>();
  const int64_t* I = idx.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    int64_t j = begin;
    float v[4];
    for (; j + 4 <= end; j += 4) {
      const float* r[4] = {Wp + I[j] * rs, Wp + I[j + 1] * rs, Wp + I[j + 2] * rs, Wp + I[j + 3] * rs};
      for (int64_t b = 0; b < B; ++b) {
        dot4(r[0], r[1], r[2], r[3], X + b * d, d, v);
        for (int q = 0; q < 4; ++q) O[b * m + j + q] = v[q];
      }
    }
    for (; j < end; ++j)
      for (int64_t b = 0; b < B; ++b) O[b * m + j] = dot(Wp + I[j] * rs, X + b * d, d);
  });
  return out;
}

// a [B, m], W [N, d] with any row stride, idx [m] -> [B, d]
torch::Tensor gather_axpy(torch::Tensor a, torch::Tensor W, torch::Tensor idx) {
  TORCH_CHECK(a.is_contiguous() && W.stride(1) == 1, "a contiguous, W rows contiguous");
  const int64_t B = a.size(0), m = a.size(1), d = W.size(1), rs = W.stride(0);
  const float* A = a.data_ptr<float>();
  const float* Wp = W.data_ptr<float>();
  const int64_t* I = idx.data_ptr<int64_t>();
  const int nt = at::get_num_threads();
  std::vector<float> partial((size_t)nt * B * d, 0.f);
  at::parallel_for(0, m, 16, [&](int64_t begin, int64_t end) {
    float* out = partial.data() + (size_t)at::get_thread_num() * B * d;
    int64_t j = begin;
    for (; j + 4 <= end; j += 4) {  // four rows per pass over the output
      const float *r0 = Wp + I[j] * rs, *r1 = Wp + I[j + 1] * rs, *r2 = Wp + I[j + 2] * rs, *r3 = Wp + I[j + 3] * rs;
      for (int64_t b = 0; b < B; ++b) {
        const float* ab = A + b * m + j;
        const float a0 = ab[0], a1 = ab[1], a2 = ab[2], a3 = ab[3];
        float* ob = out + b * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) ob[c] += a0 * r0[c] + a1 * r1[c] + a2 * r2[c] + a3 * r3[c];
      }
    }
    for (; j < end; ++j) {
      const float* row = Wp + I[j] * rs;
      for (int64_t b = 0; b < B; ++b) {
        const float s = A[b * m + j];
        float* ob = out + b * d;
#pragma omp simd
        for (int64_t c = 0; c < d; ++c) ob[c] += s * row[c];
      }
    }
  });
  auto result = torch::zeros({B, d}, a.options());
  float* R = result.data_ptr<float>();
  for (int th = 0; th < nt; ++th) {
    const float* p = partial.data() + (size_t)th * B * d;
    for (int64_t j = 0; j < B * d; ++j) R[j] += p[j];
  }
  return result;
}

// Input-side sparsity in one call: x [B, K], W [K, N] input-major (channel k's row), threshold [1],
// scale [K] or empty, bias [N] or empty -> [B, N] = sum over the channels k where some row has
// |x[b, k]| * scale[k] > threshold of x[b, k] W[k] (+ bias). The selection runs here, not as a
// chain of small torch ops around the gather (they cost about as much as the rows they skip).
torch::Tensor input_gather(torch::Tensor x, torch::Tensor W, torch::Tensor threshold, torch::Tensor scale,
                           torch::Tensor bias) {
  TORCH_CHECK(x.is_contiguous() && W.stride(1) == 1, "x contiguous, W rows contiguous");
  const int64_t B = x.size(0), K = x.size(1);
  const float t = threshold.item<float>();
  const float* X = x.data_ptr<float>();
  const float* S = scale.numel() ? scale.data_ptr<float>() : nullptr;
  std::vector<int64_t> kept;
  kept.reserve(K);
  for (int64_t k = 0; k < K; ++k) {
    const float sk = S ? S[k] : 1.f;
    for (int64_t b = 0; b < B; ++b)
      if ((S ? std::fabs(X[b * K + k]) * sk : std::fabs(X[b * K + k])) > t) { kept.push_back(k); break; }
  }
  const int64_t m = (int64_t)kept.size();
  auto a = torch::empty({B, m}, x.options());
  float* A = a.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t j = 0; j < m; ++j) A[b * m + j] = X[b * K + kept[j]];
  auto out = gather_axpy(a, W, torch::from_blob(kept.data(), {m}, torch::kInt64));
  if (bias.numel()) out.add_(bias);
  return out;
}
"""


@functools.cache
def _extension():
    from torch.utils.cpp_extension import load_inline
    print("dejavu: loading the fused CPU kernels (compiled the first time, about a minute; then cached)...",
          file=sys.stderr, flush=True)
    return load_inline(name="dejavu_cpu_kernels", cpp_sources=[SOURCE],
                       functions=["gather_matvec", "gather_axpy", "gate_first_mlp", "input_gather"],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)


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


GATE_ACTS = {"silu": 0, "gelu_tanh": 1}


def gate_first_mlp(mlp, x: torch.Tensor, down_norm: torch.Tensor, n_cand: int, k: int):
    """One token's gate-first MLP in one kernel call: (output [d], kept neuron ids [k])."""
    b_in = mlp.b_in if mlp.b_in is not None else torch.empty(0)
    out, kept = _extension().gate_first_mlp(x.reshape(-1).contiguous(), mlp.w_in, b_in, mlp.w_out_t,
                                            down_norm.contiguous(), n_cand, k, GATE_ACTS[mlp.cfg.act])
    return out, kept


def gather_matvec(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [..., d], w [N, d] (rows may be strided), idx [m] -> [..., m]: only the rows idx are read."""
    if usable(x):
        out = _extension().gather_matvec(x.reshape(-1, x.shape[-1]).contiguous(), w, idx.to(torch.int64).contiguous())
        return out.view(*x.shape[:-1], len(idx))
    return x @ w[idx].T


def gather_axpy(a: torch.Tensor, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """a [..., m], w [N, d], idx [m] -> [..., d] = a @ w[idx], reading only the rows idx."""
    if usable(a):
        out = _extension().gather_axpy(a.reshape(-1, a.shape[-1]).contiguous(), w, idx.to(torch.int64).contiguous())
        return out.view(*a.shape[:-1], w.shape[-1])
    return a @ w[idx]


def input_gather(x: torch.Tensor, w_t: torch.Tensor, threshold: torch.Tensor, scale: torch.Tensor | None,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x [B, K], w_t [K, N] input-major -> [B, N]: input-side sparsity (the channels that pass for
    some row: |x| * scale > threshold) with its selection in the same C++ call (usable(x) only)."""
    empty = torch.empty(0)
    return _extension().input_gather(x.contiguous(), w_t, threshold.reshape(1),
                                     scale if scale is not None else empty, bias if bias is not None else empty)


def usable(x: torch.Tensor) -> bool:
    return ENABLED and x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled() \
        and available()
