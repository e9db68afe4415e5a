"""Probe: how much of the sparse step the side stream's selection costs (OPT-30B shape,
synthetic bf16 weights, CUDA-graph decode, MLP 0.1 / attention 0.42).

First the selection alone (32 calls back to back in a CUDA graph, bench.graph_ms): torch.topk
against the Triton radix select (kernels/triton_topk.py), and the MLP predictor plus its
selection. Then the decode step with each selection, and with the top-k replaced by a copy of
the first k indices (timing only: that variant's output is meaningless).

    PYTHONPATH=src python scripts/probe_selection_latency.py

Results: docs/perf-notes.md."""
import statistics, torch
from dejavu import kernels
from dejavu.bench.kernels import graph_ms
from dejavu.engine import GraphDecoder
from dejavu.load import load
from dejavu.predictor import LowRank, random_predictors
from dejavu.selectors import PredictorSelector
from dejavu.sparse import Gathered

triton_topk = kernels.topk_indices
def torch_topk(s, k): return s.topk(k, sorted=False).indices
def copy_topk(s, k): return (s[:k] * 0).long() + torch.arange(k, device=s.device)  # timing only

print("selection alone, us per call (bf16 scores, k = 10% or 24/56 heads):")
for n in (28672, 36864, 49152, 56):
    k = 24 if n == 56 else n // 10
    s = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    row = {name: 1000 * graph_ms([lambda f=f: f(s, k)] * 32) for name, f in (("torch.topk", torch_topk), ("triton", triton_topk))}
    print(f"  n={n} k={k}: " + ", ".join(f"{a} {b:.2f}" for a, b in row.items()), flush=True)
pred = LowRank(7168, 256, 28672, False).to("cuda", torch.bfloat16).eval()
x = torch.randn(1, 7168, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    for name, f in (("torch.topk", torch_topk), ("triton radix select", triton_topk)):
        print(f"  OPT-30B MLP predictor (rank 256) + {name}: {1000 * graph_ms([lambda f=f: f(pred(x).reshape(-1), 2867)] * 32):.2f}")
    print(f"  OPT-30B MLP predictor alone: {1000 * graph_ms([lambda: pred(x)] * 32):.2f}", flush=True)

model = load("opt-30b", dtype=torch.bfloat16, device="cuda", max_seq_len=400).model
sel = PredictorSelector(random_predictors(model, mlp_rank=256, head_rank=224))
prompt = torch.randint(0, model.cfg.vocab_size, (1, 128), device="cuda")
for rnd in range(2):
    for name, f in (("triton radix select", triton_topk), ("torch.topk", torch_topk), ("top-k replaced by a copy", copy_topk)):
        kernels.topk_indices = f
        dec = GraphDecoder(model, 1, 300, Gathered(model, sel, sel, 0.1, 0.42, side_stream=torch.cuda.Stream()))
        dec.prefill(prompt)
        _, ms = dec.decode(128)
        print(f"round {rnd} decode step, {name}: {statistics.median(ms):.3f} ms/token", flush=True)
        del dec
kernels.topk_indices = triton_topk
