"""GPU microbenchmark of the gather kernels against dense cuBLAS GEMV, real model shapes.

Run on the device: `PYTHONPATH=src python scripts/bench_gather_gpu.py`. Prints a table; each
row: shape, batch, density, dense time, gathered time, speed-up, achieved bandwidth against
the measured device-to-device copy bandwidth (bytes read + written).
"""
import torch
import triton

from dejavu.kernels import triton_gather as tg

torch.manual_seed(0)
dt = torch.bfloat16
ms = lambda f: triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")

buf = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
dst = torch.empty_like(buf)
copy_ms = ms(lambda: dst.copy_(buf))
bw = 2 * buf.numel() / copy_ms / 1e9  # TB/s
del buf, dst
print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw:.2f} TB/s (read + write)")

SHAPES = {"llama-3-8b up (gate+up)": (14336, 4096), "llama-3-70b up (gate+up)": (28672, 8192),
          "opt-30b fc1": (28672, 7168), "opt-66b fc1": (36864, 9216)}
print(f"{'shape':<26}{'kernel':<8}{'B':>3}{'dens':>6}{'dense ms':>10}{'gather ms':>10}{'speedup':>8}{'%bw':>6}")
for name, (F, d) in SHAPES.items():
    gated = "gate" in name
    w_in = torch.randn(F, 2 if gated else 1, d, device="cuda", dtype=dt)
    w_out_t = torch.randn(F, d, device="cuda", dtype=dt)
    w_flat = w_in.flatten(0, 1)
    for B in (1, 16):
        x = torch.randn(B, d, device="cuda", dtype=dt)
        dense_up = ms(lambda: x @ w_flat.T)
        a_full = torch.randn(B, F, device="cuda", dtype=dt)
        dense_down = ms(lambda: a_full @ w_out_t)
        for dens in (0.1, 0.25, 0.5, 1.0):
            k = int(F * dens)
            idx = torch.randperm(F, device="cuda")[:k]
            rows = (idx[:, None] * w_in.shape[1] + torch.arange(w_in.shape[1], device="cuda")).flatten()
            t_up = ms(lambda: tg.gather_matvec(x, w_flat, rows))
            a = torch.randn(B, k, device="cuda", dtype=dt)
            t_down = ms(lambda: tg.gather_axpy(a, w_out_t, idx))
            up_bytes = len(rows) * d * 2
            down_bytes = k * d * 2
            print(f"{name:<26}{'up':<8}{B:>3}{dens:>6.2f}{dense_up:>10.4f}{t_up:>10.4f}{dense_up / t_up:>8.2f}"
                  f"{up_bytes / t_up / 1e9 / bw:>6.0%}")
            print(f"{name:<26}{'down':<8}{B:>3}{dens:>6.2f}{dense_down:>10.4f}{t_down:>10.4f}"
                  f"{dense_down / t_down:>8.2f}{down_bytes / t_down / 1e9 / bw:>6.0%}")
    del w_in, w_out_t, w_flat
    torch.cuda.empty_cache()
