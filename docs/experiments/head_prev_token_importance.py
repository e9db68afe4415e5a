"""Head predictors, two ideas that did not help (2026-11-29, 2-core CPU, fp32, SmolLM2; recording from
`dejavu calibrate --keep-recording --out runs/smollm2-135m/exp`). Run from the repository root:
    python docs/experiments/head_prev_token_importance.py none lin
The previous token's exact head importances (same layer) as an extra input: worse, not better.
Output: head_prev_token_importance.log."""
import sys, time, torch, torch.nn as nn, torch.nn.functional as F
sys.path.insert(0, "src")
from pathlib import Path
from dejavu.load import load
from dejavu.evaluate import text_stream
from dejavu.collect import read_manifest, split_shards, load_layer
from dejavu.predictor import LowRank, _fit, Predictors
from dejavu.selectors import OracleSelector, PredictorSelector
from dejavu.sparse import Masked, head_importance
from dejavu.evaluate import perplexity
torch.manual_seed(0)
loaded = load("smollm2-135m"); model, tok = loaded.model, loaded.tokenizer; cfg = model.cfg
held = text_stream(tok, None, "heldout", 2048)
rec = Path("runs/smollm2-135m/exp/recording")
man = read_manifest(rec, model); tr_sh, _ = split_shards(man["shards"]); W = man["window"]
H = cfg.n_heads
def ppl(sel, dens):
    return perplexity(model, held, 512, sparsity=Masked(model, mlp=None, heads=sel, mlp_density=None, attn_density=dens), progress=False).ppl

class WithPrev(nn.Module):
    def __init__(s, rank, mode):
        super().__init__(); s.base = LowRank(cfg.d_model, rank, H, True); s.mode = mode
        s.lin = nn.Linear(H, H); s.mix = nn.Sequential(nn.Linear(H + rank, 64), nn.ReLU(), nn.Linear(64, H))
    def forward(s, xf):
        x, f = xf[..., :-H], xf[..., -H:]
        if s.mode == "none": return s.base(x)
        return s.base(x) + s.lin(f)

def prev_feature(logimp, fill):  # [N, H] in windows of W -> previous token's, window starts get fill
    p = logimp.roll(1, 0); p[::W] = fill; return p

modes = sys.argv[1:] or ["none", "lin"]
for mode in modes:
    t = time.time(); g = torch.Generator().manual_seed(0); torch.manual_seed(0); nets, fills = [], []
    for layer in range(cfg.n_layers):
        hl = f"resid.{max(layer - 1, 0)}"
        tr = load_layer(rec, sorted({hl, f"head.{layer}"}), tr_sh)
        target = torch.log(tr[f"head.{layer}"].float() + 1e-4)
        fill = target.mean(0); fills.append(fill)
        X = torch.cat([tr[hl].float(), prev_feature(target, fill)], -1)
        net = WithPrev(72, mode)
        _fit(net, X, lambda out, idx: F.mse_loss(out, target[idx]), 8, 256, 2e-3, g)
        nets.append(net.eval())
    class Sel:
        lookahead = False; name = "x"
        def head_scores(self, layer, resid, x_in, out=None):
            x = resid[max(layer - 1, 0)]  # [B, T, d]
            imp = torch.log(head_importance(model.layers[layer].attn.wo_t, out) + 1e-4)  # exact, this token's
            prev = imp.roll(1, -2); prev[..., 0, :] = fills[layer]
            with torch.no_grad():
                return nets[layer](torch.cat([x, prev], -1))
    print(mode, "0.67", round(ppl(Sel(), 2/3), 3), "0.56", round(ppl(Sel(), 5/9), 3), f"({time.time()-t:.0f} s)", flush=True)
