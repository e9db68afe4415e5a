"""GPU bench of gated shapes (`dejavu bench gated`): ms/token of the CUDA-graph engine, batch 1,
on synthetic weights of a gated preset, for every family that runs there:
  dense       output-major weights (F.linear, cuBLAS), and input-major weights (dejavu's kernel)
  gate-first  the exact gate, then the candidates' up rows and the kept down rows; heads predicted
  predictor   the paper's lookahead predictors for neurons and heads (untrained: speed only)
  input       input-side sparsity (teal, wina) on the input-major model at each model-wide sparsity
Each row next to its roofline (bytes the step must read / copy bandwidth). Input-side thresholds
are set on the prompt's own activations (synthetic weights have no calibration text); the share of
channels the decode steps really skipped is measured in an eager masked run and reported."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from ..errors import DejavuError
from .e2e import eager_steps, step_bytes
from .kernels import copy_bandwidth

GATE_POINT = (0.5, 0.67)  # gate-first and predictor rows: MLP density, attention density


def bench_gated(shape: str, sparsities: list[float], prompt_len: int = 128, gen: int = 128, layers: int | None = None,
                dtype=torch.bfloat16, log=print) -> list[dict]:
    from .. import engine
    from ..load import load
    from ..predictor import random_predictors
    from ..selectors import GateSelector, InputSelector, PredictorSelector, weights_read_fraction
    from ..sparse import INPUT_GROUPS, Gathered, InputSparsity, calibrate_thresholds

    loaded = load(shape, dtype=dtype, device="cuda", max_seq_len=prompt_len + gen + 8, layers=layers)
    model = loaded.model
    if not model.cfg.gated:
        raise DejavuError(f"`dejavu bench gated` times gated MLPs; {shape} is not gated (use `dejavu bench e2e`)")
    bw, card = copy_bandwidth(), torch.cuda.get_device_name()
    prompt = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), device="cuda",
                           generator=torch.Generator(device="cuda").manual_seed(0))
    weights = step_bytes(model, 0)                          # the dense step's weights (layers + LM head)
    cache = step_bytes(model, prompt_len + gen / 2) - weights
    name = shape + (f", first {model.cfg.n_layers} layers" if layers else "")
    log(f"{card}: copy bandwidth {bw / 1e12:.2f} TB/s; {loaded.source}, {dtype}, {weights / 1e9:.1f} GB read per "
        f"dense step")
    rows = []

    def timed(sparsity) -> float:
        dec = engine.GraphDecoder(model, 1, prompt_len + gen + 4, sparsity)
        dec.prefill(prompt)
        return statistics.median(dec.decode(gen)[1])

    def add(family, variant, sparsity, ms, read_fraction, **extra):
        roof = (read_fraction * weights + cache) / bw * 1e3
        rows.append(dict(shape=name, family=family, variant=variant, sparsity=sparsity, ms_per_token=ms,
                         weights_read_fraction=read_fraction, roofline_ms=roof, roofline_frac=roof / ms, card=card,
                         dtype=str(dtype), prompt=prompt_len, gen=gen, **extra))
        log(f"  {family:<10} {variant:<44} sparsity {sparsity:4.2f}  {ms:7.2f} ms/token  reads {read_fraction:5.3f}  "
            f"roofline {roof / ms:5.1%}")

    add("dense", "output-major weights (cuBLAS)", 0.0, timed(None), 1.0)
    preds = random_predictors(model, mlp_rank=256, head_rank=224)
    heads, side = PredictorSelector(preds), torch.cuda.Stream()
    m, a = GATE_POINT
    gate = GateSelector(model)
    add("gate-first", f"gate-first MLP {m:g} + predicted heads {a:g}", 1 - m,
        timed(Gathered(model, gate, heads, m, a, side_stream=side)), weights_read_fraction(model, gate, heads, m, a))
    add("predictor", f"paper's predictors MLP {m:g} / heads {a:g}", 1 - m,
        timed(Gathered(model, heads, heads, m, a, side_stream=side)), weights_read_fraction(model, heads, heads, m, a))
    del preds, heads, gate
    model.to_input_major()
    add("dense", "input-major weights (dejavu kernel)", 0.0, timed(None), 1.0)
    for score in ("teal", "wina"):
        sel = InputSelector(model, score)
        for s in sparsities:
            thresholds = calibrate_thresholds(model, sel, prompt, 1 - s)
            masked = InputSparsity(model, sel, thresholds)
            eager_steps(model, prompt, 8, masked)  # what share the decode steps keep
            kept = {g: masked.density(g) for g in INPUT_GROUPS}
            ms = timed(InputSparsity(model, sel, thresholds, gathered=True))
            add("input", f"input-side {score}", s, ms, weights_read_fraction(model, input_density=kept),
                achieved_sparsity=1 - sum(kept.values()) / len(kept))
    dense_ms = min(r["ms_per_token"] for r in rows if r["family"] == "dense")  # our dense: the faster layout
    for r in rows:
        r["dense_ms_per_token"] = dense_ms
        r["speedup"] = dense_ms / r["ms_per_token"]
    del model, loaded
    torch.cuda.empty_cache()
    return rows


def gated_markdown(rows: list[dict], command: str) -> str:
    lines = [f"Command: `{command}`", "",
             f"{rows[0]['card']}, {rows[0]['dtype']}, synthetic weights, batch 1, prompt {rows[0]['prompt']}, "
             f"{rows[0]['gen']} new tokens, ms/token = median (CUDA events). `sparsity`: input-side, the share of "
             "input channels skipped model-wide (target; measured in `achieved`); gate-first and predictor, the "
             "share of MLP neurons skipped. `vs dense`: against the faster of our two dense layouts.", "",
             "| shape | family | variant | sparsity | achieved | ms/token | vs dense | weights read | of roofline |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ach = f"{r['achieved_sparsity']:.2f}" if "achieved_sparsity" in r else ""
        lines.append(f"| {r['shape']} | {r['family']} | {r['variant']} | {r['sparsity']:.2f} | {ach} | "
                     f"{r['ms_per_token']:.2f} | {r['speedup']:.2f}x | {r['weights_read_fraction']:.3f} | "
                     f"{r['roofline_frac']:.0%} |")
    return "\n".join(lines) + "\n"


def save(rows: list[dict], command: str, out) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "gated.json", out / "gated.md"]
    paths[0].write_text(json.dumps(dict(command=command, rows=rows), indent=1))
    paths[1].write_text(gated_markdown(rows, command))
    return paths
