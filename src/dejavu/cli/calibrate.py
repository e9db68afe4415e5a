"""`dejavu calibrate`: record calibration data, train the predictors into --predictors, report."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .common import load_from_args, need_tokenizer, predictors_folder
from ..evaluate import text_stream


def run(args):
    from ..collect import bytes_per_token, record
    from ..predictor import Predictors, TrainSettings, train
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    out = Path(predictors_folder(args))
    rec_dir = out / "recording"
    stream = text_stream(tok, args.text, "calibration", args.tokens)
    if len(stream) < args.tokens:
        print(f"note: the calibration text has only {len(stream)} tokens (asked for {args.tokens})", file=sys.stderr)
    print(f"recording {len(stream)} calibration tokens into {rec_dir} "
          f"({bytes_per_token(loaded.model, args.same_layer) * len(stream) / 2**30:.2f} GiB on disk, "
          "fp16 importance scores)")
    record(loaded.model, stream, rec_dir, same_layer=args.same_layer)
    settings = TrainSettings(epochs=args.epochs, label_density=args.label_density,
                             target_recall=args.target_recall, lookahead=not args.same_layer,
                             tune_tokens=args.tune_tokens)
    preds = train(loaded.model, rec_dir, settings, stream=stream)
    preds.save(out)
    preds = Predictors.load(out, loaded.model)  # what later commands will read
    print_predictor_report(preds)
    if not args.keep_recording:
        shutil.rmtree(rec_dir)
    print(f"predictors saved in {out}" + ("" if args.keep_recording else " (recording deleted; --keep-recording keeps it)"))


def print_predictor_report(preds):
    m = preds.meta
    s = m["settings"]
    print(f"\nper layer, on {m['training']['heldout_tokens']} held-out calibration tokens "
          f"(MLP: oracle top {s['label_density']:.0%} set; heads: top 2/3 set; "
          f"'k for {s['target_recall']:.0%}' = density the predictor needs to reach that recall)")
    print("layer | MLP recall  k for recall  precision there | heads recall  k for recall  precision there")
    for i, r in enumerate(m["metrics"]):
        a, h = r["mlp"], r["attn"]
        print(f"{i:5d} | {a['recall']:10.3f}  {a['calibrated_density']:12.2f}  {a['calibrated_precision']:15.3f} | "
              f"{h['recall']:12.3f}  {h['calibrated_density']:12.2f}  {h['calibrated_precision']:15.3f}")
    if m.get("head_tuning"):
        t = m["head_tuning"]
        print(f"head predictors tuned end to end on {t['tokens']} tokens ({t['steps']} steps, {t['seconds']:.0f} s): "
              f"KL to the dense model per token {t['kl_per_token_first_quarter']:.3f} -> {t['kl_per_token_last_quarter']:.3f}")
    c = preds.cost()
    print(f"predictor cost per layer: MLP {c['mlp_bytes'] / 1024:.0f} KiB ({c['mlp_frac']:.1%} of the MLP's weights "
          f"and FLOPs), heads {c['head_bytes'] / 1024:.0f} KiB ({c['head_frac']:.1%} of attention's), at 2 bytes/weight")
