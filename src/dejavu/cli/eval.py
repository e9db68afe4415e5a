"""`dejavu eval`: zero-shot accuracy (lm-eval) and held-out perplexity, dense and, with
--sparse, MLP-sparse, attention-sparse and both (masked execution)."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .common import load_from_args, load_predictors, need_tokenizer, predictors_folder
from ..evaluate import text_stream

MASKED_NOTE = "loglikelihood scoring uses masked execution: every token with its own selected units"


def run(args):
    from ..evaluate import perplexity
    from ..lm_eval_adapter import markdown_table, run_eval
    from ..tasks import check_tasks
    tasks = check_tasks(args.tasks.split(","))  # before the model loads
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    model = loaded.model
    variants = {"dense": None}
    if args.sparse and args.input_density is not None:
        from .common import input_sparsity
        masked = input_sparsity(model, tok, args.input_density, args.input_score, gathered=False)
        variants[f"{masked.selector.name} ({args.input_density:g})"] = lambda: masked  # one object: it counts
        print(MASKED_NOTE.replace("units", "input channels"))
    elif args.sparse:
        from ..selectors import default_selectors
        from ..sparse import Masked
        neurons, heads = default_selectors(model, load_predictors(model, args))

        def masked(mlp, hd):
            return lambda: Masked(model, mlp=mlp, heads=hd, mlp_density=args.mlp_density,
                                  attn_density=args.attn_density)
        if args.mlp_density < 1:
            variants[f"MLP sparse ({args.mlp_density:g})"] = masked(neurons, None)
        if args.attn_density < 1:
            variants[f"attention sparse ({args.attn_density:g})"] = masked(None, heads)
        if args.mlp_density < 1 and args.attn_density < 1:  # a part at density 1 is dense: no duplicate rows
            variants[f"both ({args.mlp_density:g}, {args.attn_density:g})"] = masked(neurons, heads)
        print(MASKED_NOTE)
    held = text_stream(tok, None, "heldout", 2048)
    rows = []
    for name, factory in variants.items():
        t0 = time.perf_counter()
        scores = run_eval(model, tok, tasks, args.limit, factory, args.batch_size)
        ppl = perplexity(model, held, 512, sparsity=factory() if factory else None, desc=name).ppl
        rows.append(dict(variant=name, tasks=scores, heldout_ppl=ppl, seconds=round(time.perf_counter() - t0, 1)))
        accs = ", ".join(f"{t} {s['acc']:.3f}" for t, s in scores.items())
        print(f"{name}: {accs}, held-out ppl {ppl:.2f} ({rows[-1]['seconds']:.0f} s)", file=sys.stderr)
    table = markdown_table(rows, tasks)
    note = (f"{loaded.name}, zero-shot (lm-eval 0.4.13), {'first ' + str(args.limit) if args.limit else 'all'} "
            f"examples per task; held-out ppl: {len(held)} Wikipedia tokens, windows of 512")
    if args.sparse:
        note += "\n" + MASKED_NOTE
    print()
    print(table)
    print(note)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n\n" + note + "\n")
        result = dict(model=loaded.name, source=loaded.source, tasks=tasks, limit=args.limit,
                      predictors=str(predictors_folder(args)) if args.sparse and args.input_density is None else None,
                      mlp_density=args.mlp_density, attn_density=args.attn_density,
                      input_density=args.input_density, input_score=args.input_score if args.input_density else None,
                      heldout_tokens=len(held), rows=rows)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out} and {out.with_suffix('.json')}")
