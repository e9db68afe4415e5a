"""Probe: how much of the sparse step the side stream's selection costs (OPT-30B shape,
synthetic bf16 weights, CUDA-graph decode, MLP 0.1 / attention 0.42). Timing only: the
"topk replaced by a copy" variant selects the first k units, so its output is meaningless.

    PYTHONPATH=src python scripts/probe_selection_latency.py

H200, before the one-program top-k (docs/perf-notes.md): baseline 6.53 ms/token, top-k
replaced by a copy 5.90, MLP selection inline with heads still ahead 8.19."""
import statistics, torch
from dejavu.engine import GraphDecoder
from dejavu.load import load
from dejavu.predictor import PredictorSelector, random_predictors
from dejavu import sparse
from dejavu.sparse import Gathered
model = load("opt-30b", dtype=torch.bfloat16, device="cuda", max_seq_len=400).model
sel = PredictorSelector(random_predictors(model, mlp_rank=256, head_rank=224))
prompt = torch.randint(0, model.cfg.vocab_size, (1, 128), device="cuda")
real_topk = torch.Tensor.topk
class FakeTopk:
    def __init__(self, values, indices): self.values, self.indices = values, indices
def cheap_topk(self, k, sorted=True):  # timing probe only: same scores work, no selection
    return FakeTopk(None, (self[:k] * 0).long() + torch.arange(k, device=self.device))
for rnd in range(2):
    for name in ("baseline", "topk replaced by a copy", "mlp selection inline, heads ahead"):
        torch.Tensor.topk = cheap_topk if name.startswith("topk") else real_topk
        g = Gathered(model, sel, sel, 0.1, 0.42, side_stream=torch.cuda.Stream())
        if name.startswith("mlp"):
            class NoAheadMLP:  # the MLP selector without lookahead flag: selected on the main stream
                def __init__(s, inner): s.inner = inner
                def __getattr__(s, n): return getattr(s.inner, n)
                lookahead = False
            g.mlp = NoAheadMLP(g.mlp)
        dec = GraphDecoder(model, 1, 300, g)
        dec.prefill(prompt)
        _, ms = dec.decode(128)
        print(f"round {rnd} {name}: {statistics.median(ms):.3f} ms/token", flush=True)
        del dec
torch.Tensor.topk = real_topk
