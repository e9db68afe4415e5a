"""GPU kernel bench (`dejavu bench kernels`): the MLP's gathered kernels against dense
F.linear on the same card, timed as a decode step runs them (inside a CUDA graph, weights
read from HBM). Also the timing primitives the e2e bench shares: graph_ms, copy_bandwidth."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

KERNEL_SHAPES = {  # name: (d_model, d_ff, gated), the MLP of each model
    "opt-6.7b": (4096, 16384, False), "opt-66b": (9216, 36864, False), "opt-175b": (12288, 49152, False),
    "llama-3-8b": (4096, 14336, True), "llama-3-70b": (8192, 28672, True),
}


def graph_ms(calls: list, replays: int = 10) -> float:
    """Median ms per call of `calls` run back to back inside one CUDA graph, as a decode step runs
    its kernels: no host launch cost (the engine replays graphs too). A GPU sleep before each
    replay keeps the start event from waiting on the host."""
    from ..engine import capture_graph
    graph = capture_graph(lambda: [fn() for fn in calls])  # compiled and warmed up outside the capture
    ms = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(2_000_000)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        ms.append(start.elapsed_time(end) / len(calls))
    return statistics.median(ms)


def copy_bandwidth(gib: float = 1.0) -> float:
    """Device-to-device copy, bytes read + written per second (the roofline's bandwidth)."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        ms.append(a.elapsed_time(b))
    return 2 * src.numel() / (statistics.median(ms[5:]) / 1e3)


def bench_kernels(shapes=tuple(KERNEL_SHAPES), densities=(0.05, 0.1, 0.25, 0.5, 1.0), batches=(1, 8, 32),
                  dtype=torch.bfloat16, calls: int = 32, log=print) -> dict:
    """The MLP's two gathered kernels against dense F.linear on the same card, in the same run:
    up side (gather_act: the selected rows of W_gate+W_up or fc1, activation fused) and down side
    (gather_axpy: the selected rows of W_down^T). Each is timed as `calls` calls back to back in a
    CUDA graph, each call with its own random selection and cycling over enough copies of the
    weights that the L2 holds under an eighth of them: every call reads HBM, as the layers of a
    decode step do. Per row: time, bytes touched (weights read + activations + the down side's
    fp32 partials), achieved bandwidth, fraction of the measured copy bandwidth, speed-up."""
    import torch.nn.functional as F
    from ..kernels import triton_gather as tg
    bw = copy_bandwidth()
    card = torch.cuda.get_device_name()
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    log(f"{card}: copy bandwidth {bw / 1e12:.2f} TB/s (bytes read + written per second), L2 {l2 / 2**20:.0f} MiB")
    g = torch.Generator(device="cuda").manual_seed(0)
    el = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for name in shapes:
        d, n, gated = KERNEL_SHAPES[name]
        n_in, act = (2, "silu") if gated else (1, "relu")
        copies = -(-8 * l2 // (n * d * el))
        w_in = [torch.randn(n, n_in, d, device="cuda", dtype=dtype, generator=g) / d ** 0.5 for _ in range(copies)]
        w_out_t = [torch.randn(n, d, device="cuda", dtype=dtype, generator=g) / n ** 0.5 for _ in range(copies)]
        w_down = [w.t().contiguous() for w in w_out_t]  # dense F.linear's own layout [d, d_ff]
        weights = lambda j: (w_in[j % copies], w_out_t[j % copies], w_down[j % copies])  # noqa: E731
        for B in batches:
            x = torch.randn(B, d, device="cuda", dtype=dtype, generator=g)
            a_all = torch.randn(B, n, device="cuda", dtype=dtype, generator=g)
            dense_up = graph_ms([lambda j=j: F.linear(x, weights(j)[0].view(n * n_in, d)) for j in range(calls)])
            dense_down = graph_ms([lambda j=j: F.linear(a_all, weights(j)[2]) for j in range(calls)])
            for density in densities:
                k = max(1, round(density * n))
                idx = [torch.randperm(n, device="cuda", generator=g)[:k] for _ in range(calls)]
                a = a_all[:, :k].contiguous()
                splits = max(1, min(-(-k // 64), -(-4 * tg.sm_count(a) // -(-d // 128))))
                for side, fn, dense, nbytes in (
                        ("up", lambda j: tg.gather_act(x, weights(j)[0], None, idx[j], act), dense_up,
                         (k * n_in * d + B * d + B * k) * el + k * 8),
                        ("down", lambda j: tg.gather_axpy(a, weights(j)[1], idx[j]), dense_down,
                         (k * d + B * k + B * d) * el + k * 8 + 2 * splits * B * d * 4)):
                    ms = graph_ms([lambda j=j: fn(j) for j in range(calls)])
                    row = dict(shape=name, side=side, batch=B, density=density, units=k, ms=ms, bytes=nbytes,
                               tb_per_s=nbytes / ms / 1e9, of_copy_bw=nbytes / (ms / 1e3) / bw,
                               dense_ms=dense, speedup=dense / ms)
                    rows.append(row)
                    log(f"  {name:<12} {side:<4} B {B:>2} density {density:4.2f}  {ms * 1e3:8.1f} us  "
                        f"{row['tb_per_s']:5.2f} TB/s ({row['of_copy_bw']:4.0%} of copy)  dense {dense * 1e3:8.1f} us  "
                        f"{row['speedup']:5.2f}x")
        del w_in, w_out_t, w_down
        torch.cuda.empty_cache()
    return dict(card=card, copy_bandwidth=bw, dtype=str(dtype), timing=f"{calls} calls back to back in a CUDA graph",
                rows=rows)


def kernels_markdown(res: dict) -> str:
    lines = [f"## MLP gather kernels on {res['card']} ({res['dtype']})", "",
             f"Copy bandwidth {res['copy_bandwidth'] / 1e12:.2f} TB/s (read + write). Time per call: median over "
             f"graph replays of {res['timing']}, each call with its own selection and weights copy (the L2 holds "
             "under an eighth of them: HBM reads, as in a decode step). Fraction: bytes touched per second over "
             "the copy figure (as the e2e roofline counts it).", "",
             "| shape | side | batch | density | units | us | GB touched | TB/s | of copy bw | dense us | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['shape']} | {r['side']} | {r['batch']} | {r['density']:g} | {r['units']} | "
                     f"{r['ms'] * 1e3:.1f} | {r['bytes'] / 1e9:.3f} | {r['tb_per_s']:.2f} | {r['of_copy_bw']:.0%} | "
                     f"{r['dense_ms'] * 1e3:.1f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def save(res: dict, out) -> list[Path]:
    """kernels.json and kernels.md in the folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "kernels.json", out / "kernels.md"]
    paths[0].write_text(json.dumps(res, indent=1))
    paths[1].write_text(kernels_markdown(res))
    return paths
