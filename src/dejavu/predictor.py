"""Low-rank lookahead predictors: train on recordings, calibrate k, report, save and load.
(selectors.PredictorSelector selects units with them.)

Per layer l (Deja Vu):
  MLP predictor of layer l    reads the residual stream entering layer l (before its attention)
  head predictor of layer l   reads the residual stream entering layer l-1 (layer 0: its own)
so both are ready a block ahead and can run beside the main compute. The same-layer option
(for comparison) reads each part's own input instead: the MLP's normalized input, and the
residual stream entering the head's own layer.

Network: RMS-normalize the input (scale-free), then d -> r -> units. The MLP predictor is the
paper's: no hidden activation, class-balanced BCE on the oracle top set at `label_density`.
Head predictors are a small ReLU network regressing log-importance (measured better than BCE
on SmolLM2, predictor issue). Rank defaults scale with d: r = d/4 for neurons, d/8 for heads,
capped at 1024 and 512 (paper: 1000 and 512 at d = 12288).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .collect import load_layer, model_fingerprint, read_manifest, split_shards
from .errors import DejavuError
from . import kernels
from .model import ModelConfig, Transformer
from .sparse import units_for

PREDICTOR_VERSION = 1
WEIGHTS, META = "predictors.safetensors", "predictors.json"


class LowRank(nn.Module):
    def __init__(self, d: int, rank: int, units: int, hidden_relu: bool):
        super().__init__()
        self.down = nn.Linear(d, rank, bias=False)
        self.up = nn.Linear(rank, units)
        self.hidden_relu = hidden_relu

    def forward(self, x):
        dtype = self.down.weight.dtype
        if x.is_cuda and x.dtype == dtype and not torch.is_grad_enabled() and kernels.norm_kernels() is not None:
            xn = kernels.norm_kernels().norm(x, None, None, 1e-6, rms=True)  # one fused kernel, same rounding
        else:
            xf = x.float()
            xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        h = self.down(xn)
        return self.up(F.relu(h) if self.hidden_relu else h)


def head_input_layer(layer: int, lookahead: bool = True) -> int:
    return max(layer - 1, 0) if lookahead else layer


def mlp_input_name(layer: int, lookahead: bool = True) -> str:
    return f"resid.{layer}" if lookahead else f"mlp_in.{layer}"


def default_ranks(d: int) -> tuple[int, int]:
    """d/4 and d/8 for small models; capped at the paper's 1000-odd and 512 for large ones
    (an uncapped d/4 predictor for OPT-30B would be a third of its MLP)."""
    return min(1024, max(32, d // 4)), min(512, max(16, d // 8))


@dataclass
class TrainSettings:
    mlp_rank: int | None = None
    head_rank: int | None = None
    label_density: float = 0.3   # MLP labels: the oracle top set at this density
    epochs: int = 8
    batch: int = 256
    lr: float = 2e-3
    target_recall: float = 0.9   # k calibration: recall of the oracle top set at label_density
    lookahead: bool = True       # False: same-layer inputs (needs a recording made with same_layer)
    seed: int = 0
    tune_tokens: int = 8192      # head predictors tuned end to end on this much calibration text (0: not)
    tune_epochs: int = 2
    tune_lr: float = 3e-4


# Head densities `dejavu analyze` reports by default and head tuning trains at (a batch at one, drawn at random)
HEAD_DENSITIES = (0.78, 0.67, 0.56)


def _fit(net: nn.Module, x: torch.Tensor, loss_fn, epochs: int, batch: int, lr: float, gen: torch.Generator):
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch):
            idx = perm[i:i + batch]
            loss = loss_fn(net(x[idx]), idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net


def top_set(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


def ranks_of_oracle_set(pred: torch.Tensor, imp: torch.Tensor, k_oracle: int) -> torch.Tensor:
    """For each token, the rank under the predictor of each unit in the oracle top-k: [N, k]."""
    order = pred.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(pred.shape[-1]).expand_as(order))
    return rank.gather(-1, imp.topk(k_oracle, dim=-1).indices)


def selection_metrics(pred: torch.Tensor, imp: torch.Tensor, density: float, target_recall: float) -> dict:
    """Recall/precision of the predicted top-k against the oracle top-k at `density`, and the
    k (as a density) the predictor needs to reach `target_recall` of the oracle set."""
    n = imp.shape[-1]
    k = units_for(density, n)
    ranks = ranks_of_oracle_set(pred, imp, k)
    recall_at_k = (ranks < k).float().mean().item()
    flat = ranks.flatten().sort().values
    k_needed = int(flat[min(len(flat) - 1, int(target_recall * len(flat)))]) + 1
    recall_needed = (ranks < k_needed).float().mean().item()
    return dict(density=k / n, recall=recall_at_k, precision=recall_at_k,
                calibrated_density=k_needed / n, calibrated_recall=recall_needed,
                calibrated_precision=recall_needed * k / k_needed)


GRID = [round(0.05 * i, 2) for i in range(1, 21)]  # densities at which drop curves are measured


def dropped_mass(imp: torch.Tensor, resid_next: torch.Tensor) -> list[float]:
    """For each density in GRID: the importance mass the oracle top set leaves out, relative to
    the norm of the residual stream the block writes into (mean over tokens). A layer whose units'
    output is concentrated, or small beside the stream, loses little when made sparser."""
    n = imp.shape[-1]
    sorted_imp = imp.sort(dim=-1, descending=True).values
    tail = sorted_imp.flip(-1).cumsum(-1).flip(-1)  # tail[:, k] = mass of units ranked k and below
    scale = resid_next.norm(dim=-1).clamp_min(1e-6)
    out = []
    for d in GRID:
        k = units_for(d, n)
        out.append(0.0 if k >= n else (tail[:, k] / scale).mean().item())
    return out


def allocate(curves: list[list[float]], mean_density: float, n_units: int) -> list[float]:
    """Per-layer densities with the given mean that lose the least (greedy on the drop curves):
    start dense, repeatedly lower the layer whose next step down costs least."""
    if not 0 < mean_density <= 1:
        raise DejavuError(f"mean density must be in (0, 1], got {mean_density}")
    idx = [len(GRID) - 1] * len(curves)
    while sum(GRID[i] for i in idx) / len(idx) > mean_density + 1e-9:
        cost = [curves[l][i - 1] - curves[l][i] if i > 0 else float("inf") for l, i in enumerate(idx)]
        best = min(range(len(idx)), key=cost.__getitem__)
        if cost[best] == float("inf"):
            break
        idx[best] -= 1
    return [units_for(GRID[i], n_units) / n_units for i in idx]


def tune_heads(model: Transformer, nets: list[LowRank], lookahead: bool, stream: torch.Tensor,
               settings: TrainSettings, progress: bool = True) -> dict | None:
    """End-to-end tuning of the head predictors. The model runs on calibration text with each
    token's predicted top-k heads (hard masks forward, a sigmoid around the k-th score passes the
    gradient back: straight-through), and the predictors learn to keep the model's next-token
    distribution close to the dense model's (KL). Regressing log-importance ranks heads by the
    norm of their output alone; this ranks them by what dropping them does to the prediction.
    SmolLM2, 6/9 heads: 24.0 -> 22.9 perplexity against the oracle's 22.7 (predictor issue)."""
    from .sparse import Masked, topk_mask
    cfg, window, batch = model.cfg, min(256, model.cfg.max_seq_len), 4
    chunks = stream[:min(len(stream), settings.tune_tokens) // window * window].view(-1, window).to(model.device)
    ks = sorted({units_for(d, cfg.n_heads) for d in HEAD_DENSITIES} - {cfg.n_heads})
    if len(chunks) < batch or not ks:
        return None
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)
    nets = [n.to(model.device).float().train() for n in nets]

    class StraightThrough(Masked):
        def heads(self, layer, x_in, y):
            k = self.attn_k[layer]
            s = nets[layer](self.resid[head_input_layer(layer, lookahead)])
            top = s.topk(k + 1, dim=-1).values  # threshold halfway between the k-th and (k+1)-th score
            soft = torch.sigmoid((s - ((top[..., k - 1] + top[..., k]) / 2).detach()[..., None]) / 0.5)
            return y * (topk_mask(s.detach(), k).to(soft.dtype) + soft - soft.detach())[..., None].to(y.dtype)

    gen = torch.Generator().manual_seed(settings.seed)
    params = [p for n in nets for p in n.parameters()]
    opt = torch.optim.AdamW(params, lr=settings.tune_lr, weight_decay=0.0)
    steps = settings.tune_epochs * (len(chunks) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=settings.tune_lr, total_steps=steps, pct_start=0.1)
    kls, t0 = [], time.perf_counter()
    bar = tqdm(total=steps, desc="tuning head predictors end to end", unit="step", disable=not progress)
    try:
        with torch.enable_grad():
            for _ in range(settings.tune_epochs):
                perm = torch.randperm(len(chunks), generator=gen)
                for i in range(0, len(perm) - batch + 1, batch):
                    x = chunks[perm[i:i + batch].to(chunks.device)]
                    k = ks[int(torch.randint(len(ks), (1,), generator=gen))]
                    with torch.no_grad():
                        dense = F.log_softmax(model(x).float(), -1)
                    sparse = StraightThrough(model, heads=True, attn_density=k / cfg.n_heads)
                    out = F.log_softmax(model(x, sparsity=sparse).float(), -1)
                    kl = F.kl_div(out.flatten(0, 1), dense.flatten(0, 1), log_target=True, reduction="batchmean")
                    opt.zero_grad(set_to_none=True)
                    kl.backward()
                    opt.step()
                    sched.step()
                    kls.append(kl.item())
                    bar.update()
                    bar.set_postfix(kl=f"{kl.item():.3f}")
    finally:
        bar.close()
        for p, g in frozen:
            p.requires_grad_(g)
    for n in nets:  # moved in place: the caller's modules, back on the CPU
        n.cpu().eval()
    first, last = kls[:max(1, len(kls) // 4)], kls[-max(1, len(kls) // 4):]
    return dict(tokens=len(chunks) * window, epochs=settings.tune_epochs, steps=len(kls), head_counts=ks,
                kl_per_token_first_quarter=round(sum(first) / len(first), 4),
                kl_per_token_last_quarter=round(sum(last) / len(last), 4), seconds=round(time.perf_counter() - t0, 1))


def train(model: Transformer, rec_dir: Path, settings: TrainSettings = TrainSettings(),
          progress: bool = True, stream: torch.Tensor | None = None) -> "Predictors":
    """Per-layer predictors from the recording; with the calibration `stream` (token ids), the
    head predictors are then tuned end to end (tune_heads) and their metrics measured again."""
    manifest = read_manifest(rec_dir, model)
    cfg = model.cfg
    mlp_rank, head_rank = default_ranks(cfg.d_model)
    mlp_rank, head_rank = settings.mlp_rank or mlp_rank, settings.head_rank or head_rank
    train_shards, held_shards = split_shards(manifest["shards"])
    la = settings.lookahead
    if not la and not manifest.get("same_layer"):
        raise DejavuError("same-layer predictors need a recording with the MLP inputs: "
                          "record again with same_layer (dejavu calibrate --same-layer)")
    if not held_shards:
        raise DejavuError("need at least 2 recorded shards (one is held out to calibrate k); record more tokens")
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    mlp_nets, head_nets, metrics, drops = [], [], [], []
    static_neuron, static_head = [], []
    t0 = time.perf_counter()
    for layer in tqdm(range(cfg.n_layers), desc="training predictors", unit="layer", disable=not progress):
        hl, ml = f"resid.{head_input_layer(layer, la)}", mlp_input_name(layer, la)
        nxt = min(layer + 1, cfg.n_layers - 1)
        names = sorted({ml, hl, f"resid.{nxt}", f"neuron.{layer}", f"head.{layer}"})
        tr, ho = load_layer(rec_dir, names, train_shards), load_layer(rec_dir, names, held_shards)
        static_neuron.append(tr[f"neuron.{layer}"].mean(0))
        static_head.append(tr[f"head.{layer}"].mean(0))

        # MLP: the paper's predictor, class-balanced BCE on the oracle top set
        k = units_for(settings.label_density, cfg.d_ff)
        labels = top_set(tr[f"neuron.{layer}"], k).float()
        pos_weight = torch.tensor((cfg.d_ff - k) / k)
        net = LowRank(cfg.d_model, mlp_rank, cfg.d_ff, hidden_relu=False)
        x = tr[ml]
        _fit(net, x, lambda out, idx: F.binary_cross_entropy_with_logits(out, labels[idx], pos_weight=pos_weight),
             settings.epochs, settings.batch, settings.lr, gen)
        mlp_nets.append(net.eval())

        # heads: ReLU network regressing log-importance
        target = torch.log(tr[f"head.{layer}"] + 1e-4)
        hnet = LowRank(cfg.d_model, head_rank, cfg.n_heads, hidden_relu=True)
        _fit(hnet, tr[hl], lambda out, idx: F.mse_loss(out, target[idx]),
             settings.epochs, settings.batch, settings.lr, gen)
        head_nets.append(hnet.eval())

        with torch.no_grad():
            m = {"mlp": selection_metrics(net(ho[ml]), ho[f"neuron.{layer}"],
                                          settings.label_density, settings.target_recall),
                 "attn": selection_metrics(hnet(ho[hl]), ho[f"head.{layer}"],
                                           2 / 3, settings.target_recall)}
        metrics.append(m)
        drops.append({"mlp": dropped_mass(tr[f"neuron.{layer}"], tr[f"resid.{nxt}"]),
                      "attn": dropped_mass(tr[f"head.{layer}"], tr[f"resid.{nxt}"])})
    tuning = None
    if stream is not None and settings.tune_tokens > 0:
        tuning = tune_heads(model, head_nets, la, stream, settings, progress)
    if tuning is not None:  # the head metrics again, for the tuned predictors
        for layer in range(cfg.n_layers):
            hl = f"resid.{head_input_layer(layer, la)}"
            ho = load_layer(rec_dir, sorted({hl, f"head.{layer}"}), held_shards)
            with torch.no_grad():
                metrics[layer]["attn"] = selection_metrics(head_nets[layer](ho[hl]), ho[f"head.{layer}"],
                                                           2 / 3, settings.target_recall)
    meta = dict(version=PREDICTOR_VERSION, fingerprint=manifest["fingerprint"], config=cfg.to_dict(),
                lookahead=la, mlp_rank=mlp_rank, head_rank=head_rank, mlp_loss="class-balanced BCE",
                head_loss="MSE on log-importance" + (", then tuned end to end (KL to the dense model)" if tuning else ""),
                head_tuning=tuning, settings=settings.__dict__,
                training=dict(recording=str(rec_dir), train_tokens=len(train_shards) * manifest["shard_tokens"],
                              heldout_tokens=len(held_shards) * manifest["shard_tokens"],
                              seconds=round(time.perf_counter() - t0, 1)),
                metrics=metrics, drop_curves=dict(grid=GRID, layers=drops))
    return Predictors(mlp_nets, head_nets, static_neuron, static_head, meta)


class Predictors:
    """Per-layer predictors plus the static ranking (mean importance on the same calibration text)."""

    def __init__(self, mlp: list[LowRank], heads: list[LowRank], static_neuron, static_head, meta: dict):
        self.mlp, self.heads, self.meta = mlp, heads, meta
        self.static_neuron, self.static_head = static_neuron, static_head

    def shard(self, rank: int, world: int) -> "Predictors":
        """This tensor-parallel rank's slice of every predictor's output (its own neurons and heads),
        a copy; the shared low-rank input projection stays whole. The metadata's config becomes the
        shard's, so costs compare with the shard's block."""
        import copy
        from .tp import _rows, local_config
        preds = copy.deepcopy(self)
        for p in preds.mlp + preds.heads:
            p.up.weight, p.up.bias = _rows(p.up.weight, rank, world), _rows(p.up.bias, rank, world)
        sn = None if preds.static_neuron is None else [s.chunk(world)[rank] for s in preds.static_neuron]
        sh = None if preds.static_head is None else [s.chunk(world)[rank] for s in preds.static_head]
        local = local_config(ModelConfig.from_dict(preds.meta["config"]), world).to_dict()
        return Predictors(preds.mlp, preds.heads, sn, sh, dict(preds.meta, config=local, tp=[rank, world]))

    def save(self, folder: Path):
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (m, h) in enumerate(zip(self.mlp, self.heads)):
            tensors.update({f"mlp.{i}.{k}": v for k, v in m.state_dict().items()})
            tensors.update({f"head.{i}.{k}": v for k, v in h.state_dict().items()})
            tensors[f"static.neuron.{i}"] = self.static_neuron[i]
            tensors[f"static.head.{i}"] = self.static_head[i]
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / WEIGHTS)
        (folder / META).write_text(json.dumps(self.meta, indent=1))

    @classmethod
    def load(cls, folder: Path, model: Transformer) -> "Predictors":
        folder = Path(folder)
        if not (folder / META).exists() or not (folder / WEIGHTS).exists():
            raise DejavuError(f"{folder} holds no predictors ({META} and {WEIGHTS}); "
                              "make them with `dejavu calibrate --out DIR`")
        try:
            meta = json.loads((folder / META).read_text())
            tensors = load_file(folder / WEIGHTS)
        except Exception as e:
            raise DejavuError(f"cannot read the predictors in {folder} ({type(e).__name__}): the files are "
                              "corrupt; run `dejavu calibrate` again") from None
        if meta.get("version") != PREDICTOR_VERSION:
            raise DejavuError(f"predictors in {folder} have format version {meta.get('version')}, this dejavu "
                              f"reads {PREDICTOR_VERSION}; run `dejavu calibrate` again")
        cfg = model.cfg
        rank, world = getattr(model, "tp", (0, 1))  # a tensor-parallel shard: load whole, keep this rank's slice
        if meta.get("fingerprint") != (model_fingerprint(model) if world == 1 else model.unsharded_fingerprint):
            other = meta.get("config", {})
            raise DejavuError(
                f"the predictors in {folder} were made for another model ({other.get('family')}, "
                f"{other.get('n_layers')} layers, d_model {other.get('d_model')}), not this one ({cfg.family}, "
                f"{cfg.n_layers} layers, d_model {cfg.d_model}). Fix: run `dejavu calibrate` for this model.")
        mlp, heads, sn, sh = [], [], [], []
        try:
            for i in range(cfg.n_layers):
                m = LowRank(cfg.d_model, meta["mlp_rank"], cfg.d_ff * world, hidden_relu=False)
                m.load_state_dict({k: tensors[f"mlp.{i}.{k}"] for k in m.state_dict()})
                h = LowRank(cfg.d_model, meta["head_rank"], cfg.n_heads * world, hidden_relu=True)
                h.load_state_dict({k: tensors[f"head.{i}.{k}"] for k in h.state_dict()})
                mlp.append(m.eval().to(model.device))
                heads.append(h.eval().to(model.device))
                sn.append(tensors[f"static.neuron.{i}"])
                sh.append(tensors[f"static.head.{i}"])
        except (KeyError, RuntimeError) as e:
            raise DejavuError(f"the predictors in {folder} do not fit this model's shapes ({str(e)[:200]}); "
                              "run `dejavu calibrate` again") from None
        if world > 1:
            return cls(mlp, heads, sn, sh, meta).shard(rank, world)
        return cls(mlp, heads, sn, sh, meta)

    def allocation(self, part: str, mean_density: float) -> list[float]:
        """Per-layer densities for 'mlp' or 'attn' with this mean, allocated where they cost least.
        Measured on SmolLM2 (predictor issue): helps the MLP at low density; for heads the drop
        proxy misleads (it starves layer 0), so analyze allocates MLP densities only."""
        cfg = self.meta["config"]
        n = cfg["d_ff"] if part == "mlp" else cfg["n_heads"]
        return allocate([d[part] for d in self.meta["drop_curves"]["layers"]], mean_density, n)

    def cost(self, elem_bytes: int = 2) -> dict:
        """Predictor bytes and FLOPs per token relative to the block part it predicts."""
        cfg = ModelConfig.from_dict(self.meta["config"])
        mlp_p = sum(p.numel() for p in self.mlp[0].parameters())
        head_p = sum(p.numel() for p in self.heads[0].parameters())
        mlp_block = cfg.d_ff * cfg.d_model * (cfg.n_in + 1)
        attn_block = cfg.d_model * cfg.head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
        return dict(mlp_bytes=mlp_p * elem_bytes, mlp_frac=mlp_p / mlp_block,
                    head_bytes=head_p * elem_bytes, head_frac=head_p / attn_block)


def random_predictors(model: Transformer, seed: int = 0, mlp_rank: int | None = None,
                      head_rank: int | None = None) -> Predictors:
    """Untrained predictors (default shapes unless ranks are given): for speed work on synthetic
    weights only."""
    cfg = model.cfg
    default_mlp, default_head = default_ranks(cfg.d_model)
    mlp_rank, head_rank = mlp_rank or default_mlp, head_rank or default_head
    torch.manual_seed(seed)
    with torch.device(model.device):
        mlp = [LowRank(cfg.d_model, mlp_rank, cfg.d_ff, False).to(model.dtype).eval() for _ in range(cfg.n_layers)]
        heads = [LowRank(cfg.d_model, head_rank, cfg.n_heads, True).to(model.dtype).eval() for _ in range(cfg.n_layers)]
    meta = dict(config=cfg.to_dict(), lookahead=True, mlp_rank=mlp_rank, head_rank=head_rank, synthetic=True)
    return Predictors(mlp, heads, None, None, meta)
