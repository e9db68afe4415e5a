"""Units, importance, and sparse execution: masked (evaluation), gathered (decode), recorded.

Units:
  neuron i of layer l: row i of w_in (gate and up, or fc1) and row i of w_out_t (W_down column i).
    importance for a token: |a_i| * ||W_down[:, i]||   (a = act(gate) * up, or act(fc1))
  head h of layer l: its Q rows and its slice of W_o (rows of wo_t).
    importance: || o_h @ W_o[:, h] ||, the norm of the head's contribution to the block output.
    In grouped-query models a skipped query head saves its Q rows, its attention over the cache
    and its W_o slice; K/V are shared by the head's group and always computed, so the cache
    stays complete.

Input-side sparsity (TEAL / WINA) selects input channels instead of units: for each projection
group of a layer a token's input channel counts where its score passes the group's threshold, and
the rest are zeroed, which is what reading only those columns of the weights (rows of W^T)
computes. Thresholds are calibrated per layer and group to a density on calibration text, as TEAL
does: a fixed rule, so the decode step keeps static shapes and needs no top-k (on the GPU the
projection packs the passing channels and reads their rows: kernels.linear). Groups and inputs:
  qkv      W_q, W_k, W_v together   the attention norm's output h             [d_model]
  o        W_o                      the attention output y, heads flattened   [heads*head_dim]
  gate_up  W_gate, W_up together    the MLP norm's output                     [d_model]
  down     W_down                   the activation a = act(gate) * up         [d_ff]
For `down` a channel is a neuron: wina's score |a_i| * ||W_down[:, i]|| is its exact importance.

A `Sparsity` object rides along a forward pass (Transformer.forward(..., sparsity=...)). The
model calls it at these places per layer:
  enter(layer, x)               the residual stream entering the layer (what lookahead reads)
  inputs(layer, group, x)       a projection group's input -> its input with channels zeroed (masked)
  input_rule(layer, group)      the rule the projection itself applies (gathered), or None
  head_index(layer, x_in)       the query heads to compute (gathered mode; None: all)
  heads(layer, x_in, y)         y [B, T, H, head_dim] per-head attention output -> masked y
  mlp_output(layer, mlp, x_in)  the MLP output from the selected neurons (gathered mode; None: dense)
  neurons(layer, x_in, a)       a [B, T, d_ff] neuron activations -> masked a
`Masked` zeroes the unselected units (evaluation over many tokens, each with its own set);
`Gathered` computes only the selected units (decode); `Recorder` leaves the computation dense
and records inputs and importances. Which units are selected is the selectors' business
(selectors.py): Selection asks them for scores and keeps the top k.
"""
from __future__ import annotations

import copy

import torch

from . import kernels
from .errors import DejavuError
from .model import Transformer


def neuron_norms(model: Transformer) -> list[torch.Tensor]:
    return [b.mlp.w_out_t.float().norm(dim=1) for b in model.layers]


def neuron_importance(a: torch.Tensor, down_norm: torch.Tensor) -> torch.Tensor:
    return a.float().abs() * down_norm


def head_contributions(wo_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y [B, T, H, hd] -> each head's output through W_o: [B, T, H, d]."""
    H = y.shape[-2]
    return torch.einsum("bthk,hkd->bthd", y.float(), wo_t.float().view(H, -1, wo_t.shape[-1]))


def head_importance(wo_t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return head_contributions(wo_t, y).norm(dim=-1)


def units_for(density: float, n: int) -> int:
    """Units kept at a density: at least one, at most all."""
    return max(1, min(n, round(density * n)))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k >= scores.shape[-1]:
        return torch.ones_like(scores, dtype=torch.bool)
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)


def check_density(name: str, d: float):
    if not (isinstance(d, (int, float)) and 0 < d <= 1):
        raise DejavuError(f"{name} must be in (0, 1], got {d!r}")


def per_layer(name: str, density, n_layers: int) -> list[float] | None:
    """A density for every layer, from one number or a list of n_layers numbers (None: dense)."""
    if density is None:
        return None
    ds = [density] * n_layers if isinstance(density, (int, float)) else list(density)
    if len(ds) != n_layers:
        raise DejavuError(f"{name}: got {len(ds)} per-layer densities for a model of {n_layers} layers")
    for d in ds:
        check_density(name, d)
    return ds


class Sparsity:
    """The dense no-op; subclasses mask, gather or record."""
    input_side = False  # InputSparsity: input channels, not neurons and heads

    def enter(self, layer: int, x: torch.Tensor):
        pass

    def head_index(self, layer: int, x_in: torch.Tensor) -> torch.Tensor | None:
        return None  # gathered mode: the query heads to compute (None: all)

    def mlp_output(self, layer: int, mlp, x_in: torch.Tensor) -> torch.Tensor | None:
        return None  # gathered mode: the MLP output from the selected neurons only (None: dense)

    def heads(self, layer: int, x_in: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y

    def neurons(self, layer: int, x_in: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return a

    def inputs(self, layer: int, group: str, x: torch.Tensor) -> torch.Tensor:
        return x  # input-side sparsity: the input of projection group `group` (INPUT_GROUPS), masked

    def input_rule(self, layer: int, group: str) -> kernels.InputRule | None:
        return None  # input-side sparsity, gathered: what the projection of `group` reads


INPUT_GROUPS = ("qkv", "o", "gate_up", "down")


def input_densities(density) -> dict[str, float]:
    """One density for every projection group, or a dict group -> density (every group given)."""
    ds = dict.fromkeys(INPUT_GROUPS, density) if isinstance(density, (int, float)) else dict(density)
    if set(ds) != set(INPUT_GROUPS):
        raise DejavuError(f"input-side densities need exactly the groups {', '.join(INPUT_GROUPS)}, got {sorted(ds)}")
    for g, d in ds.items():
        check_density(f"input density of {g}", d)
    return ds


class InputSparsity(Sparsity):
    """Input-side sparsity: in every projection group of every layer, a token's input channel
    counts where its score (selectors.InputSelector: |x_k|, or |x_k| * ||W[:, k]||) exceeds the
    group's threshold (`thresholds[layer][group]`, from calibrate_thresholds). Masked (evaluation):
    each token's other channels are zeroed before the dense projection, and the share kept is
    counted (`density`; `target`: the density the thresholds were set for). Gathered (decode):
    the projection applies the rule itself (kernels.linear reads only the channels that pass for
    some row of the batch); the same result.
    One family at a time: neurons and heads run dense here."""
    input_side = True

    def __init__(self, model: Transformer, selector, thresholds: list[dict[str, float]], gathered: bool = False,
                 target: float | None = None):
        if len(thresholds) != model.cfg.n_layers:
            raise DejavuError(f"input-side thresholds for {len(thresholds)} layers, the model has {model.cfg.n_layers}")
        self.selector, self.gathered, self.thresholds, self.target = selector, gathered, thresholds, target
        self.rules = [{g: kernels.InputRule(torch.tensor(float(t[g]), device=model.device), selector.scale(layer, g))
                       for g in INPUT_GROUPS} for layer, t in enumerate(thresholds)]
        self.kept = {g: [0, 0] for g in INPUT_GROUPS}  # kept, total channels (achieved density, masked mode)

    def inputs(self, layer, group, x):
        if self.gathered:
            return x
        keep = self.rules[layer][group].keep(x)
        self.kept[group][0] += int(keep.sum())
        self.kept[group][1] += keep.numel()
        return x * keep.to(x.dtype)

    def input_rule(self, layer, group):
        return self.rules[layer][group] if self.gathered else None

    def density(self, group: str) -> float | None:
        kept, total = self.kept[group]
        return kept / total if total else None


class _Thresholds(Sparsity):
    """Dense forward that sets each projection group's threshold for every density asked
    (`densities[layer][group]`: a list) from its input scores; with `keep_inputs`, keeps each
    layer's input (the residual entering it) too."""

    def __init__(self, selector, densities: list[dict[str, list[float]]], keep_inputs: bool = False):
        self.selector, self.densities, self.keep_inputs = selector, densities, keep_inputs
        self.thresholds = [{g: {} for g in INPUT_GROUPS} for _ in densities]
        self.layer_inputs: list[torch.Tensor] = []

    def enter(self, layer, x):
        if self.keep_inputs:
            self.layer_inputs.append(x)

    def inputs(self, layer, group, x):
        s = self.selector.input_scores(layer, group, x).flatten()
        for d in self.densities[layer][group]:
            below = round((1 - d) * s.numel())  # channels that fail: the bar is the largest of them
            self.thresholds[layer][group][d] = -1.0 if below == 0 else float(s.kthvalue(below).values)
        return x


def per_layer_input_densities(density, n_layers: int) -> list[dict[str, float]]:
    """One number, a dict group -> density, or a list of those per layer -> a dict per layer."""
    ds = list(density) if isinstance(density, (list, tuple)) else [density] * n_layers
    if len(ds) != n_layers:
        raise DejavuError(f"input-side densities for {len(ds)} layers, the model has {n_layers}")
    return [input_densities(d) for d in ds]


INPUT_CALIBRATION_TOKENS = 2048  # of a calibration stream, what input-side thresholds are set on


@torch.no_grad()
def calibrate_thresholds(model: Transformer, selector, tokens: torch.Tensor, density,
                         window: int = 512) -> list[dict[str, float]]:
    """Per layer and projection group, the score threshold that a share `density` of the input
    channels of `tokens` passes (one number, a dict group -> density, or a list of those per layer:
    allocate_input_densities). tokens: a batch [B, T], or a stream whose first 2048 tokens are cut
    into windows of `window` (at most the model's context). Density 1: -1, every channel passes."""
    if tokens.numel() == 0:
        raise DejavuError("calibrating input-side thresholds needs calibration tokens, got none")
    if tokens.dim() == 1:
        tokens = tokens[:INPUT_CALIBRATION_TOKENS]
        w = min(window, model.cfg.max_seq_len, len(tokens))
        tokens = tokens[:len(tokens) // w * w].view(-1, w)
    ds = per_layer_input_densities(density, model.cfg.n_layers)
    sampler = _Thresholds(selector, [{g: [d[g]] for g in INPUT_GROUPS} for d in ds])
    model(tokens.to(model.device), sparsity=sampler)
    return [{g: sampler.thresholds[layer][g][d[g]] for g in INPUT_GROUPS} for layer, d in enumerate(ds)]


def input_group_params(model: Transformer) -> dict[str, int]:
    """Weights each projection group holds in one layer."""
    c = model.cfg
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    return dict(qkv=(q + 2 * kv) * c.d_model, o=q * c.d_model, gate_up=c.n_in * c.d_ff * c.d_model,
                down=c.d_ff * c.d_model)


@torch.no_grad()
def allocate_input_densities(model: Transformer, selector, tokens: torch.Tensor, density: float,
                             step: float = 0.05) -> list[dict[str, float]]:
    """Per-layer, per-group input-side densities by TEAL's block-wise greedy: in every layer, start
    dense and lower, one step at a time, the group whose step costs the least block-output error
    (MSE against the dense block, on the layer's dense input) per weight it stops reading, until
    the layer reads a share `density` of its projection weights. Every layer reads the same share."""
    check_density("input density", density)
    L = model.cfg.n_layers
    grid = [round(1 - k * step, 6) for k in range(int(round(1 / step)))]  # 1, 1 - step, ..., step
    sampler = _Thresholds(selector, [dict.fromkeys(INPUT_GROUPS, grid) for _ in range(L)], keep_inputs=True)
    tokens = tokens.to(model.device)
    model(tokens, sparsity=sampler)
    B, T = tokens.shape
    pos = model.positions(B, T, 0, None)
    rope, mask = model.rope(pos), model.attention_mask(T, 0, None)

    def block_out(layer, x, sparsity=None):
        after_attn, mlp = model.layers[layer](x, rope, mask, None, 0, sparsity, None)
        return after_attn + mlp

    params = input_group_params(model)
    total = sum(params.values())
    out = []
    for layer in range(L):
        x = sampler.layer_inputs[layer]
        dense = block_out(layer, x).float()

        def error(d):
            bars = [dict.fromkeys(INPUT_GROUPS, -1.0) for _ in range(L)]
            bars[layer] = {g: sampler.thresholds[layer][g][d[g]] for g in INPUT_GROUPS}
            return (block_out(layer, x, InputSparsity(model, selector, bars)).float() - dense).pow(2).mean().item()

        d, err = dict.fromkeys(INPUT_GROUPS, 1.0), 0.0
        while sum((1 - d[g]) * params[g] for g in INPUT_GROUPS) / total < 1 - density - 1e-9:
            best = None
            for g in INPUT_GROUPS:
                if d[g] - step < step / 2:
                    continue
                trial = dict(d, **{g: round(d[g] - step, 6)})
                e = error(trial)
                cost = (e - err) / (step * params[g])
                if best is None or cost < best[0]:
                    best = (cost, trial, e)
            if best is None:
                break
            _, d, err = best
        out.append(d)
    return out


class Selection(Sparsity):
    """Top-k units per layer from the selectors; shared by the masked and gathered modes.
    With `union`, a batch shares one set: the union of its tokens' top-k (what gathered
    decode computes for batch > 1). With `shards` N, the units are N equal contiguous slices
    and each slice keeps its own top-k/N: tensor parallelism's rule (tp.py), on one rank."""

    def __init__(self, model: Transformer, mlp=None, heads=None, mlp_density=None, attn_density=None,
                 union: bool = False, shards: int = 1):
        cfg = model.cfg
        self.mlp, self.head_sel, self.union, self.shards = mlp, heads, union, shards
        self.mlp_k = [units_for(d, cfg.d_ff // shards) for d in per_layer("MLP density", mlp_density, cfg.n_layers)] \
            if mlp is not None else None
        self.attn_k = [units_for(d, cfg.n_heads // shards)
                       for d in per_layer("attention density", attn_density, cfg.n_layers)] if heads is not None else None
        self.resid: list[torch.Tensor] = []
        self.kept = {"mlp": [0, 0], "attn": [0, 0]}  # kept, total units (achieved density)

    def enter(self, layer, x):
        if layer == 0:
            self.resid = []
        self.resid.append(x)

    def select(self, kind, scores, k) -> torch.Tensor:
        """Boolean mask [..., units]: each token's top-k, or with `union` the batch's union."""
        mask = topk_mask(scores.unflatten(-1, (self.shards, -1)), k).flatten(-2)
        if self.union:
            mask = mask.flatten(0, -2).any(0).expand_as(mask)
        self.kept[kind][0] += int(mask.sum())
        self.kept[kind][1] += mask.numel()
        return mask

    def density(self, kind: str) -> float | None:
        kept, total = self.kept[kind]
        return kept / total if total else None


class Masked(Selection):
    """Evaluation: dense compute, then zero every unit outside its token's selected set."""

    def heads(self, layer, x_in, y):
        if self.head_sel is None:
            return y
        s = self.head_sel.head_scores(layer, self.resid, x_in, out=y)
        return y * self.select("attn", s, self.attn_k[layer])[..., None].to(y.dtype)

    def neurons(self, layer, x_in, a):
        if self.mlp is None:
            return a
        s = self.mlp.neuron_scores(layer, self.resid, x_in, out=a, k=self.mlp_k[layer], shards=self.shards)
        return a * self.select("mlp", s, self.mlp_k[layer]).to(a.dtype)


class Gathered(Selection):
    """Decode: compute only the selected units (model.py gathers their rows). One set per
    forward: the union over the batch's tokens, so batch > 1 shares the rows it reads; or, from
    `per_row`, each row its own top-k (serving: a row's answer then never depends on the others)."""

    def __init__(self, model: Transformer, mlp=None, heads=None, mlp_density=None, attn_density=None,
                 side_stream: "torch.cuda.Stream | None" = None, union_cap: tuple[float, float] | None = None):
        super().__init__(model, mlp, heads, mlp_density, attn_density, union=True)
        self.n_layers, self.side_stream = model.cfg.n_layers, side_stream
        self.units = {"mlp": model.cfg.d_ff, "attn": model.cfg.n_heads}
        self.ahead: dict = {}  # (kind, layer) -> (unit indices, event): selections made early
        # union_cap (MLP, attention densities): batch > 1 computes a fixed number of units, so the
        # step has static shapes (CUDA graphs): the union of the rows' top-k first, then the
        # best of the rest by their highest score in the batch; past the cap, the union's best.
        self.cap = None if union_cap is None else {
            kind: units_for(d, self.units[kind]) for kind, d in zip(("mlp", "attn"), union_cap)}
        self.live = None  # per_row: which rows are live (1) or free (0)

    def per_row(self, live: torch.Tensor) -> "Gathered":
        """A copy selecting for each row on its own, one decode token per row: fixed-size [rows, k]
        index sets the gather kernels take row by row (static shapes, no host sync). `live` [rows]
        (a device buffer the caller keeps current): a free row (0) gets indices -1 and computes
        nothing, so a step over every row costs what its live rows select."""
        rows = copy.copy(self)
        rows.live, rows.ahead, rows.kept, rows.cap = live, {}, {"mlp": [0, 0], "attn": [0, 0]}, None
        return rows

    def enter(self, layer, x):
        super().enter(layer, x)
        if self.side_stream is not None and (self.live is not None or x.shape[0] * x.shape[1] == 1):
            self.select_ahead(layer)

    def _top(self, scores, k) -> torch.Tensor:
        """A fixed-size selection, no host sync: one token's top-k [k], or each row's [rows, k]."""
        if self.live is not None:
            return kernels.topk_indices(scores.flatten(0, -2), k, self.live)
        return kernels.topk_indices(scores.reshape(-1), k)

    def count(self, kind, idx):
        self.kept[kind][0] += idx.numel()
        self.kept[kind][1] += self.units[kind] * (len(idx) if idx.dim() == 2 else 1)

    def select_ahead(self, layer):
        """Asynchronous lookahead (batch 1 or per row, CUDA): the residual entering `layer` is what the
        lookahead predictors read for this layer's MLP and the next layer's heads, so their
        top-k is computed now on the side stream, overlapping this layer's attention (and
        MLP); the block waits on an event only where it uses the selection."""
        jobs = []
        if getattr(self.mlp, "lookahead", False):
            jobs.append(("mlp", layer, lambda: self.mlp.neuron_scores(layer, self.resid, None), self.mlp_k))
        if getattr(self.head_sel, "lookahead", False):
            for t in ([0, 1] if layer == 0 else [layer + 1]):
                if t < self.n_layers:
                    jobs.append(("attn", t, lambda t=t: self.head_sel.head_scores(t, self.resid, None), self.attn_k))
        if not jobs:
            return
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            for kind, t, scores, ks in jobs:
                idx = self._top(scores(), ks[t])
                done = torch.cuda.Event()
                done.record()
                self.ahead[kind, t] = (idx, done)

    def _early(self, kind, layer):
        """The side stream's selection for (kind, layer), once the main stream waits for it."""
        if (kind, layer) not in self.ahead:
            return None
        idx, done = self.ahead.pop((kind, layer))
        main = torch.cuda.current_stream()
        main.wait_event(done)
        idx.record_stream(main)  # made on the side stream, used on the main one
        self.count(kind, idx)
        return idx

    def _index(self, kind, scores, k):
        if self.live is not None or scores.numel() == scores.shape[-1]:  # per row, or one token
            idx = self._top(scores, k)
            self.count(kind, idx)
            return idx
        if self.cap is not None:  # a batch, fixed size (no host sync)
            s = scores.flatten(0, -2).float()
            best = s.amax(0)
            member = topk_mask(s, k).any(0)
            key = best + member * (best.max() - best.min() + 1)  # members rank above every non-member
            self.kept[kind][0] += self.cap[kind] * len(s)
            self.kept[kind][1] += s.shape[-1] * len(s)
            return key.topk(self.cap[kind], sorted=False).indices
        return self.select(kind, scores, k).flatten(0, -2)[0].nonzero().squeeze(-1)

    def head_index(self, layer, x_in):
        if self.head_sel is None:
            return None
        early = self._early("attn", layer)
        if early is not None:
            return early
        return self._index("attn", self.head_sel.head_scores(layer, self.resid, x_in), self.attn_k[layer])

    def mlp_output(self, layer, mlp, x_in):
        if self.mlp is None:
            return None
        if hasattr(self.mlp, "gathered_output"):  # selectors that compute part of the MLP to select (gate first)
            return self.mlp.gathered_output(layer, mlp, x_in, self)
        k = self.mlp_k[layer]
        idx = self._early("mlp", layer)
        if idx is None:
            idx = self._index("mlp", self.mlp.neuron_scores(layer, self.resid, x_in, k=k), k)
        return kernels.sparse_mlp(mlp, x_in, idx)


class Recorder(Sparsity):
    """Dense forward; records per layer the residual stream entering it and unit importances."""

    def __init__(self, model: Transformer, dtype=torch.float32):
        self.model, self.dtype = model, dtype
        self.down_norms = neuron_norms(model)
        self.resid: list[torch.Tensor] = []
        self.neuron_imp: list[torch.Tensor] = []
        self.head_imp: list[torch.Tensor] = []
        self.mlp_in: list[torch.Tensor] = []
        self.acts: list[torch.Tensor] = []       # neuron activations a, with keep_acts
        self.head_out: list[torch.Tensor] = []   # per-head attention outputs y, with keep_acts
        self.keep_acts = False
        self.keep_mlp_in = False  # the MLP's own input, for same-layer predictors

    def reset(self):
        for lst in (self.resid, self.neuron_imp, self.head_imp, self.mlp_in, self.acts, self.head_out):
            lst.clear()

    def enter(self, layer, x):
        self.resid.append(x.detach().flatten(0, 1).to(self.dtype))

    def heads(self, layer, x_in, y):
        imp = head_importance(self.model.layers[layer].attn.wo_t, y)
        self.head_imp.append(imp.flatten(0, 1).to(self.dtype))
        if self.keep_acts:
            self.head_out.append(y.detach().flatten(0, 1))
        return y

    def neurons(self, layer, x_in, a):
        self.neuron_imp.append(neuron_importance(a, self.down_norms[layer]).flatten(0, 1).to(self.dtype))
        if self.keep_mlp_in:
            self.mlp_in.append(x_in.detach().flatten(0, 1).to(self.dtype))
        if self.keep_acts:
            self.acts.append(a.detach().flatten(0, 1))
        return a
