"""CPU: the C++ row gather (kernels/cpu.py gather_axpy over rows of an input-major weight, what
input-side sparsity reads) against torch's dense F.linear, per projection of the SmolLM2-135M shape,
fp32, one token; 30 copies of each weight so that nothing stays in cache. Prints us and GB/s.

    PYTHONPATH=src python scripts/cpu_gather_bandwidth.py THREADS
"""
import torch, time
from dejavu.kernels import cpu
import sys; torch.set_num_threads(int(sys.argv[1]))
torch.set_grad_enabled(False)  # the C++ kernel runs only without autograd
def t(f, n=200):
    for _ in range(10): f()
    s = time.perf_counter()
    for _ in range(n): f()
    return (time.perf_counter() - s) / n * 1e6
# 30 layers' worth of distinct weights so nothing stays in cache
for K, N, name in [(576, 960, "qkv"), (576, 576, "o"), (576, 3072, "gate_up"), (1536, 576, "down"), (576, 49152, "lm head")]:
    L = 30 if name != "lm head" else 2
    Ws = [torch.randn(N, K) for _ in range(L)]
    Wts = [w.t().contiguous() for w in Ws]
    x = torch.randn(1, K)
    idx = torch.randperm(K)[: K // 2].sort().values
    xs = x[:, idx].contiguous()
    i = [0]
    def dense():
        i[0] = (i[0] + 1) % L; return torch.nn.functional.linear(x, Ws[i[0]])
    def gath():
        i[0] = (i[0] + 1) % L; return cpu.gather_axpy(xs, Wts[i[0]], idx)
    def gath_all():
        i[0] = (i[0] + 1) % L; return cpu.gather_axpy(x, Wts[i[0]], torch.arange(K))
    mb = N * K * 4 / 1e6
    d, g, ga = t(dense), t(gath), t(gath_all)
    print(f"{name:8s} {mb:6.2f} MB  dense {d:7.1f} us ({mb/d*1e3:5.1f} GB/s)  gather 50% {g:7.1f} us  gather 100% {ga:7.1f} us ({mb/ga*1e3:5.1f} GB/s)")
