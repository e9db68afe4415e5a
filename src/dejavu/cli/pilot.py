"""`dejavu pilot`: the trade-off report (pilot.py runs the stages and writes it)."""
from __future__ import annotations

from ..errors import DejavuError
from .common import device_from_args


def run(args):
    from ..pilot import PilotSettings, print_summary, run_pilot
    if any(len(p) != 2 for p in args.points):
        raise DejavuError(f"--points: each point is MLP/ATTN, like 0.5/0.67; got {args.points}")
    if args.rounds and args.max_rounds and args.max_rounds < args.rounds:
        raise DejavuError(f"--max-rounds {args.max_rounds} is below --rounds {args.rounds}")
    device = device_from_args(args)
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")  # as every command loads
    s = PilotSettings(model=args.model, device=device, dtype=dtype, text=args.text,
                      work=args.work, out=args.out, predictors=args.predictors, thorough=args.thorough,
                      calib_tokens=args.calib_tokens, tune_tokens=args.tune_tokens, eval_tokens=args.eval_tokens,
                      points=args.points, input_points=args.input_points, input_score=args.input_score,
                      tasks=args.tasks.split(","), limit=args.limit,
                      new_tokens=args.max_new_tokens, rounds=args.rounds, max_rounds=args.max_rounds,
                      price_per_hour=args.price_per_hour, max_ppl_increase=args.max_ppl_increase,
                      max_accuracy_drop=args.max_accuracy_drop)
    print_summary(run_pilot(s))
