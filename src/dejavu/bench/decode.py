"""Decode speed: dense and sparse in the same process, in turn, several rounds (CPU or GPU,
the eager engine; `dejavu bench decode`)."""
from __future__ import annotations

import statistics

import torch

from ..generate import GenerationStats, generate
from ..kernels import cpu as cpu_kernels


def decode_rate(model, prompt: list[int], new_tokens: int, sparsity=None) -> float:
    """Tokens/s of batch-1 greedy decode (prefill excluded)."""
    stats = GenerationStats()
    for _ in generate(model, [prompt], new_tokens, stats=stats, sparsity=sparsity):
        pass
    return stats.decode_tokens_per_s


def bench_decode(model, prompt: list[int], new_tokens: int, variants: dict, rounds: int = 5, log=print) -> dict:
    """variants: name -> (sparsity factory or None, use the fused CPU kernel). Returns name -> rates."""
    rates = {name: [] for name in variants}
    decode_rate(model, prompt, 4)  # warm-up (and the kernel's first-use compile happens outside timing)
    for name, (make, fused) in variants.items():
        if make is not None:
            cpu_kernels.ENABLED = fused
            decode_rate(model, prompt, 4, make())
    for r in range(rounds):
        for name, (make, fused) in variants.items():
            cpu_kernels.ENABLED = fused
            rates[name].append(decode_rate(model, prompt, new_tokens, make() if make else None))
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()) + " tokens/s")
    cpu_kernels.ENABLED = True
    return rates


def summarize(rates: dict, baseline: str = "dense") -> list[dict]:
    base = statistics.median(rates[baseline])
    return [dict(variant=n, median_tokens_per_s=statistics.median(v), ratio=statistics.median(v) / base,
                 rounds=v) for n, v in rates.items()]


def cpu_info() -> str:
    import platform
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def decode_table(rows: list[dict]) -> str:
    """summarize's rows as a plain-text table: median tokens/s, ms/token, ratio to dense."""
    lines = [f"{'variant':<26}{'median tokens/s':>16}{'ms/token':>10}{'vs dense':>10}"]
    lines += [f"{r['variant']:<26}{r['median_tokens_per_s']:>16.1f}{1e3 / r['median_tokens_per_s']:>10.2f}"
              f"{r['ratio']:>9.2f}x" for r in rows]
    return "\n".join(lines)


def lossless_table(rows: list[dict]) -> str:
    """speculative.bench_lossless's rows as markdown: speed, same-as-dense, acceptance, costs."""
    lines = ["| variant | tokens/s | vs dense | output = dense | drafts kept | per checked draft | mean k "
             "| tokens/round | ms/draft step | ms/verify |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        extra = (f"{r['acceptance']:.1%} | {r['alpha']:.1%} | {r['mean_k']:.2f} | {r['tokens_per_round']:.2f} | "
                 f"{r['draft_ms']:.1f} | {r['verify_ms']:.1f}") if "alpha" in r else "| | | | |"
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['vs_dense']:.2f}x | "
                     f"{'yes' if r['same_as_dense'] else 'no'} | {extra} |")
    return "\n".join(lines)
