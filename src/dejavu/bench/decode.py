"""Decode speed: dense and sparse in the same process, in turn, several rounds, through
generate() (the eager engine on the CPU, the CUDA-graph step on a GPU; `dejavu bench decode`)."""
from __future__ import annotations

import statistics

import torch

from ..generate import GenerationStats, generate
from ..kernels import cpu as cpu_kernels
from ..speculative import generate_lossless


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


def bench_lossless(model: Transformer, prompt: list[int], new_tokens: int, make_draft, k: int, rounds: int,
                   log=print) -> list[dict]:
    """Greedy batch-1 decode of the same prompt: dense, plain sparse, lossless with k drafts per
    round and lossless with adaptive k, in turn, `rounds` times (after a short warm-up). Per
    variant: median tokens/s, and for lossless the acceptance and the cost of drafting and
    verifying, which say why it is or is not faster than dense."""
    variants = {"dense": {}, "sparse": dict(sparse=True), f"lossless k={k}": dict(lossless=True, draft_tokens=k),
                "lossless adaptive": dict(lossless=True)}
    runs = {name: [] for name in variants}
    outputs = {}
    for r in range(rounds + 1):  # round 0: warm-up, not counted
        for name, kw in variants.items():
            stats = GenerationStats()
            n = new_tokens if r else 8
            if kw.get("lossless"):
                steps = generate_lossless(model, [prompt], n, make_draft(), stats=stats, draft_tokens=kw.get("draft_tokens"))
            else:
                steps = generate(model, [prompt], n, stats=stats, sparsity=make_draft() if kw else None)
            out = [int(t) for t in steps]
            if r:
                runs[name].append(stats)
                outputs[name] = out
        if r:
            log(f"  round {r}/{rounds}: " + ", ".join(f"{n} {v[-1].decode_tokens_per_s:.1f}" for n, v in runs.items())
                + " tokens/s")
    dense = statistics.median(s.decode_tokens_per_s for s in runs["dense"])
    rows = []
    for name, stats in runs.items():
        rate = statistics.median(s.decode_tokens_per_s for s in stats)
        row = dict(variant=name, tokens_per_s=rate, vs_dense=rate / dense,
                   same_as_dense=outputs[name] == outputs["dense"])
        if stats[0].lossless is not None:
            ls = [s.lossless for s in stats]
            drafted, rounds_ = sum(x.drafted for x in ls), sum(x.rounds for x in ls)
            row.update(acceptance=sum(x.accepted for x in ls) / max(drafted, 1),
                       alpha=sum(x.accepted for x in ls) / max(sum(x.accepted + x.rejected for x in ls), 1),
                       mean_k=drafted / rounds_, tokens_per_round=sum(x.accepted for x in ls) / rounds_ + 1,
                       draft_ms=1e3 * sum(x.draft_seconds for x in ls) / max(drafted, 1),
                       verify_ms=1e3 * sum(x.verify_seconds for x in ls) / rounds_)
        rows.append(row)
    return rows


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
