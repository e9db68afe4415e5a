"""First run of end-to-end head tuning (2026-11-29, 2-core CPU, fp32, SmolLM2), from the predictors
head_allocation_by_predicted_drop.py writes: straight-through top-k masks, KL to the dense model,
8192 calibration tokens, 2 epochs, lr 3e-4, 5 or 6 heads per batch.
    python docs/experiments/head_tuning_end_to_end.py 8192 2 3e-4
6/9 heads 24.01 -> 22.93, 5/9 28.60 -> 26.20 (oracle 22.73 / 26.06). Now predictor.tune_heads.
Output: head_tuning_end_to_end.log."""
import sys, time, random, torch, torch.nn.functional as F
sys.path.insert(0, "src")
from dejavu.load import load
from dejavu.evaluate import text_stream
from dejavu.selectors import OracleSelector
from dejavu.sparse import Masked, topk_mask
from dejavu.evaluate import perplexity
torch.manual_seed(0); random.seed(0)
loaded = load("smollm2-135m"); model, tok = loaded.model, loaded.tokenizer; cfg = model.cfg
for p in model.parameters(): p.requires_grad_(False)
H, L = cfg.n_heads, cfg.n_layers
held = text_stream(tok, None, "heldout", 2048)
ntok = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
calib = text_stream(tok, None, "calibration", ntok)
W = 256
chunks = calib[: len(calib) // W * W].view(-1, W)
nets, _ = torch.load("/tmp/exp/heads.pt", weights_only=False)
class Pred:
    lookahead = True; name = "p"
    def head_scores(self, layer, resid, x_in, out=None):
        with torch.no_grad():
            return nets[layer](resid[max(layer - 1, 0)])
def ppl(sel, dens):
    return perplexity(model, held, 512, sparsity=Masked(model, mlp=None, heads=sel, mlp_density=None, attn_density=dens), progress=False).ppl
class STMasked(Masked):
    def heads(self, layer, x_in, y):
        k = self.attn_k[layer]
        s = nets[layer](self.resid[max(layer - 1, 0)])
        top = s.topk(k + 1, -1).values
        thr = ((top[..., k - 1] + top[..., k]) / 2).detach()[..., None]
        soft = torch.sigmoid((s - thr) / TEMP)
        m = topk_mask(s.detach(), k).float() + soft - soft.detach()
        return y * m[..., None].to(y.dtype)
TEMP = 0.5
print(f"before: 6/9 {ppl(Pred(), 6/9):.3f}  5/9 {ppl(Pred(), 5/9):.3f}", flush=True)
params = [p for n in nets for p in n.parameters()]
for n in nets: n.train()
opt = torch.optim.AdamW(params, lr=float(sys.argv[3]) if len(sys.argv) > 3 else 3e-4, weight_decay=0.0)
B = 4; steps = epochs * (len(chunks) // B); step = 0; t = time.time()
sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=opt.param_groups[0]["lr"], total_steps=steps, pct_start=0.1)
for ep in range(epochs):
    perm = torch.randperm(len(chunks))
    for i in range(0, len(chunks) - B + 1, B):
        x = chunks[perm[i:i + B]]
        with torch.no_grad():
            ref = F.log_softmax(model(x).float(), -1)
        kph = random.choice([5, 6])
        out = F.log_softmax(model(x, sparsity=STMasked(model, mlp=None, heads=Pred(), attn_density=kph / H)).float(), -1)
        loss = F.kl_div(out, ref, log_target=True, reduction="batchmean") / W
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step(); sched.step(); step += 1
        if step % 8 == 0:
            print(f"step {step}/{steps} k={kph} kl/token {loss.item():.4f} ({time.time() - t:.0f} s)", flush=True)
for n in nets: n.eval()
print(f"after: 6/9 {ppl(Pred(), 6/9):.3f}  5/9 {ppl(Pred(), 5/9):.3f}  ({time.time() - t:.0f} s)", flush=True)
torch.save(nets, "/tmp/exp/heads_e2e.pt")
