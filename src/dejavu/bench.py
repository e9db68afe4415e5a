"""Decode speed: dense and sparse in the same process, in turn, several rounds."""
from __future__ import annotations

import statistics
import time

import torch

from .generate import GenerationStats, generate
from .kernels import cpu as cpu_kernels


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
