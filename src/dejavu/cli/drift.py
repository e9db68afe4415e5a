"""`dejavu drift`: are the predictors still right for this text? (fine / recalibrate)"""
from __future__ import annotations

from pathlib import Path

from ..errors import DejavuError
from .common import load_from_args, need_tokenizer, predictors_folder, run_dir
from ..evaluate import text_stream


def run(args):
    from ..data import read_text_files
    from ..guard import drift
    from ..predictor import Predictors
    from ..selectors import default_selectors
    read_text_files(args.text + (args.reference or []))  # missing or empty files stop here, before the model loads
    folder = predictors_folder(args)
    if not args.predictors and not Path(folder).exists():
        pilots = run_dir(args.model, "pilot") / "predictors"
        hint = f"; the pilot's are in {pilots}: pass --predictors {pilots}" if pilots.exists() else ""
        raise DejavuError(f"no predictors in {folder} (the default --predictors for --model {args.model}): run "
                          f"`dejavu calibrate` first, or pass --predictors DIR{hint}")
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    neurons, heads = default_selectors(loaded.model, Predictors.load(folder, loaded.model))
    new = text_stream(tok, args.text, "heldout", args.tokens)
    ref = text_stream(tok, args.reference, "heldout", args.tokens)
    where = ", ".join(args.reference) if args.reference else "held-out Wikipedia (like the default calibration text)"
    print(f"drift of {', '.join(args.text)} against {where}; predictors {folder}; MLP density {args.mlp_density:g}, "
          f"attention density {args.attn_density:g}")
    report = drift(loaded.model, neurons, heads, new, ref, args.mlp_density, args.attn_density,
                   args.max_recall_drop, args.max_gap_increase, args.window)
    print(report.summary())
