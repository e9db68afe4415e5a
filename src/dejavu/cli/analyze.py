"""`dejavu analyze`: oracle, static and predicted contextual sparsity, per layer and as
perplexity against density."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..errors import DejavuError
from .common import load_from_args, need_tokenizer, predictors_folder, run_dir
from ..evaluate import text_stream


def run(args):
    from .. import analyze
    from ..evaluate import perplexity
    from ..predictor import HEAD_DENSITIES, Predictors
    from ..selectors import StaticSelector
    from ..sparse import INPUT_CALIBRATION_TOKENS
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    model = loaded.model
    out = Path(args.out) if args.out else run_dir(args.model, "analysis")
    folder = predictors_folder(args)
    preds = None
    if args.predictors or Path(folder).exists():  # the default folder adds the predicted curve when it is there
        if "static_tokens" in args.given:
            raise DejavuError(f"--static-tokens ranks the static mask without predictors; with the predictors in "
                              f"{folder} the static mask is their calibration ranking: drop --static-tokens")
        preds = Predictors.load(folder, model)
        static = StaticSelector(preds.static_neuron, preds.static_head)
        print(f"predictors {folder}: the predicted curve is included")
    else:
        print(f"no predictors in {folder}: no predicted curve (run `dejavu calibrate` or pass --predictors DIR)")
        static = static_from_calibration(model, tok, args.static_tokens, args.window)
    held = text_stream(tok, args.text, "heldout", args.tokens)
    t0 = time.perf_counter()
    print(f"analyzing {loaded.name} on {len(held)} held-out tokens -> {out}")
    window = min(args.window, len(held), model.cfg.max_seq_len)
    stats = analyze.layer_stats(model, held[:window][None])
    dense = perplexity(model, held, window, desc="dense").ppl
    print(f"  dense perplexity {dense:.2f}")
    sels = analyze.selectors(model, preds, static)
    attn_d = args.attn_densities or [round(k / model.cfg.n_heads, 3) for k in
                                     sorted({max(1, round(f * model.cfg.n_heads)) for f in HEAD_DENSITIES},
                                            reverse=True)]
    mlp_d = args.mlp_densities
    if len(attn_d) != len(mlp_d):  # 'both' pairs them in order
        attn_d = (attn_d * len(mlp_d))[:len(mlp_d)]
    rows = analyze.curves(model, held, sels, mlp_d, attn_d, window)
    result = dict(model=loaded.name, source=loaded.source, eval_tokens=len(held) // window * window,
                  dense_ppl=dense, predictors=str(folder) if preds else None,
                  predictor_meta=preds.meta if preds else None, layers=stats, curves=rows,
                  device=str(model.device), dtype=str(model.dtype), seconds=round(time.perf_counter() - t0, 1),
                  gqa_note=(f"{model.cfg.n_heads} query heads share {model.cfg.n_kv_heads} K/V heads: a skipped "
                            "query head saves its Q rows, its attention over the cache and its W_o slice; K/V "
                            "are always computed so the cache stays complete"))
    analyze.save(result, out)
    print()
    print(analyze.summary_table(result))
    print(f"wrote {out}/analysis.json, analysis.md, perplexity_vs_density.png, layers.png "
          f"({result['seconds']:.0f} s)")
    calibration = text_stream(tok, None, "calibration", INPUT_CALIBRATION_TOKENS)  # the input-side thresholds
    bytes_rows = analyze.bytes_vs_ppl(model, held, sels, rows, dense, args.input_densities, calibration, window)
    analyze.save_bytes(dict(command="dejavu " + " ".join(sys.argv[1:]), model=loaded.name,
                            eval_tokens=result["eval_tokens"], dense_ppl=dense,
                            predictors=result["predictors"], device=result["device"], dtype=result["dtype"],
                            weights_read=("per token, as a fraction of the dense decode step: every layer's weights, "
                                          "norms and biases, the LM head in full, one embedding row; gate-first "
                                          "reads all of W_gate; predictors add their own weights"),
                            seconds=round(time.perf_counter() - t0, 1), rows=bytes_rows), out)
    print(f"wrote {out}/bytes_vs_ppl.json, bytes_vs_ppl.png ({time.perf_counter() - t0:.0f} s)")


def static_from_calibration(model, tok, tokens: int, window: int):
    """Mean importance per unit on calibration text (the static mask's ranking)."""
    from ..selectors import StaticSelector
    from ..sparse import Recorder
    stream = text_stream(tok, None, "calibration", tokens)
    rec = Recorder(model)
    sums_n, sums_h = None, None
    window = min(window, len(stream), model.cfg.max_seq_len)
    with torch.inference_mode():
        for chunk in stream[: len(stream) // window * window].view(-1, window):
            rec.reset()
            model(chunk[None], sparsity=rec)
            n = [t.sum(0) for t in rec.neuron_imp]
            h = [t.sum(0) for t in rec.head_imp]
            sums_n = n if sums_n is None else [a + b for a, b in zip(sums_n, n)]
            sums_h = h if sums_h is None else [a + b for a, b in zip(sums_h, h)]
    return StaticSelector(sums_n, sums_h)
