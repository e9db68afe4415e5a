"""What the kernels compute, in plain torch: the helpers every path shares (which weight rows a
unit owns, the lazy fill's unit order and epilogue) and fp32 references the Triton kernels are
tested against. Imports nothing of dejavu, so every kernel module can import it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"), "relu": F.relu}


def mlp_activation(h: torch.Tensor, act: str) -> torch.Tensor:
    """h [..., units, n_in], a unit's gate and up side by side (n_in 2) or its fc1 (n_in 1) -> the
    activations [..., units]: act(gate) * up, or act(fc1)."""
    a = ACTIVATIONS[act](h[..., 0])
    return a * h[..., 1] if h.shape[-1] == 2 else a


def unit_rows(idx: torch.Tensor, unit: int) -> torch.Tensor:
    """The weight rows of units idx, each `unit` rows long (a head: head_dim rows)."""
    return (idx[:, None] * unit + torch.arange(unit, device=idx.device)).flatten() if unit > 1 else idx


def lazy_units(idx: torch.Tensor, turn: torch.Tensor, n_q_heads: int, kv_heads: int) -> torch.Tensor:
    """The head units of wqkv that the lazy fill computes: Q of heads idx, then K (n_q_heads + h)
    and V (n_q_heads + kv_heads + h) of heads idx ++ turn."""
    heads = torch.cat((idx, turn))
    return torch.cat((idx, n_q_heads + heads, n_q_heads + kv_heads + heads))


def lazy_fill(out: torch.Tensor, idx: torch.Tensor, turn: torch.Tensor, window: torch.Tensor,
              kv: torch.Tensor) -> torch.Tensor:
    """The torch paths' epilogue of the lazy fill: out [W, units * hd] in lazy_units order. Writes
    the K/V rows into kv at the window's slots (cast to kv's dtype); -> Q of the last slot."""
    n_q, heads, hd = len(idx), torch.cat((idx, turn)), kv.shape[-1]
    vals = out[:, n_q * hd:].view(len(window), 2, len(heads), hd).to(kv.dtype)
    kv[:, heads[None, :], window[:, None]] = vals.permute(1, 0, 2, 3)
    return out[-1:, :n_q * hd]


def gather_matvec_reference(x, w, idx, bias=None, unit=1):
    rows = unit_rows(idx, unit)
    out = x.float() @ w[rows].float().T
    return out + bias[rows].float() if bias is not None else out


def gather_act_reference(x, w_in, b_in, idx, act):
    h = torch.einsum("...d,mid->...mi", x.float(), w_in[idx].float())
    h = h + b_in[idx].float() if b_in is not None else h
    a = ACTIVATIONS[act](h[..., 0])
    return a * h[..., 1] if w_in.shape[1] == 2 else a


def gather_axpy_reference(a, w, idx, bias=None, unit=1):
    out = a.float() @ w[unit_rows(idx, unit)].float()
    return out + bias.float() if bias is not None else out


def gather_qkv_lazily_reference(x, w, bias, idx, turn, n_q_heads, window, kv):
    """The lazy fill's one pass (fp32 output; writes kv in its dtype)."""
    units = lazy_units(idx, turn, n_q_heads, kv.shape[1])
    return lazy_fill(gather_matvec_reference(x[window], w, units, bias, unit=kv.shape[-1]), idx, turn, window, kv)


def decode_attention_reference(q, k_cache, v_cache, head_idx, n_heads, length, key_valid, scale):
    L = int(length)
    group = head_idx // (n_heads // k_cache.shape[1])
    k, v = k_cache[:, group, :L].float(), v_cache[:, group, :L].float()  # [B, m, L, hd]
    s = torch.einsum("bhd,bhsd->bhs", q.float(), k) * scale
    valid = key_valid[:, :L] | (torch.arange(L, device=q.device) == L - 1)
    s = s.masked_fill(~valid[:, None], float("-inf"))
    return torch.einsum("bhs,bhsd->bhd", s.softmax(-1), v)


def rope_cache_reference(qkv: torch.Tensor, rope, pos, kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """triton_attention.rope_cache in torch (the CPU's path, in the model's dtype as the prefill's
    RoPE): qkv [B, (n_heads + 2 kv_heads) * hd] -> q [B, n_heads * hd]; K, V into kv[:, b, :, pos[b]]."""
    B, kv_heads, hd = qkv.shape[0], kv.shape[2], kv.shape[-1]
    q, k, v = qkv.view(B, n_heads + 2 * kv_heads, hd).split([n_heads, kv_heads, kv_heads], 1)
    if rope is not None:
        cos, sin = (t.reshape(B, 1, hd) for t in rope)
        q, k = ((t * cos + torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1) * sin) for t in (q, k))
    slot = pos.reshape(-1) if isinstance(pos, torch.Tensor) else torch.tensor([pos], device=kv.device)
    kv[:, torch.arange(B, device=kv.device), :, slot.expand(B)] = torch.stack((k, v), 1).to(kv.dtype)  # a slot per row
    return q.reshape(B, n_heads * hd)
