"""Per-layer head allocation from dropped-mass curves of the *predicted* set (and of the oracle set),
greedy in whole heads (2026-11-29, 2-core CPU, fp32, SmolLM2, same recording as
head_prev_token_importance.py). Both proxies starve layer 0 and double the perplexity.
    python docs/experiments/head_allocation_by_predicted_drop.py
Writes /tmp/exp/heads.pt (the rank-72 predictors), which head_tuning_end_to_end.py starts from.
Output: head_allocation_by_predicted_drop.log."""
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, "src")
from pathlib import Path
from dejavu.load import load
from dejavu.evaluate import text_stream
from dejavu.collect import read_manifest, split_shards, load_layer
from dejavu.predictor import LowRank, _fit
from dejavu.selectors import OracleSelector
from dejavu.sparse import Masked
from dejavu.evaluate import perplexity
torch.manual_seed(0)
loaded = load("smollm2-135m"); model, tok = loaded.model, loaded.tokenizer; cfg = model.cfg
held = text_stream(tok, None, "heldout", 2048)
rec = Path("runs/smollm2-135m/exp/recording")
man = read_manifest(rec, model); tr_sh, ho_sh = split_shards(man["shards"])
H, L = cfg.n_heads, cfg.n_layers
def ppl(sel, dens):
    return perplexity(model, held, 512, sparsity=Masked(model, mlp=None, heads=sel, mlp_density=None, attn_density=dens), progress=False).ppl
cache = Path("/tmp/exp/heads.pt"); cache.parent.mkdir(exist_ok=True)
t = time.time()
if cache.exists():
    nets, curves = torch.load(cache, weights_only=False)
else:
    g = torch.Generator().manual_seed(0); nets = []; curves = {"oracle": [], "pred": []}
    for layer in range(L):
        hl = f"resid.{max(layer - 1, 0)}"; nxt = f"resid.{min(layer + 1, L - 1)}"
        tr = load_layer(rec, sorted({hl, f"head.{layer}"}), tr_sh)
        target = torch.log(tr[f"head.{layer}"].float() + 1e-4)
        net = LowRank(cfg.d_model, 72, H, True)
        _fit(net, tr[hl].float(), lambda out, idx: F.mse_loss(out, target[idx]), 8, 256, 2e-3, g)
        nets.append(net.eval())
        ho = load_layer(rec, sorted({hl, nxt, f"head.{layer}"}), ho_sh)
        imp = ho[f"head.{layer}"].float(); scale = ho[nxt].float().norm(dim=-1)
        with torch.no_grad():
            pred = net(ho[hl].float())
        for name, score in (("oracle", imp), ("pred", pred)):
            order = score.argsort(-1, descending=True)
            kept = imp.gather(-1, order).cumsum(-1)  # mass kept at k = 1..H
            curves[name].append([((imp.sum(-1) - kept[:, k - 1]) / scale).mean().item() for k in range(1, H + 1)])
    torch.save((nets, curves), cache)
print(f"trained ({time.time() - t:.0f} s)", flush=True)
def greedy(curve, target_total):
    ks = [H] * L
    while sum(ks) > target_total:
        cost = [curve[l][ks[l] - 2] - curve[l][ks[l] - 1] if ks[l] > 1 else float("inf") for l in range(L)]
        best = min(range(L), key=cost.__getitem__); ks[best] -= 1
    return ks
class Pred:
    lookahead = True; name = "p"
    def head_scores(self, layer, resid, x_in, out=None):
        with torch.no_grad():
            return nets[layer](resid[max(layer - 1, 0)])
for kph in (6, 5):
    tot = kph * L
    for name in ("pred", "oracle"):
        ks = greedy(curves[name], tot)
        d = [k / H for k in ks]
        print(kph, f"{name}-curve allocation", ks, flush=True)
        print(f"  {kph}/9 predicted, {name}-allocated: {ppl(Pred(), d):.3f}; oracle, {name}-allocated: {ppl(OracleSelector(model), d):.3f}", flush=True)
    print(f"  {kph}/9 uniform: predicted {ppl(Pred(), kph / H):.3f}, oracle {ppl(OracleSelector(model), kph / H):.3f}", flush=True)
