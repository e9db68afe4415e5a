"""Probe: head-predictor variants on SmolLM2 (CPU), perplexity with predicted heads only (MLP
dense) at 6/9 and 5/9 heads on the 2,048 held-out tokens `dejavu analyze` uses.

    PYTHONPATH=src python -m dejavu calibrate --keep-recording --out runs/smollm2-135m/exp
    PRED=runs/smollm2-135m/exp PYTHONPATH=src python scripts/head_predictor_variants.py oracle r144 old_s0 new_s0 ...

Variants (VARIANTS below): rank, loss (mse on log-importance, listwise ce, bce on the top set),
epochs, seed, and which layers read their own residual instead of the one a layer before
(`same`). Each trains fresh head predictors on the recording (every layer >= 1 reads the layer
before unless listed in `same`). Figures from 2026-11-29 are in the predictor issue's note."""
import sys, time, torch, torch.nn.functional as F
from pathlib import Path
from dejavu.load import load
from dejavu.evaluate import text_stream
from dejavu.collect import read_manifest, split_shards, load_layer
from dejavu.predictor import LowRank, _fit, head_input_layer, Predictors
from dejavu.selectors import OracleSelector, PredictorSelector
from dejavu.sparse import Masked
from dejavu.evaluate import perplexity
torch.manual_seed(0)
loaded = load("smollm2-135m")
model, tok = loaded.model, loaded.tokenizer
cfg = model.cfg
held = text_stream(tok, None, "heldout", 2048)
import os; PRED = os.environ.get("PRED", "runs/smollm2-135m/predictors"); rec = Path(PRED) / "recording"
Predictors.cost = lambda self, *a: {"mlp_frac": 0.0}  # head-only predictors: no MLP part to cost
man = read_manifest(rec, model)
tr_sh, ho_sh = split_shards(man["shards"])
def ppl(heads_sel, dens=2/3):
    m = Masked(model, mlp=None, heads=heads_sel, mlp_density=None, attn_density=dens)
    return perplexity(model, held, 512, sparsity=m, progress=False).ppl

if "oracle" in sys.argv:
    print("oracle 0.67", ppl(OracleSelector(model)), flush=True)
    print("oracle 0.56", ppl(OracleSelector(model), 5/9), flush=True)
VARIANTS = {
    "r144": dict(rank=144), "r288": dict(rank=288), "e16": dict(epochs=16), "ce": dict(loss="ce"),
    "r288e16": dict(rank=288, epochs=16), "bce": dict(loss="bce"), "r288ce": dict(rank=288, loss="ce"),
    "lin": dict(relu=False), "r144ce": dict(rank=144, loss="ce"), "r144ce16": dict(rank=144, loss="ce", epochs=16),
    "ce16": dict(loss="ce", epochs=16), "l1same": dict(same=(1,)), "l12same": dict(same=(1, 2)),
    "allsame": dict(same=tuple(range(1, 30))),
    **{f"old_s{i}": dict(seed=i, same=(), old=True) for i in range(4)},
    **{f"new_s{i}": dict(seed=i, same=(1,), old=True) for i in range(4)},
    **{f"f16_s{i}": dict(seed=i, f16=True) for i in range(4)},
}
for v in [a for a in sys.argv[1:] if a in VARIANTS]:
    o = dict(rank=72, epochs=8, loss="mse", relu=True, same=(), seed=0, old=False); o.update(VARIANTS[v])
    t = time.time(); g = torch.Generator().manual_seed(o["seed"]); torch.manual_seed(o["seed"]); nets = []
    for layer in range(cfg.n_layers):
        prev = max(layer - 1, 0)  # the old rule: every layer >= 1 reads the layer before
        hl = f"resid.{layer if layer in o['same'] else prev}"
        tr = load_layer(rec, sorted({hl, f"head.{layer}"}), tr_sh)
        imp = tr[f"head.{layer}"] if o.get("f16") else tr[f"head.{layer}"].float()
        net = LowRank(cfg.d_model, o["rank"], cfg.n_heads, hidden_relu=o["relu"])
        if o["loss"] == "mse":
            target = torch.log(imp + 1e-4); fn = lambda out, idx: F.mse_loss(out, target[idx])
        elif o["loss"] == "ce":  # listwise: predicted softmax vs importance distribution
            p = imp / imp.sum(-1, keepdim=True).clamp_min(1e-9)
            fn = lambda out, idx: -(p[idx] * F.log_softmax(out, -1)).sum(-1).mean()
        else:
            k = round(cfg.n_heads * 2 / 3); lab = torch.zeros_like(imp).scatter_(-1, imp.topk(k, -1).indices, 1.0)
            fn = lambda out, idx: F.binary_cross_entropy_with_logits(out, lab[idx])
        _fit(net, tr[hl] if o.get("f16") else tr[hl].float(), fn, o["epochs"], 256, 2e-3, g)
        nets.append(net.eval())
    preds = Predictors([], nets, [], [], dict(lookahead=True, config=cfg.to_dict(), mlp_rank=1, head_rank=o["rank"]))
    class Sel(PredictorSelector):
        def head_scores(self, layer, resid, x_in, out=None):
            return self.p.heads[layer](resid[layer if layer in o["same"] else max(layer - 1, 0)])
    print(v, o, "0.67", round(ppl(Sel(preds)), 3), "0.56", round(ppl(Sel(preds), 5/9), 3),
          f"({time.time() - t:.0f} s)", flush=True)
