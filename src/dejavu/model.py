"""One decoder for the supported families, with a static KV cache.

Families are config switches, not classes:
  llama  (Llama 2/3, SmolLM2, Mistral, Qwen2): RMSNorm, RoPE, grouped-query attention, SwiGLU
  gemma  (Gemma 1): as llama, GeGLU (tanh GELU), embeddings scaled by sqrt(d)
  opt    (the paper's family): LayerNorm, learned positions, multi-head attention, ReLU, biases

Weight layouts are chosen for sparse execution (one copy of every weight):
  attention  wqkv     [(heads + 2 kv_heads)*head_dim, d]  Q, K, V rows in one weight (one
                       read for dense, one kernel for a sparse step); a head's rows are
                       contiguous in each part (wq, wk, wv: views)
             wo_t     [heads*head_dim, d]  (W_o transposed: a head's slice is contiguous rows)
  MLP        w_in     [d_ff, n_in, d]      (n_in = 2 for gated: gate and up rows of a neuron
                                            interleaved, so one neuron is one contiguous row)
             w_out_t  [d_ff, d]            (W_down transposed: a neuron's column is a row)
That is output-major for wqkv and w_in (a neuron's or head's rows are contiguous: what neuron and
head selection read). Input-side sparsity reads input channels instead, which are contiguous when
every weight is input-major: Transformer.to_input_major() re-stores wqkv and w_in transposed, in
place (same logical shapes; wo_t and w_out_t already are), and every dense path reads them as they are.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels


@dataclass(frozen=True)
class ModelConfig:
    family: str              # 'llama' | 'gemma' | 'opt'
    vocab_size: int
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int
    norm: str = "rms"        # 'rms' | 'layer'
    norm_eps: float = 1e-5
    act: str = "silu"        # 'silu' | 'gelu_tanh' | 'relu'
    gated: bool = True       # act(gate) * up, else act(fc1)
    positions: str = "rope"  # 'rope' | 'learned'
    rope_inv_freq: tuple[float, ...] = ()
    rope_scale: float = 1.0  # attention scaling some RoPE variants apply to cos/sin
    embed_scale: float = 1.0
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    qk_norm: bool = False    # RMS norm over each head's query and key before RoPE (Qwen3)
    windows: tuple[int, ...] = ()  # per layer: a query sees only the last W keys (0: all); () none
    post_norms: bool = False  # Gemma 2/3: a norm on the attention output and on the MLP output too
    attn_scale: float = 0.0   # the attention logits' scale (0: head_dim ** -0.5)
    rope_local_inv_freq: tuple[float, ...] = ()  # RoPE of the windowed layers where it differs (Gemma 3)
    attn_softcap: float = 0.0   # Gemma 2: attention logits -> cap * tanh(logits / cap) (0: none)
    logit_softcap: float = 0.0  # Gemma 2: the same on the output logits

    @property
    def n_in(self) -> int:
        return 2 if self.gated else 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["rope_inv_freq"] = tuple(d.get("rope_inv_freq", ()))
        d["windows"] = tuple(d.get("windows", ()))
        d["rope_local_inv_freq"] = tuple(d.get("rope_local_inv_freq", ()))
        return cls(**d)


class Norm(nn.Module):
    def __init__(self, cfg: ModelConfig, size: int | None = None):
        super().__init__()
        self.eps = cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(size or cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(size or cfg.d_model)) if cfg.norm == "layer" else None

    def forward(self, x):
        if (fused := self._triton(x)) is not None:
            return fused.norm(x, self.weight, self.bias, self.eps, rms=self.bias is None)
        return self.reference(x)

    def add(self, x, residual=None):
        """(x + residual, norm(x + residual)): the residual add and this norm in one GPU kernel."""
        if residual is None:
            return x, self(x)
        if (fused := self._triton(x)) is not None:
            return fused.norm(x, self.weight, self.bias, self.eps, self.bias is None, residual)
        x = x + residual
        return x, self.reference(x)

    @staticmethod
    def _triton(x):
        """The Triton norm module where it applies (CUDA, inference), else None."""
        return kernels.norm_kernels() if x.is_cuda and not torch.is_grad_enabled() else None

    def reference(self, x):
        if self.bias is not None:
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        xf = x.float()  # RMS statistics in fp32, as the reference implementations do
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def input_rule(sparsity, layer: int, group: str):
    """The input-side rule decode applies inside the projection (kernels.linear), or None."""
    return None if sparsity is None else sparsity.input_rule(layer, group)


def _maybe_bias(flag: bool, n: int):
    return nn.Parameter(torch.zeros(n)) if flag else None


class KVCache:
    """Static K/V buffers for every layer: [layers, batch, kv_heads, max_seq_len, head_dim].

    `key_valid[b, s]` is False for left-padding slots of shorter prompts in a batch.
    """
    lazy = False  # LazyKVCache: the cache computes K/V itself

    def __init__(self, cfg: ModelConfig, batch: int, max_seq_len: int, device, dtype):
        shape = (2, cfg.n_layers, batch, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        self.kv = torch.zeros(shape, device=device, dtype=dtype)  # one tensor: a kernel can write K and V
        self.key_valid = torch.ones(batch, max_seq_len, device=device, dtype=torch.bool)
        self.pad = torch.zeros(batch, device=device, dtype=torch.long)
        self.max_seq_len = max_seq_len

    k = property(lambda self: self.kv[0])  # views, derived: whoever replaces kv keeps k and v right
    v = property(lambda self: self.kv[1])

    def update(self, layer: int, pos, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the tokens' K and V [B, kv_heads, T, head_dim] at their slots -> the layer's keys and
        values to attend over. pos: the first slot (an int), then the slots so far are returned; or
        the slots as a device tensor [1 or B, T] (static shapes: one timeline, or a slot per row),
        then the whole cache (the mask hides the rest)."""
        if isinstance(pos, torch.Tensor):
            if pos.shape[0] == 1:
                self.k[layer].index_copy_(2, pos[0], k)
                self.v[layer].index_copy_(2, pos[0], v)
            else:
                at = pos[:, None, :, None].expand_as(k)
                self.k[layer].scatter_(2, at, k)
                self.v[layer].scatter_(2, at, v)
        else:
            self.k[layer, :, :, pos:pos + k.shape[2]] = k
            self.v[layer, :, :, pos:pos + k.shape[2]] = v
        return self.keys(layer, pos, k.shape[2])

    def keys(self, layer: int, pos, T: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's keys and values to attend over once T tokens sit at pos (see update)."""
        if isinstance(pos, torch.Tensor):
            return self.k[layer], self.v[layer]
        return self.k[layer, :, :, :pos + T], self.v[layer, :, :, :pos + T]

    def rows(self, rows: slice) -> "KVCache":
        """Some rows of this cache, sharing its memory: a request's row (its prefill writes there),
        or the first n rows (a serving bucket's step)."""
        view = object.__new__(KVCache)
        view.kv, view.key_valid, view.pad = self.kv[:, :, rows], self.key_valid[rows], self.pad[rows]
        view.max_seq_len = self.max_seq_len
        return view

    def set_padding(self, pad: torch.Tensor):
        self.pad = pad.to(self.key_valid.device)
        self.key_valid.fill_(True)
        slots = torch.arange(self.max_seq_len, device=self.key_valid.device)
        self.key_valid &= slots[None, :] >= self.pad[:, None]


class LazyKVCache(KVCache):
    """Lazy K/V fill, for head-sparse decode with device positions (multi-head models without
    RoPE, batch 1): the cache keeps every token's normalized attention input, and a step computes
    K/V only for the selected heads, over the last W positions, plus r heads in turn whatever the
    selection, so that every head is refreshed at least every W - 1 steps. A selected head's K/V
    missing since its last fill then always lie inside the window: the cache is right for every
    head that attention reads. Weights read: m heads' Q rows and (m + r) heads' K/V rows, not all H,
    in one kernel that also writes K/V into the cache."""
    lazy = True

    def __init__(self, cfg: ModelConfig, batch: int, max_seq_len: int, device, dtype, window: int):
        super().__init__(cfg, batch, max_seq_len, device, dtype)
        self.window, self.n_heads = window, cfg.n_heads
        self.x = torch.zeros(cfg.n_layers, batch, max_seq_len, cfg.d_model, device=device, dtype=dtype)
        self._plan = None

    def plan(self, pos: torch.Tensor):
        """For the fill at slot pos (a device tensor): the r heads refreshed in turn and the window's
        last W slots. The same for every layer of a step: computed once per pos tensor."""
        if self._plan is None or self._plan[0] is not pos:
            W = self.window
            r = -(-self.n_heads // (W - 1))
            at = pos.reshape(())
            turn = (at * r + torch.arange(r, device=pos.device)) % self.n_heads
            window = (at - W + 1 + torch.arange(W, device=pos.device)).clamp(min=0)  # repeats slot 0 early on
            self._plan = (pos, turn, window)
        return self._plan[1:]

    def qkv(self, attn: "Attention", layer: int, pos, x: torch.Tensor, heads: torch.Tensor | None):
        """Keep x, then Q of the query heads and the layer's keys and values to attend over: lazily
        for one token at a device position with a head selection, else as any cache (no RoPE here)."""
        slots = pos[0] if isinstance(pos, torch.Tensor) else pos + torch.arange(x.shape[1], device=x.device)
        self.x[layer].index_copy_(1, slots, x)
        if heads is None or x.shape[1] != 1 or not isinstance(pos, torch.Tensor):
            q, k, v = attn.qkv(x, heads)
            return (q, *self.update(layer, pos, k, v))
        turn, window = self.plan(pos)
        q = kernels.gather_qkv_lazily(self.x[layer, 0], attn.wqkv, attn.bqkv, heads, turn, window, self.kv[:, layer, 0])
        return q.view(1, 1, -1, attn.cfg.head_dim).transpose(1, 2), self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.wqkv = nn.Parameter(torch.empty(q_dim + 2 * kv_dim, cfg.d_model))
        self.wo_t = nn.Parameter(torch.empty(q_dim, cfg.d_model))
        self.bqkv = _maybe_bias(cfg.qkv_bias, q_dim + 2 * kv_dim)
        self.bo = _maybe_bias(cfg.o_bias, cfg.d_model)
        self.q_norm = Norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = Norm(cfg, cfg.head_dim) if cfg.qk_norm else None

    def _part(self, t, i):
        return None if t is None else t.split(self.parts)[i]

    @property
    def parts(self) -> tuple[int, int, int]:
        """Rows of Q, K and V in wqkv."""
        q_dim, kv_dim = self.cfg.n_heads * self.cfg.head_dim, self.cfg.n_kv_heads * self.cfg.head_dim
        return q_dim, kv_dim, kv_dim

    wq = property(lambda self: self._part(self.wqkv, 0))  # views: [heads*head_dim, d]
    wk = property(lambda self: self._part(self.wqkv, 1))
    wv = property(lambda self: self._part(self.wqkv, 2))
    bq = property(lambda self: self._part(self.bqkv, 0))
    bk = property(lambda self: self._part(self.bqkv, 1))
    bv = property(lambda self: self._part(self.bqkv, 2))

    def forward(self, x, rope, mask: kernels.AttentionMask, cache: KVCache | None, layer: int, pos, sparsity=None):
        """pos: the tokens' first cache slot (an int), or their slots as a device tensor (static shapes)."""
        if sparsity is not None:
            x = sparsity.inputs(layer, "qkv", x)  # input-side sparsity, masked: the channels W_q, W_k, W_v see
        heads = sparsity.head_index(layer, x) if sparsity is not None else None  # the query heads to run (None: all)
        rule, y = input_rule(sparsity, layer, "qkv"), None
        scale, softcap = self.cfg.attn_scale or None, self.cfg.attn_softcap
        if cache is not None and cache.lazy:  # the cache computes what it lacks from its kept inputs
            q, k, v = cache.qkv(self, layer, pos, x, heads)
        elif heads is None and cache is not None and x.shape[1] == 1:  # a decode token: RoPE and cache write fused
            B, H = x.shape[0], self.cfg.n_heads
            qkv = kernels.linear(x, self.wqkv, self.bqkv, rule).flatten(1)
            if self.q_norm is not None:
                q, k, v = qkv.split(self.parts, -1)
                qkv = torch.cat((self.head_norm(self.q_norm, q), self.head_norm(self.k_norm, k), v), -1)
            y = kernels.new_token_attention(qkv, rope, pos, cache.kv[:, layer], H, mask, scale, softcap)
            if y is None:  # not fused into the attention here
                q = kernels.rope_cache(qkv, rope, pos, cache.kv[:, layer], H)
                q, (k, v) = q.view(B, 1, H, -1).transpose(1, 2), cache.keys(layer, pos)
        else:
            q, k, v = self.qkv(x, heads, rule)
            if rope is not None:
                q, k = apply_rope(q, rope), apply_rope(k, rope)
            if cache is not None:
                k, v = cache.update(layer, pos, k, v)
        if y is None:
            y = kernels.attention(q, k, v, mask, heads, self.cfg.n_heads, scale, softcap)  # [B, T, m, hd]
        if sparsity is not None:
            y = sparsity.inputs(layer, "o", sparsity.heads(layer, x, y).flatten(2))
        return self.project_out(y.flatten(2), heads, input_rule(sparsity, layer, "o"))

    def qkv(self, x, heads=None, rule=None):
        """Q, K, V, each [B, heads, T, head_dim]. With `heads`, Q of those query heads only (their
        rows of wqkv, gathered); K and V always of every head, so the cache stays complete whatever
        later tokens select."""
        B, T, _ = x.shape
        if heads is None:  # Q, K, V in one matmul
            q, k, v = kernels.linear(x, self.wqkv, self.bqkv, rule).split(self.parts, -1)
        else:
            q_dim = self.parts[0]
            q = kernels.gather_matvec(x, self.wqkv, heads, self.bqkv, unit=self.cfg.head_dim)
            k, v = F.linear(x, self.wqkv[q_dim:], None if self.bqkv is None else self.bqkv[q_dim:]).chunk(2, -1)
        if self.q_norm is not None:  # per head: a head's norm needs only its own rows (head sparsity holds)
            q, k = self.head_norm(self.q_norm, q), self.head_norm(self.k_norm, k)
        return [t.reshape(B, T, -1, self.cfg.head_dim).transpose(1, 2) for t in (q, k, v)]

    def head_norm(self, norm: Norm, t: torch.Tensor) -> torch.Tensor:
        """t [..., heads * head_dim] -> each head's slice normed over head_dim."""
        return norm(t.unflatten(-1, (-1, self.cfg.head_dim))).flatten(-2)

    def project_out(self, y, idx=None, rule=None):
        """Through W_o: all heads, or the heads idx only (each a head_dim-row slice of wo_t)."""
        if idx is not None:
            return kernels.gather_axpy(y, self.wo_t, idx, self.bo, unit=self.cfg.head_dim)
        return kernels.linear(y, self.wo_t.t(), self.bo, rule)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.act = kernels.ACTIVATIONS[cfg.act]
        self.w_in = nn.Parameter(torch.empty(cfg.d_ff, cfg.n_in, cfg.d_model))
        self.b_in = nn.Parameter(torch.zeros(cfg.d_ff, cfg.n_in)) if cfg.mlp_bias else None
        self.w_out_t = nn.Parameter(torch.empty(cfg.d_ff, cfg.d_model))
        self.b_out = _maybe_bias(cfg.mlp_bias, cfg.d_model)

    def up(self, x, idx=None, rule=None):
        """The up side h [..., units * n_in] (a neuron's gate and up adjacent) of every neuron, or of
        the neurons idx only (their rows of w_in are contiguous)."""
        w = self.w_in if idx is None else self.w_in[idx]
        b = self.b_in if idx is None or self.b_in is None else self.b_in[idx]
        return kernels.linear(x, w.flatten(0, 1), b.flatten() if b is not None else None, rule)

    def activations(self, x, idx=None, rule=None):
        """Per-neuron activation a: act(gate) * up, or act(fc1). Shape [..., d_ff], or
        [..., len(idx)] for the neurons idx only."""
        return kernels.mlp_activation(self.up(x, idx, rule).unflatten(-1, (-1, self.cfg.n_in)), self.cfg.act)

    def project_out(self, a, rule=None):
        return kernels.linear(a, self.w_out_t.t(), self.b_out, rule)

    def forward(self, x, layer: int = 0, sparsity=None):
        if sparsity is not None:
            out = sparsity.mlp_output(layer, self, x)  # gathered mode computes only the selected neurons
            if out is not None:
                return out
            x = sparsity.inputs(layer, "gate_up", x)
        up_rule, down_rule = input_rule(sparsity, layer, "gate_up"), input_rule(sparsity, layer, "down")
        if sparsity is None or down_rule is not None:  # nobody looks at the activations: fused into the down side
            return kernels.mlp_down(self.up(x, rule=up_rule), self.w_out_t, self.b_out, self.cfg.act, self.cfg.gated,
                                    down_rule)
        a = self.activations(x, rule=up_rule)
        if sparsity is not None:
            a = sparsity.inputs(layer, "down", sparsity.neurons(layer, x, a))
        return self.project_out(a, down_rule)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg)
        self.post_attn_norm = Norm(cfg) if cfg.post_norms else None
        self.post_mlp_norm = Norm(cfg) if cfg.post_norms else None

    def forward(self, x, rope, mask, cache, pos, sparsity=None, mlp_out=None):
        """x + mlp_out (the previous block's MLP output) is the residual entering this block: each
        residual add is done with the norm after it, in one kernel. -> (residual after attention,
        this block's MLP output)."""
        x, h = self.attn_norm.add(x, mlp_out)
        if sparsity is not None:
            sparsity.enter(self.layer, x)
        y = self.attn(h, rope, mask, cache, self.layer, pos, sparsity)
        x, h = self.mlp_norm.add(x, y if self.post_attn_norm is None else self.post_attn_norm(y))
        y = self.mlp(h, self.layer, sparsity)
        return x, y if self.post_mlp_norm is None else self.post_mlp_norm(y)


def apply_rope(x, rope):
    cos, sin = rope  # [B, 1, T, head_dim], non-interleaved halves (the HF convention)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.positions == "learned" else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = Norm(cfg)
        self.lm_head = None if cfg.tie_embeddings else nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))
        self.register_buffer("rope_inv_freq", torch.tensor(cfg.rope_inv_freq, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("rope_local_inv_freq", torch.tensor(cfg.rope_local_inv_freq, dtype=torch.float32),
                             persistent=False)

    def set_rope(self, device=None):
        """The RoPE tables from the config (after building on the meta device)."""
        self.rope_inv_freq = torch.tensor(self.cfg.rope_inv_freq, dtype=torch.float32, device=device)
        self.rope_local_inv_freq = torch.tensor(self.cfg.rope_local_inv_freq, dtype=torch.float32, device=device)

    @property
    def device(self):
        return self.tok_emb.weight.device

    @property
    def dtype(self):
        return self.tok_emb.weight.dtype

    def new_cache(self, batch: int, max_seq_len: int | None = None, lazy_window: int = 0) -> KVCache:
        """lazy_window W > 1: lazy K/V fill for head-sparse decode with device positions
        (LazyKVCache); multi-head models without RoPE (OPT), batch 1."""
        n = max_seq_len or self.cfg.max_seq_len
        if n > self.cfg.max_seq_len:
            raise ValueError(f"cache of {n} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        if not lazy_window:
            return KVCache(self.cfg, batch, n, self.device, self.dtype)
        if not (lazy_window > 1 and batch == 1 and self.cfg.n_kv_heads == self.cfg.n_heads
                and self.cfg.positions != "rope"):
            raise ValueError("lazy K/V fill needs a window > 1, batch 1 and a multi-head model without RoPE (OPT)")
        return LazyKVCache(self.cfg, batch, n, self.device, self.dtype, lazy_window)

    def to_input_major(self):
        """Re-store wqkv and w_in transposed (input channel k contiguous), in place and one at a time
        (one weight's copy at most in flight): what input-side sparsity's decode reads. The logical
        shapes stay; dense paths read the transposed storage as it is."""
        return self._store(input_major=True)

    def to_output_major(self):
        """Back to the layout neuron and head selection read (a neuron's or head's rows contiguous)."""
        return self._store(input_major=False)

    @torch.no_grad()
    def _store(self, input_major: bool):
        for b in self.layers:
            for p in (b.attn.wqkv, b.mlp.w_in):
                w = p.data.flatten(0, -2) if p.dim() == 3 else p.data  # [N, K], as stored
                p.data = (w.t().contiguous().t() if input_major else w.contiguous()).view(p.shape)
        return self

    def slots(self, T: int, start_pos) -> torch.Tensor:
        """The tokens' cache slots [1 or B, T]: from one first slot (an int or a 0-dim device tensor),
        or from each row's own (a [B] device tensor: rows on their own timelines, as serving runs them)."""
        start = start_pos.reshape(-1, 1) if isinstance(start_pos, torch.Tensor) else start_pos
        return (start + torch.arange(T, device=self.device)).reshape(-1, T)

    def positions(self, B: int, T: int, start_pos, cache: KVCache | None):
        pos = self.slots(T, start_pos).expand(B, T)
        if cache is not None:
            pos = (pos - cache.pad[:, None]).clamp(min=0)
        return pos

    def attention_mask(self, T: int, start_pos, cache: KVCache | None, window: int = 0) -> kernels.AttentionMask:
        """Causal, minus padding slots (a slot always sees itself, so padding rows stay finite), and
        with a window W only the last W keys: boolean [B, 1, T, keys]; with a device start_pos
        (static shapes), over the whole cache and with what the decode kernel reads (the window
        folded into the valid keys: one token's keys are the same for every query)."""
        if cache is None:
            slot = torch.arange(T, device=self.device)
            seen = slot[None, :] <= slot[:, None]
            if window:
                seen &= slot[:, None] - slot[None, :] < window
            return kernels.AttentionMask(seen[None, None])
        static = isinstance(start_pos, torch.Tensor)  # keys: the whole cache (static shapes)
        end = cache.max_seq_len if static else start_pos + T
        slot_q = self.slots(T, start_pos)[:, :, None]  # [1 or B, T, 1]
        slot_k = torch.arange(end, device=self.device)
        causal = slot_k <= slot_q
        if window:
            causal &= slot_q - slot_k < window
        mask = causal & (cache.key_valid[:, None, :end] | (slot_k == slot_q))
        if not static:
            return kernels.AttentionMask(mask[:, None])
        last = slot_q[:, -1]  # each row's last query slot [1 or B, 1]
        valid = cache.key_valid if not window else cache.key_valid & (slot_k > last - window)
        return kernels.AttentionMask(mask[:, None], (last + 1).reshape(start_pos.shape), valid)

    def window(self, layer: int) -> int:
        return self.cfg.windows[layer] if self.cfg.windows else 0

    def rope(self, pos, window: int = 0):
        """(cos, sin) at positions pos; a windowed layer's own RoPE where the model has one."""
        if self.cfg.positions != "rope":
            return None
        inv_freq = self.rope_local_inv_freq if window and self.cfg.rope_local_inv_freq else self.rope_inv_freq
        freqs = pos[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        scale = self.cfg.rope_scale
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)

    def embed(self, tokens, pos):
        x = self.tok_emb(tokens)
        if self.cfg.embed_scale != 1.0:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        if self.pos_emb is not None:
            x = x + self.pos_emb(pos)
        return x

    def logits(self, x, mlp_out=None):
        w = self.tok_emb.weight if self.lm_head is None else self.lm_head
        logits = F.linear(self.norm.add(x, mlp_out)[1], w)
        cap = self.cfg.logit_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start_pos: int = 0, sparsity=None):
        """tokens [B, T] -> logits [B, T, vocab]. With a cache, the tokens sit at slots
        start_pos..start_pos+T-1 and earlier slots are read from the cache. `sparsity`
        (sparse.py) masks or records units on the way. start_pos may be a device tensor, 0-dim
        (one timeline) or [B] (each row its own slot, as serving decodes): then every shape is
        fixed and nothing syncs with the host, so the step can be captured in a CUDA graph
        (engine.py); the caller keeps it inside the cache."""
        B, T = tokens.shape
        if isinstance(start_pos, torch.Tensor):
            if cache is None:
                raise ValueError("a device-tensor start_pos needs a cache")
        elif cache is not None and start_pos + T > cache.max_seq_len:
            raise ValueError(f"sequence of {start_pos + T} tokens exceeds the cache of {cache.max_seq_len}")
        if cache is None and T > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds the model's context of {self.cfg.max_seq_len}")
        positions = self.positions(B, T, start_pos, cache)
        x = self.embed(tokens, positions)
        windows = set(self.cfg.windows) or {0}  # the masks the layers use, each built once
        masks = {w: self.attention_mask(T, start_pos, cache, w) for w in windows}
        ropes = {w: self.rope(positions, w) for w in windows} if self.cfg.rope_local_inv_freq else \
            dict.fromkeys(windows, self.rope(positions))
        # the tokens' cache slots, for the blocks: the first (an int), or all [1 or B, T] as a device tensor
        pos = self.slots(T, start_pos) if isinstance(start_pos, torch.Tensor) else start_pos
        mlp_out = None
        for i, block in enumerate(self.layers):
            w = self.window(i)
            x, mlp_out = block(x, ropes[w], masks[w], cache, pos, sparsity, mlp_out)
        return self.logits(x, mlp_out)


def param_bytes(model: Transformer) -> dict[str, int]:
    """Bytes of weights per part, as `dejavu info` reports them."""
    def nbytes(params):
        return sum(p.numel() * p.element_size() for p in params)
    parts = {
        "embeddings": nbytes([model.tok_emb.weight] + ([model.pos_emb.weight] if model.pos_emb is not None else [])),
        "attention": nbytes(p for b in model.layers for p in b.attn.parameters()),
        "mlp": nbytes(p for b in model.layers for p in b.mlp.parameters()),
        "norms": nbytes(list(model.norm.parameters()) + [
            p for b in model.layers for n in (b.attn_norm, b.mlp_norm, b.post_attn_norm, b.post_mlp_norm)
            if n is not None for p in n.parameters()]),
        "lm_head": nbytes([model.lm_head]) if model.lm_head is not None else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def init_synthetic_(model: Transformer, seed: int = 0):
    """Random weights of the right shapes and a sane scale (for speed work on real shapes)."""
    g = torch.Generator(device=model.device).manual_seed(seed)
    std = 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif p.dim() == 1 or name.split(".")[-1].startswith("b"):
                p.zero_()
            else:
                p.normal_(0.0, std / (math.sqrt(2 * model.cfg.n_layers) if name.endswith("_t") else 1.0),
                          generator=g)
    return model
