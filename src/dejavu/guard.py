"""Run-time guards for sparse decoding: sampled dense checks, fallback, and a drift check.

A `Guard` runs the decode steps of a request sparse (sparse.Gathered). Every Nth step (and
the first few of every request) it also runs that step dense and records
  - top-1 agreement: does the sparse step pick the token the dense step picks?
  - KL(dense || sparse) of the next-token distributions
  - recall of the selectors: the share of the oracle's top-k units (true importance, from
    the dense step) that the selectors pick on the same input
When the rolling top-1 agreement falls below `min_agreement`, the guard trips: the rest of
the request runs dense (`on_trip="dense"`), or the densities step up towards 1
(`on_trip="raise"`; dense once both reach 1). A checked step leaves the dense step's K/V
in the cache (the exact ones), so after a fallback the cache is exact from there on.

Use:
    guard = Guard.from_predictors(model, preds, mlp_density=0.5, attn_density=0.67)
    tokens = generate_ids(model, prompts, 64, guard=guard)
    guard.metrics            # GuardMetrics: counters since the guard was made
    guard.metrics.as_dict()  # for a /metrics endpoint

A Guard serves one request at a time (generate calls `begin()` at the start of each);
its counters add up over requests.

`drift(...)` compares the selectors' recall and the sparse-vs-dense perplexity gap on new
text with the same figures on reference text (the calibration distribution) and says
'fine' or 'recalibrate'.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F

from .errors import DejavuError
from .model import Transformer
from .predictor import selection_metrics
from .selectors import default_selectors
from .sparse import Gathered, Masked, Selection, head_importance, neuron_importance, neuron_norms


@dataclass(frozen=True)
class GuardSettings:
    check_every: int = 8          # every Nth decode step also runs dense
    warmup: int = 2               # the first steps of every request are always checked
    window: int = 8               # checks in the rolling agreement
    min_agreement: float = 0.5    # rolling top-1 agreement below this trips the guard
    on_trip: str = "dense"        # 'dense': rest of the request dense; 'raise': densities step up
    raise_step: float = 0.25      # with 'raise': added to each density per trip

    def __post_init__(self):
        if self.check_every < 1 or self.window < 1 or self.warmup < 0:
            raise DejavuError("guard: check_every and window must be at least 1, warmup at least 0")
        if not 0 <= self.min_agreement <= 1:
            raise DejavuError(f"guard: min_agreement must be in [0, 1], got {self.min_agreement}")
        if self.on_trip not in ("dense", "raise"):
            raise DejavuError(f"guard: on_trip must be 'dense' or 'raise', got {self.on_trip!r}")


# Checks every other step and trips early: for traffic you have not measured yet.
CONSERVATIVE = GuardSettings(check_every=2, warmup=4, window=8, min_agreement=0.8, on_trip="dense")


@dataclass
class GuardMetrics:
    requests: int = 0
    steps: int = 0                 # decode steps run through the guard
    sparse_steps: int = 0          # steps whose token came from the sparse model
    checked: int = 0               # steps also run dense
    agreement_rolling: float | None = None   # mean top-1 agreement over the current window
    agreement_mean: float | None = None      # over every check so far
    kl_mean: float | None = None             # mean KL(dense || sparse), nats
    kl_last: float | None = None
    mlp_recall_mean: float | None = None     # selectors vs the oracle top-k, mean over checks and layers
    attn_recall_mean: float | None = None
    trips: int = 0                 # times the rolling agreement fell below the threshold
    fallbacks: int = 0             # requests that finished dense
    raises: int = 0                # density raises
    mlp_density: float | None = None         # densities in use now (None: that part runs dense)
    attn_density: float | None = None
    dense_now: bool = False
    sums: dict = field(default_factory=lambda: dict(agree=0.0, kl=0.0, mlp=0.0, attn=0.0, mlp_n=0, attn_n=0),
                       repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("sums")
        return d

    def summary(self) -> str:
        f = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"
        return (f"guard: {self.checked} of {self.steps} steps checked against dense; top-1 agreement "
                f"{f(self.agreement_mean)} (rolling {f(self.agreement_rolling)}), KL {f(self.kl_mean, 4)} nats, "
                f"selector recall MLP {f(self.mlp_recall_mean)} heads {f(self.attn_recall_mean)}; "
                f"{self.trips} trips, {self.fallbacks} fallbacks to dense, {self.raises} density raises")


class RecallProbe(Selection):
    """A dense forward that scores the selectors on it: per layer, recall of the oracle top-k
    (true importance of this forward's units) by the selectors' top-k on the same input."""

    def __init__(self, model: Transformer, mlp=None, heads=None, mlp_density=None, attn_density=None):
        super().__init__(model, mlp, heads, mlp_density, attn_density)
        self.model, self.down_norms = model, neuron_norms(model) if mlp is not None else None
        n = model.cfg.n_layers
        self.recall = {"mlp": [[] for _ in range(n)], "attn": [[] for _ in range(n)]}  # per layer, per call
        self.scores = {"mlp": [[] for _ in range(n)], "attn": [[] for _ in range(n)]}  # (pred, imp), with keep
        self.keep = False  # keep the scores for per-layer selection_metrics (the pilot's layer stage)

    def _score(self, kind, layer, pred, imp, k):
        pred, imp = pred.reshape(-1, pred.shape[-1]).float().cpu(), imp.reshape(-1, imp.shape[-1]).float().cpu()
        m = selection_metrics(pred, imp, k / imp.shape[-1], 0.9)
        self.recall[kind][layer].append((m["recall"], len(pred)))
        if self.keep:
            self.scores[kind][layer].append((pred, imp))

    def heads(self, layer, x_in, y):
        if self.head_sel is not None:
            pred = self.head_sel.head_scores(layer, self.resid, x_in)
            self._score("attn", layer, pred, head_importance(self.model.layers[layer].attn.wo_t, y),
                        self.attn_k[layer])
        return y

    def neurons(self, layer, x_in, a):
        if self.mlp is not None:
            pred = self.mlp.neuron_scores(layer, self.resid, x_in, k=self.mlp_k[layer])
            self._score("mlp", layer, pred, neuron_importance(a, self.down_norms[layer]), self.mlp_k[layer])
        return a

    def mean_recall(self, kind: str) -> float | None:
        """Token-weighted mean over every layer and call."""
        pairs = [p for layer in self.recall[kind] for p in layer]
        n = sum(w for _, w in pairs)
        return sum(r * w for r, w in pairs) / n if n else None

    def per_layer(self, kind: str) -> list[dict] | None:
        """selection_metrics per layer over everything kept (recall at k, density for 90% recall)."""
        if not any(self.scores[kind]):
            return None
        k = self.mlp_k if kind == "mlp" else self.attn_k
        out = []
        for layer, parts in enumerate(self.scores[kind]):
            pred, imp = torch.cat([p for p, _ in parts]), torch.cat([i for _, i in parts])
            out.append(selection_metrics(pred, imp, k[layer] / imp.shape[-1], 0.9))
        return out


def kl_and_agreement(dense_logits: torch.Tensor, sparse_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., V] each -> per position KL(dense || sparse) in nats, and top-1 agreement (0/1)."""
    p, q = F.log_softmax(dense_logits.float(), -1), F.log_softmax(sparse_logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1)
    return kl, (dense_logits.argmax(-1) == sparse_logits.argmax(-1)).float()


class Guard:
    def __init__(self, model: Transformer, mlp=None, heads=None, mlp_density: float | None = None,
                 attn_density: float | None = None, settings: GuardSettings = GuardSettings()):
        self.model, self.mlp, self.heads, self.settings = model, mlp, heads, settings
        self.densities = (mlp_density if mlp is not None else None, attn_density if heads is not None else None)
        self.metrics = GuardMetrics()
        self._new_request()

    @classmethod
    def from_predictors(cls, model, preds, mlp_density=0.5, attn_density=0.67, settings=GuardSettings()):
        neurons, heads = default_selectors(model, preds)
        return cls(model, neurons, heads, mlp_density, attn_density, settings)

    def begin(self):
        """A new request (generate calls this): the configured densities again, the window cleared."""
        self.metrics.requests += 1
        self._new_request()

    def _new_request(self):
        self.request_steps = 0
        self.window: deque[float] = deque(maxlen=self.settings.window)
        self._use(*self.densities)

    def _use(self, mlp_density, attn_density):
        """Sparse decoder and recall probe at these densities (None or 1: that part dense)."""
        md = mlp_density if mlp_density is not None and mlp_density < 1 else None
        ad = attn_density if attn_density is not None and attn_density < 1 else None
        mlp, heads = (self.mlp if md else None), (self.heads if ad else None)
        self.dense = md is None and ad is None
        self.sparse = None if self.dense else Gathered(self.model, mlp, heads, md, ad)
        self.probe = None if self.dense else RecallProbe(self.model, mlp, heads, md, ad)
        m = self.metrics
        m.mlp_density, m.attn_density, m.dense_now = md, ad, self.dense

    def step(self, tokens: torch.Tensor, cache, pos: int) -> torch.Tensor:
        """One decode step [B, 1] -> logits [B, 1, V]: sparse, checked against dense when due."""
        due = self.is_due(self.request_steps + 1)
        self.advance(1, checked=due)
        if self.dense:
            return self.model(tokens, cache, pos)
        sparse_logits = self.model(tokens, cache, pos, sparsity=self.sparse)
        if not due:
            return sparse_logits
        # the dense step overwrites this slot's K/V with the exact ones
        dense_logits = self.model(tokens, cache, pos, sparsity=self.probe)
        return dense_logits if self.check(dense_logits, sparse_logits) else sparse_logits

    def check(self, dense_logits, sparse_logits) -> bool:
        """Record one checked step [B, 1, V] each -> whether it tripped the guard (then this step's
        token comes from the dense model)."""
        m = self.metrics
        self._record(dense_logits, sparse_logits)
        if len(self.window) and m.agreement_rolling < self.settings.min_agreement:
            m.trips += 1
            self._trip()
            return True
        m.sparse_steps += 1
        return False

    def is_due(self, step: int) -> bool:
        """Whether the request's step-th decode step (from 1) is checked."""
        s = self.settings
        return not self.dense and (step <= s.warmup or step % s.check_every == 0)

    def unchecked_ahead(self) -> int:
        """Steps from the next one on that run unchecked before the next checked step (the
        CUDA-graph decode replays that many at once); a large number once the request runs dense."""
        n = self.request_steps + 1
        return next((j for j in range(self.settings.check_every + 1) if self.is_due(n + j)), 1 << 30)

    def advance(self, n: int, checked: bool = False):
        """n decode steps ran (a checked one counts as sparse in check(), unless it trips)."""
        self.metrics.steps += n
        self.request_steps += n
        if not checked and not self.dense:
            self.metrics.sparse_steps += n

    def _record(self, dense_logits, sparse_logits):
        m, sums = self.metrics, self.metrics.sums
        kl, agree = kl_and_agreement(dense_logits[:, -1], sparse_logits[:, -1])
        m.checked += 1
        self.window.append(agree.mean().item())
        sums["agree"] += self.window[-1]
        sums["kl"] += kl.mean().item()
        m.kl_last = kl.mean().item()
        m.agreement_rolling = sum(self.window) / len(self.window)
        m.agreement_mean, m.kl_mean = sums["agree"] / m.checked, sums["kl"] / m.checked
        for kind in ("mlp", "attn"):
            r = self.probe.mean_recall(kind)
            if r is not None:
                sums[kind] += r
                sums[kind + "_n"] += 1
                setattr(m, f"{kind}_recall_mean", sums[kind] / sums[kind + "_n"])
        self.probe.recall = {k: [[] for _ in v] for k, v in self.probe.recall.items()}

    def _trip(self):
        m = self.metrics
        if self.settings.on_trip == "raise":
            up = lambda d: None if d is None else min(1.0, d + self.settings.raise_step)
            self._use(up(m.mlp_density), up(m.attn_density))
            self.window.clear()
            if not self.dense:
                m.raises += 1
                return
        self._use(None, None)
        m.fallbacks += 1


# ---------------------------------------------------------------- drift

@dataclass
class TextFigures:
    tokens: int
    dense_ppl: float
    sparse_ppl: float
    ppl_gap: float                 # sparse / dense - 1
    mlp_recall: float | None
    attn_recall: float | None


@dataclass
class DriftReport:
    new: TextFigures
    reference: TextFigures
    mlp_density: float | None
    attn_density: float | None
    max_recall_drop: float
    max_gap_increase: float
    verdict: str                   # 'fine' or 'recalibrate'
    reasons: list[str]

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        f = lambda v: "-" if v is None else f"{v:.3f}"
        rows = [f"{'':<22}{'reference':>12}{'new text':>12}"]
        for name, key in (("tokens", "tokens"), ("dense perplexity", "dense_ppl"), ("sparse perplexity", "sparse_ppl"),
                          ("perplexity gap", "ppl_gap"), ("MLP selector recall", "mlp_recall"),
                          ("head selector recall", "attn_recall")):
            a, b = getattr(self.reference, key), getattr(self.new, key)
            rows.append(f"{name:<22}{a if key == 'tokens' else f(a):>12}{b if key == 'tokens' else f(b):>12}")
        why = "; ".join(self.reasons) if self.reasons else (
            f"recall within {self.max_recall_drop:.2f} and perplexity gap within "
            f"{self.max_gap_increase:.0%} of the reference")
        return "\n".join(rows) + f"\nverdict: {self.verdict} ({why})"


@torch.inference_mode()
def text_figures(model, stream: torch.Tensor, mlp, heads, mlp_density, attn_density, window: int = 512) -> TextFigures:
    """Dense perplexity and selector recall (one dense pass with a RecallProbe), then the masked
    sparse perplexity, over windows of `window` tokens of `stream`."""
    window = min(window, len(stream))
    chunks = stream[: len(stream) // window * window].view(-1, window).to(model.device)
    if len(chunks) == 0 or window < 2:
        raise DejavuError(f"need at least 2 tokens of text, got {len(stream)}")
    probe = RecallProbe(model, mlp, heads, mlp_density, attn_density)
    dense_nll = sparse_nll = 0.0
    for x in chunks:
        x = x[None]
        dense_nll += F.cross_entropy(model(x, sparsity=probe)[0, :-1].float(), x[0, 1:], reduction="sum").item()
        sparse = Masked(model, mlp, heads, mlp_density, attn_density)
        sparse_nll += F.cross_entropy(model(x, sparsity=sparse)[0, :-1].float(), x[0, 1:], reduction="sum").item()
    n = chunks.numel() - len(chunks)
    dense, sparse = math.exp(dense_nll / n), math.exp(sparse_nll / n)
    return TextFigures(tokens=chunks.numel(), dense_ppl=dense, sparse_ppl=sparse, ppl_gap=sparse / dense - 1,
                       mlp_recall=probe.mean_recall("mlp"), attn_recall=probe.mean_recall("attn"))


def drift(model, mlp, heads, new: torch.Tensor, reference: torch.Tensor, mlp_density=0.5, attn_density=0.67,
          max_recall_drop: float = 0.05, max_gap_increase: float = 0.10, window: int = 512) -> DriftReport:
    """Is new text still served well by selectors calibrated on `reference`-like text?
    'recalibrate' when a selector's recall drops by more than max_recall_drop (absolute) or the
    sparse-vs-dense perplexity gap grows by more than max_gap_increase (e.g. 0.10: 10 points)."""
    if mlp_density is None or mlp_density >= 1:  # density 1: that part runs dense
        mlp, mlp_density = None, None
    if attn_density is None or attn_density >= 1:
        heads, attn_density = None, None
    ref = text_figures(model, reference, mlp, heads, mlp_density, attn_density, window)
    cur = text_figures(model, new, mlp, heads, mlp_density, attn_density, window)
    reasons = []
    for name, key in (("MLP selector", "mlp_recall"), ("head selector", "attn_recall")):
        a, b = getattr(ref, key), getattr(cur, key)
        if a is not None and a - b > max_recall_drop:
            reasons.append(f"{name} recall fell from {a:.3f} to {b:.3f}")
    if cur.ppl_gap - ref.ppl_gap > max_gap_increase:
        reasons.append(f"sparse perplexity is {cur.ppl_gap:.0%} above dense on the new text, "
                       f"{ref.ppl_gap:.0%} on the reference")
    return DriftReport(cur, ref, mlp_density, attn_density, max_recall_drop, max_gap_increase,
                       "recalibrate" if reasons else "fine", reasons)


def settings_with(base: GuardSettings, **overrides) -> GuardSettings:
    """The preset with the given fields replaced (None: keep the preset's)."""
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
