"""Selectors: which units a sparse step keeps, and dejavu's choice per family.

A selector scores the units of one layer for every token; sparse.Selection keeps the top k. It
gets the residual stream entering every layer so far (`resid`), the block part's normalized input
`x_in`, in masked mode the part's dense output `out` (a or y), which only the oracle uses, and for
neurons the final k (the gate selector refines a larger candidate set down to k).

  OracleSelector     the true importance (evaluation only: an upper bound)
  StaticSelector     the same units for every token (mean importance on calibration text)
  GateSelector       gated MLPs: the exact gate first, then the candidates' up rows
  PredictorSelector  the low-rank lookahead predictors (predictor.py)
  InputSelector      input-side sparsity: input channels by |x_i| (teal) or |x_i| * ||W[:, i]|| (wina)
  default_selectors  the per-family policy
  weights_read_fraction  the weights a decode step reads per token, for any of these
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .errors import DejavuError
from .kernels import cpu
from .model import Transformer
from .predictor import Predictors, head_input_layer
from .sparse import (Selection, head_importance, input_densities, input_group_params, neuron_importance,
                     neuron_norms, topk_mask, units_for)


class OracleSelector:
    """The true importance (needs the dense output: evaluation only, an upper bound)."""
    name = "oracle"

    def __init__(self, model: Transformer):
        self.model, self.down_norms = model, neuron_norms(model)

    def neuron_scores(self, layer, resid, x_in, out=None, k=None, shards=1):
        if out is None:
            raise DejavuError("oracle selection needs the dense output: it exists in masked (evaluation) mode only")
        return neuron_importance(out, self.down_norms[layer])

    def head_scores(self, layer, resid, x_in, out=None):
        if out is None:
            raise DejavuError("oracle selection needs the dense output: it exists in masked (evaluation) mode only")
        return head_importance(self.model.layers[layer].attn.wo_t, out)


class StaticSelector:
    """The same units for every token: ranked by mean importance on calibration text."""
    name = "static"

    def __init__(self, mean_neuron: list[torch.Tensor] | None, mean_head: list[torch.Tensor] | None):
        self.mean_neuron, self.mean_head = mean_neuron, mean_head

    def neuron_scores(self, layer, resid, x_in, out=None, k=None, shards=1):
        m = self.mean_neuron[layer].to(x_in.device)
        return m.expand(*x_in.shape[:-1], len(m))

    def head_scores(self, layer, resid, x_in, out=None):
        m = self.mean_head[layer].to(x_in.device)
        return m.expand(*x_in.shape[:-1], len(m))


class GateSelector:
    """Gated MLPs, gate first: compute the exact gate g = x W_gate (all of W_gate is read), score
    neurons by |act(g)| * ||W_down[:, i]|| (times a rank-r SVD estimate of |x W_up| when rank > 0).
    With `refine` = c > 1, the top c*k neurons by that score are candidates; their exact up rows
    give their exact importance, and the final k are the candidates of largest importance, so only
    c*k up rows and k down columns are read. (This torch reference computes every up row for the
    candidates' scores; a fused kernel reads only the candidates'.)"""
    name = "gate"

    def __init__(self, model: Transformer, rank: int = 0, refine: float | None = 1.5):
        if not model.cfg.gated:
            raise DejavuError("the gate selector needs a gated MLP (SwiGLU/GeGLU); use a predictor for ReLU models")
        self.model, self.rank, self.refine, self.down_norms = model, rank, refine, neuron_norms(model)
        # gate and up biases (mlp_bias models), contiguous: the gathers read bias[row]
        self.biases = [(None, None) if b.mlp.b_in is None else tuple(b.mlp.b_in.detach().T.contiguous())
                       for b in model.layers]
        self.factors = []
        for b in model.layers if rank else []:
            u, s, vh = torch.linalg.svd(b.mlp.w_in[:, 1].float(), full_matrices=False)  # W_up [d_ff, d]
            self.factors.append(((vh[:rank].T * s[:rank]).contiguous(), u[:, :rank].T.contiguous()))

    def neuron_scores(self, layer, resid, x_in, out=None, k=None, shards=1):
        """Masked mode: scores whose top-k is the selection (k: the final number of neurons)."""
        mlp = self.model.layers[layer].mlp
        b = mlp.b_in.flatten() if mlp.b_in is not None else None
        h = F.linear(x_in, mlp.w_in.flatten(0, 1), b).unflatten(-1, (mlp.cfg.d_ff, 2))
        g, up = mlp.act(h[..., 0]), h[..., 1]  # one contiguous matmul; gathered mode reads less
        score = g.float().abs() * self.down_norms[layer]
        if self.rank:
            left, right = self.factors[layer]
            score = score * ((x_in.float() @ left) @ right).abs()
        if self.refine is None or k is None:
            return score
        n = score.shape[-1] // shards  # k and the candidates are per shard (tensor parallelism's rule)
        cand = topk_mask(score.unflatten(-1, (shards, n)), units_for(self.refine * k / n, n)).flatten(-2)
        exact = neuron_importance(g * up, self.down_norms[layer])
        return torch.where(cand, exact, torch.full_like(exact, -1.0))

    def gathered_output(self, layer, mlp, x_in, sel: Selection):
        """Decode, reading only W_gate, the candidates' up rows and the kept down rows. Selects
        what neuron_scores + Selection.select (union over the batch) would."""
        n, k = self.model.cfg.d_ff, sel.mlp_k[layer]
        kernels.require_output_major(mlp.w_in)
        if self.rank:
            raise DejavuError("gathered decode with the SVD-scored gate selector is not built; use rank 0")
        n_cand = units_for(self.refine * k / n, n)
        if x_in.numel() == x_in.shape[-1] and cpu.usable(x_in):  # one token: one fused call
            out, kept = cpu.gate_first_mlp(mlp, x_in, self.down_norms[layer], n_cand, k)
            sel.kept["mlp"][0] += len(kept)
            sel.kept["mlp"][1] += n
            return out.view(x_in.shape) + (mlp.b_out if mlp.b_out is not None else 0)
        x2 = x_in.reshape(-1, x_in.shape[-1])
        all_rows = torch.arange(n, device=x_in.device)
        b_gate, b_up = self.biases[layer]
        g = mlp.act(kernels.gather_matvec(x2, mlp.w_in[:, 0], all_rows, b_gate))  # [N, d_ff]
        if getattr(sel, "live", None) is not None:  # a set per row (serving): each row's own, fixed sizes
            cand = kernels.topk_indices(g.abs() * self.down_norms[layer], n_cand, sel.live)  # [N, n_cand], free: -1
            at = cand.clamp(min=0)  # a free row's reads stay in bounds (what they give is never used)
            a = g.gather(1, at) * kernels.gather_matvec(x2, mlp.w_in[:, 1], cand, b_up)
            top = kernels.topk_indices(neuron_importance(a, self.down_norms[layer][at]), k, sel.live).clamp(min=0)
            idx = cand.gather(1, top)
            sel.count("mlp", idx)
            return kernels.gather_axpy(a.gather(1, top), mlp.w_out_t, idx, mlp.b_out).view(x_in.shape)
        cand = (g.abs() * self.down_norms[layer]).topk(n_cand, dim=-1, sorted=False).indices
        if len(x2) == 1:  # one token: fixed sizes and no host sync (CUDA-graph capturable)
            cand = cand[0]
            a = g[:, cand] * kernels.gather_matvec(x2, mlp.w_in[:, 1], cand, b_up)
            top = neuron_importance(a, self.down_norms[layer][cand]).topk(k, dim=-1, sorted=False).indices[0]
            sel.kept["mlp"][0] += k
            sel.kept["mlp"][1] += n
            return kernels.gather_axpy(a[:, top], mlp.w_out_t, cand[top], mlp.b_out).view(x_in.shape)
        if x_in.is_cuda and torch.cuda.is_current_stream_capturing():
            raise DejavuError("gate-first selection at batch > 1 reads a data-dependent number of rows, which a CUDA "
                              "graph cannot capture: decode batch > 1 without the graph, or use batch 1")
        cu = torch.unique(cand)                                                     # the batch's candidates
        up = kernels.gather_matvec(x2, mlp.w_in[:, 1], cu, b_up)                # [N, |cu|]
        a = g[:, cu] * up
        exact = neuron_importance(a, self.down_norms[layer][cu])
        own = torch.zeros_like(exact, dtype=torch.bool).scatter_(1, torch.searchsorted(cu, cand), True)
        exact = torch.where(own, exact, torch.full_like(exact, -1.0))               # each token: its own candidates
        keep = topk_mask(exact, k).any(0)                                           # union of the top-k
        sel.kept["mlp"][0] += int(keep.sum()) * len(x2)
        sel.kept["mlp"][1] += n * len(x2)
        idx = cu[keep]
        return kernels.gather_axpy(a[:, keep].contiguous(), mlp.w_out_t, idx, mlp.b_out).view(x_in.shape)

    def mlp_bytes_fraction(self, density: float) -> float:
        """Weights read per token, as a fraction of the MLP's: W_gate, SVD factors, up rows, down columns."""
        cfg = self.model.cfg
        up = min(1.0, density * (self.refine or 1.0))
        svd = self.rank * (cfg.d_model + cfg.d_ff) / (cfg.d_model * cfg.d_ff)
        return (1 + svd + up + density) / 3


class PredictorSelector:
    """Scores from the lookahead predictors."""
    name = "predicted"

    def __init__(self, preds: Predictors):
        self.p, self.lookahead = preds, preds.meta.get("lookahead", True)
        self.cost_frac = preds.cost()["mlp_frac"]

    def mlp_bytes_fraction(self, density: float) -> float:
        """Weights read per token as a fraction of the MLP's: the selected rows plus the predictor."""
        return density + self.cost_frac

    def neuron_scores(self, layer, resid, x_in, out=None, k=None, shards=1):
        return self.p.mlp[layer](resid[layer] if self.lookahead else x_in)

    def head_scores(self, layer, resid, x_in, out=None):
        return self.p.heads[layer](resid[head_input_layer(layer, self.lookahead)])


def default_selectors(model: Transformer, preds: Predictors):
    """dejavu's choice per family, measured on SmolLM2 (results/): gated MLPs select neurons
    gate-first (the lookahead predictor is far from the oracle there); ReLU MLPs use the
    paper's lookahead predictor; heads always use their lookahead predictor."""
    pred = PredictorSelector(preds)
    return (GateSelector(model) if model.cfg.gated else pred), pred


class InputSelector:
    """Input-side sparsity scores (sparse.InputSparsity keeps the channels above a threshold).
    teal: |x_i|. wina: |x_i| * ||W[:, i]||, the norm of the weight column channel i multiplies,
    over the group's output rows (q, k and v together; gate and up together); for `down` that
    is the neuron's exact importance."""

    def __init__(self, model: Transformer, score: str = "wina"):
        if score not in ("teal", "wina"):
            raise DejavuError(f"input-side score must be 'teal' or 'wina', got {score!r}")
        self.name = f"input-side {score}"
        with torch.no_grad():
            self.col_norms = None if score == "teal" else [dict(
                qkv=b.attn.wqkv.float().norm(dim=0),             # [d]: columns of W_q, W_k, W_v stacked
                o=b.attn.wo_t.float().norm(dim=1),               # [heads*head_dim]: wo_t's rows are W_o's columns
                gate_up=b.mlp.w_in.float().flatten(0, 1).norm(dim=0),
                down=b.mlp.w_out_t.float().norm(dim=1)) for b in model.layers]

    def scale(self, layer, group) -> torch.Tensor | None:
        """What |x| is multiplied by (None: nothing)."""
        return None if self.col_norms is None else self.col_norms[layer][group]

    def input_scores(self, layer, group, x):
        s = x.float().abs()
        return s if self.col_norms is None else s * self.col_norms[layer][group]

    def neuron_scores(self, *args, **kwargs):
        raise DejavuError("an input-side selector selects input channels, not neurons: use it with "
                          "sparse.InputSparsity (input-side and unit selection together are not built)")

    head_scores = neuron_scores


def weights_read_fraction(model: Transformer, neurons=None, heads=None, mlp_density=None, attn_density=None,
                          input_density=None) -> float:
    """Weights a decode step reads for one token, as a fraction of what the dense step reads:
    every layer's weights, norms and biases, the LM head in full, one embedding row (and one
    position row). Sparse parts read less:
      neurons at density m   k neurons' rows of w_in and w_out_t; gate-first reads all of W_gate
                             and its candidates' up rows; predictors add their own weights
      heads at density m     k query heads' Q rows and W_o slices (K/V always); predictors add theirs
      input_density          a dict group -> density (or one number): k input channels' columns
                             of each projection group (sparse.InputSparsity)
    Densities are the mean over layers (the reads are linear in them, so per-layer allocations
    with that mean read the same)."""
    cfg = model.cfg
    d, hd = cfg.d_model, cfg.head_dim
    q_rows, kv_rows = cfg.n_heads * hd, 2 * cfg.n_kv_heads * hd
    mlp_full = cfg.d_ff * (cfg.n_in + 1) * d
    attn_full = (2 * q_rows + kv_rows) * d
    small = sum(p.numel() for n, p in model.layers.named_parameters()  # norms and biases: read in full
                if n.split(".")[-1] not in ("wqkv", "wo_t", "w_in", "w_out_t"))
    head = cfg.vocab_size * d + d * (2 if model.pos_emb is not None else 1) + sum(p.numel() for p in model.norm.parameters())
    dense = cfg.n_layers * (mlp_full + attn_full) + small + head
    mlp, attn = mlp_full, attn_full
    if input_density is not None:
        if neurons is not None or heads is not None:
            raise DejavuError("input-side sparsity with neuron or head selection together is not built")
        ds, params = input_densities(input_density), input_group_params(model)
        attn, mlp = (sum(params[g] * ds[g] for g in groups) for groups in (("qkv", "o"), ("gate_up", "down")))
    if neurons is not None and mlp_density is not None:
        frac = neurons.mlp_bytes_fraction(mlp_density) if hasattr(neurons, "mlp_bytes_fraction") else mlp_density
        mlp = mlp_full * frac
    if heads is not None and attn_density is not None:
        attn = (kv_rows + 2 * q_rows * attn_density) * d
        if isinstance(heads, PredictorSelector):
            attn += heads.p.cost()["head_frac"] * attn_full
    return (cfg.n_layers * (mlp + attn) + small + head) / dense
