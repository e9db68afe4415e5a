"""`dejavu pilot`: what sparse inference buys and costs on your model and text, in one report.

Stages, each cached as JSON in the work folder (a rerun skips the finished ones; Ctrl-C
loses only the stage in progress):
  baseline     dense: perplexity, a small zero-shot set, peak memory
  calibration  calibrate (record + train, as `dejavu calibrate`) into the work folder, or reuse --predictors
  layers       per layer: oracle density that keeps the block output, residual-stream cosine,
               recall/precision of the selectors against the oracle
  point-M-A    one per operating point (MLP density M, attention density A): masked perplexity,
               zero-shot accuracy (only where the perplexity is inside the budget: elsewhere it
               cannot change the decision; --thorough scores every point), and the guard's figures
               (top-1 agreement and KL against dense, selector recall) on generated text
  point-input-D  one per input-side point (a share D of every projection's input channels, the
               thresholds set on the calibration text): perplexity and zero-shot as above (the
               guard checks neuron and head selectors: no guard figures)
  speed        decode tokens/s of dense and every point, interleaved in rounds in one process;
               each sparse decode is paired with the dense decodes around it, and rounds are
               added until the paired ratios of the points inside the quality budget agree
Then the report (always rebuilt, cheap): the Pareto front of speed vs perplexity, the fastest
point inside the quality budget with the flags and Python to use it, and the cost per million
generated tokens; report.html (plots inline), report.json and report.md.

The default run is sized for a 2-core CPU (SmolLM2-135M: 3 min 37 s there, unshared); --thorough
is the fuller run (more calibration text and epochs, head predictors tuned end to end, zero-shot
at every point, more speed rounds).
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import resource
import shlex
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .bench.decode import cpu_info
from .errors import DejavuError
from .load import DEFAULT_MODEL

# MLP density / attention density; 1.0 means that part runs dense
POINTS = [(0.5, 1.0), (0.4, 1.0), (0.3, 1.0), (1.0, 0.67), (0.5, 0.67), (0.4, 0.67), (0.3, 0.67)]
INPUT_POINTS = [0.8, 0.7, 0.6]  # input-side sparsity: share of every projection's input channels kept
TASKS = ["copa", "piqa", "winogrande"]
LAYER_POINT = (0.5, 0.67)  # densities at which the per-layer selector figures are measured
MIN_SPEEDUP = 1.05         # a point must beat dense by more than round-to-round noise to be worth it
PRICE_NOTE = "the default, about an on-demand 2-vCPU cloud VM; pass --price-per-hour for your machine"
EXAMPLE_PROMPT = "The history of the city of Paris begins"
# What --thorough changes (an explicit setting overrides either column). Measured on SmolLM2 (2-core
# CPU): the quick column gives the same recommendation and the same figures at MLP-only points (its
# MLP selector is gate-first: no training); its untuned head predictors cost perplexity at attention
# density 0.67 (+24% over dense, against +20% calibrated as thorough but untuned, +14% tuned), but
# those points are outside the budget either way and no faster than dense (0.97x). Calibration
# takes 45 s instead of 270 s (tuning alone was 145 s).
MODES = {
    #                calibration tokens, epochs, head tuning tokens, speed rounds min/max,
    #                IQR of the paired ratios (relative) that stops adding rounds, guarded generations
    "quick":    dict(calib_tokens=8192, epochs=4, tune_tokens=0, rounds=3, max_rounds=8, max_spread=0.10,
                     guard_runs=1),
    "thorough": dict(calib_tokens=12288, epochs=6, tune_tokens=8192, rounds=5, max_rounds=12, max_spread=0.05,
                     guard_runs=2),
}
MODE_FIELDS = ("calib_tokens", "epochs", "tune_tokens", "rounds", "max_rounds")  # settings where None: the mode's
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PilotSettings:
    model: str = DEFAULT_MODEL
    device: str = "cpu"
    dtype: str = "float32"             # weights and compute: float32, bfloat16 or float16 (or a torch.dtype)
    text: list[str] | None = None      # the user's text files (default: the packaged Wikipedia articles)
    work: str | None = None            # stage cache (default runs/<model>/pilot)
    out: str | None = None             # report folder (default: the work folder)
    predictors: str | None = None      # reuse these instead of calibrating
    thorough: bool = False             # the fuller run (MODES["thorough"]); else the quick one
    calib_tokens: int | None = None    # None: the mode's (MODES)
    epochs: int | None = None
    tune_tokens: int | None = None     # head predictors tuned end to end on this many tokens (0: not)
    eval_tokens: int = 2048
    window: int = 512
    points: list = field(default_factory=lambda: list(POINTS))
    input_points: list = field(default_factory=lambda: list(INPUT_POINTS))
    input_score: str = "teal"          # input-side score: teal (|x|) or wina (|x| * column norm)
    tasks: list = field(default_factory=lambda: list(TASKS))
    limit: int = 40                    # zero-shot examples per task
    prompt_tokens: int = 128
    new_tokens: int = 32
    rounds: int | None = None          # speed rounds: at least this many ...
    max_rounds: int | None = None      # ... and at most this many
    price_per_hour: float = 0.10
    max_ppl_increase: float = 0.10     # relative: 0.10 = perplexity at most 10% above dense
    max_accuracy_drop: float = 2.0     # percentage points of mean zero-shot accuracy
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.dtype, torch.dtype):  # the CLI passes torch's dtype
            self.dtype = str(self.dtype).removeprefix("torch.")

    def resolved(self) -> "PilotSettings":
        """A copy with the mode's value wherever a setting was left at None."""
        mode = MODES["thorough" if self.thorough else "quick"]
        return replace(self, **{k: v for k, v in mode.items() if k in MODE_FIELDS and getattr(self, k) is None})

    def mode(self, name: str):
        """A mode-only knob (max_spread, guard_runs)."""
        return MODES["thorough" if self.thorough else "quick"][name]

    def measurement_key(self, fingerprint: str) -> dict:
        """What a cached stage depends on: a change reruns the stages (report-only settings do not)."""
        keep = ("text", "predictors", "thorough", "calib_tokens", "epochs", "tune_tokens", "eval_tokens", "window",
                "tasks", "limit", "prompt_tokens", "new_tokens", "rounds", "max_rounds", "device", "dtype",
                "input_score")
        return dict(fingerprint=fingerprint, **{k: getattr(self, k) for k in keep})


def all_points(s: "PilotSettings") -> list:
    """Neuron/head points (MLP density, attention density), then input-side points ("input", D)."""
    return list(s.points) + [("input", d) for d in s.input_points]


def is_input(point) -> bool:
    return point[0] == "input"


def point_name(point) -> str:
    return f"point-input-{point[1]:.2f}" if is_input(point) else f"point-{point[0]:.2f}-{point[1]:.2f}"


def point_label(point) -> str:
    return f"input-side {point[1]:g}" if is_input(point) else f"MLP {point[0]:g} / attn {point[1]:g}"


# ---------------------------------------------------------------- running the stages

def run_pilot(settings: PilotSettings, log=print) -> dict:
    from .collect import model_fingerprint
    from .load import load
    from .predictor import Predictors
    from .selectors import default_selectors
    t_start = time.perf_counter()
    s = settings.resolved()
    check_settings(s)
    loaded = load(s.model, dtype=DTYPES[s.dtype], device=s.device)
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

    def stage(name, fn, still_valid=lambda result: True):
        """The cached result of a stage, or run it and cache it (atomically)."""
        path = work / f"{name}.json"
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("key") == key and still_valid(saved["result"]):
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
    baseline = stage("baseline", lambda: measure_baseline(model, tok, held, s))
    pred_info = stage("calibration", lambda: calibrate(model, calib, work / "predictors", s))
    preds = Predictors.load(pred_info["folder"], model)
    neurons, heads = default_selectors(model, preds)
    layers = stage("layers", lambda: measure_layers(model, held, neurons, heads, s))
    # a cached point without zero-shot scores is stale once its perplexity is inside the budget
    scored_if_needed = lambda q: q["zero_shot"] is not None or not needs_zero_shot(q["ppl"], baseline["ppl"], s)
    points = all_points(s)
    quality = [stage(point_name(p), lambda p=p: measure_quality(model, tok, held, calib, neurons, heads, p,
                                                                baseline["ppl"], s), scored_if_needed)
               for p in points]
    speed = stage("speed", lambda: measure_speed(model, prompt, neurons, heads, s, points, quality,
                                                 candidates(points, quality, baseline, s)))
    bar.set_description("pilot: report")
    bar.close()

    baseline = dict(baseline, decode_tokens_per_s=statistics.median(speed["dense"]), decode_rounds=speed["dense"],
                    prefill_tokens_per_s=speed["prefill_tokens_per_s"], prompt_tokens=len(prompt))
    points = [dict(q, **speed["points"][point_name(p)], label=point_label(p)) for p, q in zip(points, quality)]
    result = dict(model=loaded.name, source=loaded.source, hardware=hardware(model), cpu=cpu_info(),
                  command=command_line(settings), settings=asdict(s), text=describe_text(s, calib, held),
                  baseline=baseline, predictors=pred_info, layers=layers, points=points,
                  speed=dict(rounds=speed["rounds"], stopped=speed["stopped"], max_spread=s.mode("max_spread")),
                  stage_seconds=timings, stages_total_seconds=round(sum(t["seconds"] for t in timings.values()), 1),
                  wall_seconds=round(time.perf_counter() - t_start, 1),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    result.update(decide(result, s))
    result["report_dir"] = str(out)
    write_report(result, out)
    return result


def check_settings(s: PilotSettings):
    from .sparse import check_density
    from .tasks import check_tasks
    if s.dtype not in DTYPES:
        raise DejavuError(f"--dtype {s.dtype}: the pilot runs in {', '.join(DTYPES)}")
    for name in ("calib_tokens", "epochs", "eval_tokens", "window", "limit", "prompt_tokens", "new_tokens", "rounds",
                 "max_rounds"):
        if getattr(s, name) < 1:
            raise DejavuError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(s, name)}")
    if s.tune_tokens < 0:
        raise DejavuError(f"--tune-tokens must be 0 (no tuning) or more, got {s.tune_tokens}")
    s.max_rounds = max(s.max_rounds, s.rounds)  # --rounds above the mode's cap: exactly that many
    if not s.points:
        raise DejavuError("--points is empty: give operating points like 0.5/1,0.5/0.67")
    for d in s.input_points:
        check_density("input-side density", d)
    if s.input_score not in ("teal", "wina"):
        raise DejavuError(f"--input-score must be teal or wina, got {s.input_score!r}")
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
    ppl = s.eval_tokens / 2048 * 12
    decode = s.new_tokens / 17 + 0.4
    est = {"baseline": ppl + zs,
           "calibration": 0 if s.predictors else (s.calib_tokens / 16384 * 50 + s.calib_tokens / 16384 * 120 *
                                                  s.epochs / 6 + s.tune_tokens / 8192 * 145),
           "layers": 10 + s.eval_tokens / 2048 * 6,
           "speed": (s.rounds + 0.5) * (len(all_points(s)) + 1) * decode}
    for p in s.points:
        est[point_name(p)] = 1.3 * ppl + s.mode("guard_runs") * s.new_tokens * 0.12 + (3 * zs if p == s.points[0] else 0)
    for p in all_points(s)[len(s.points):]:
        est[point_name(p)] = 1.3 * ppl + 3 + zs
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


def measure_baseline(model, tok, held, s: PilotSettings) -> dict:
    """Dense quality and memory (dense decode speed comes from the speed stage, paired with the points)."""
    from .evaluate import perplexity
    from .model import param_bytes
    ppl = perplexity(model, held, s.window, progress=s.progress, desc="dense perplexity")
    zs = zero_shot(model, tok, s)
    cfg = model.cfg
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (s.prompt_tokens + s.new_tokens) * model.dtype.itemsize
    return dict(ppl=ppl.ppl, ppl_tokens=ppl.tokens, zero_shot=zs,
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
    t = time.perf_counter()
    record(model, calib, rec, progress=s.progress)
    record_seconds = round(time.perf_counter() - t, 1)
    preds = train(model, rec, TrainSettings(epochs=s.epochs, tune_tokens=s.tune_tokens), progress=s.progress,
                  stream=calib)
    preds.save(folder)
    shutil.rmtree(rec)
    return dict(folder=str(folder), reused=False, calibration_tokens=len(calib), record_seconds=record_seconds,
                meta=summarize_meta(preds.meta))


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


def selectors_at(neurons, heads, point):
    """(MLP selector, head selector, MLP density, attention density); None where that part runs dense."""
    md, ad = point
    return (neurons if md < 1 else None), (heads if ad < 1 else None), (md if md < 1 else None), \
        (ad if ad < 1 else None)


def needs_zero_shot(ppl: float, dense_ppl: float, s: PilotSettings) -> bool:
    """Zero-shot accuracy decides only between points inside the perplexity budget."""
    return s.thorough or ppl / dense_ppl - 1 <= s.max_ppl_increase


def measure_quality(model, tok, held, calib, neurons, heads, point, dense_ppl: float, s: PilotSettings) -> dict:
    from .evaluate import perplexity
    from .generate import generate_ids
    from .guard import Guard, GuardSettings
    from .selectors import InputSelector, weights_read_fraction
    from .sparse import INPUT_GROUPS, InputSparsity, Masked, calibrate_thresholds
    if is_input(point):  # masked input-side sparsity (one object: it counts what every token kept)
        selector = InputSelector(model, s.input_score)
        thresholds = calibrate_thresholds(model, selector, calib, point[1], s.window)  # its first 2048 tokens
        masked = InputSparsity(model, selector, thresholds, target=point[1])
        ppl = perplexity(model, held, s.window, sparsity=masked, progress=s.progress, desc=point_label(point))
        kept = {g: masked.density(g) for g in INPUT_GROUPS}
        zs = zero_shot(model, tok, s, lambda: masked) if needs_zero_shot(ppl.ppl, dense_ppl, s) else None
        return dict(family="input", input_density=point[1], mlp_density=None, attn_density=None, ppl=ppl.ppl,
                    zero_shot=zs, guard=None, thresholds=thresholds, achieved_input_density=kept,
                    weights_read_fraction=weights_read_fraction(model, input_density=kept))
    md, ad = point
    sel = selectors_at(neurons, heads, point)
    ppl = perplexity(model, held, s.window, sparsity=Masked(model, *sel), progress=s.progress,
                     desc=f"perplexity {md:g}/{ad:g}")
    zs = zero_shot(model, tok, s, lambda: Masked(model, *sel)) if needs_zero_shot(ppl.ppl, dense_ppl, s) else None
    # the guard's figures: every step checked against dense, never tripping
    guard = Guard(model, *sel, GuardSettings(check_every=1, min_agreement=0.0))
    for start in (0, len(held) // 2)[:s.mode("guard_runs")]:
        generate_ids(model, [held[start:start + s.prompt_tokens].tolist()], s.new_tokens, guard=guard)
    g = guard.metrics
    mlp = sel[0]
    return dict(family="neurons/heads", mlp_density=md, attn_density=ad,
                mlp_bytes_fraction=mlp.mlp_bytes_fraction(md) if hasattr(mlp, "mlp_bytes_fraction") else md,
                ppl=ppl.ppl, zero_shot=zs, guard=dict(generations=s.mode("guard_runs"), checked=g.checked, agreement=g.agreement_mean, kl=g.kl_mean,
                                                      mlp_recall=g.mlp_recall_mean, attn_recall=g.attn_recall_mean))


def candidates(points: list, quality: list[dict], baseline: dict, s: PilotSettings) -> list[str]:
    """The points the decision may pick (inside the quality budget): the speed stage's rounds are for them."""
    return [point_name(p) for p, q in zip(points, quality)
            if q["zero_shot"] is not None and within_budget(q["ppl"] / baseline["ppl"] - 1,
                                                            acc_drop(baseline, q["zero_shot"]), s)]


def timed_decode(model, prompt: list[int], new_tokens: int, sparsity=None):
    """(decode tokens/s, prefill tokens/s) of one batch-1 greedy generation."""
    from .generate import GenerationStats, generate
    st = GenerationStats()
    for _ in generate(model, [prompt], new_tokens, stats=st, sparsity=sparsity):
        pass
    return st.decode_tokens_per_s, st.prompt_tokens / st.prefill_seconds


def spread(ratios: list[float]) -> dict:
    """Median, quartiles and range of a point's paired speed ratios; `iqr` is relative to the median."""
    if len(ratios) == 1:
        q1 = med = q3 = ratios[0]
    else:
        q1, med, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return dict(median=med, q1=q1, q3=q3, min=min(ratios), max=max(ratios), iqr=(q3 - q1) / med)


def paired_rounds(decode, names: list[str], rounds: int, max_rounds: int, max_spread: float,
                  focus: list[str], log=lambda *_: None) -> dict:
    """Speed rounds of dense and every variant in `names`; decode(name or None for dense) -> tokens/s.

    Each round decodes the variants in turn (forward in even rounds, backward in odd ones), with a
    dense decode before and after; a variant's paired dense rate is the two interpolated at its
    place in the round, so a load that drifts during the round cancels out of the ratio. After
    `rounds` rounds, stops once the ratios of every variant in `focus` have an interquartile range
    (relative to their median) within `max_spread`; adds rounds while one does not, up to `max_rounds`."""
    dense = [decode(None)]
    sparse, paired = {n: [] for n in names}, {n: [] for n in names}
    stopped = "max_rounds"
    for r in range(max_rounds):
        order = names if r % 2 == 0 else names[::-1]
        got = [(n, decode(n)) for n in order]
        dense.append(decode(None))
        for j, (n, rate) in enumerate(got):
            w = (j + 1) / (len(order) + 1)
            sparse[n].append(rate)
            paired[n].append((1 - w) * dense[-2] + w * dense[-1])
        ratios = {n: [a / b for a, b in zip(sparse[n], paired[n])] for n in names}
        wide = [n for n in focus if spread(ratios[n])["iqr"] > max_spread]
        log(f"speed round {r + 1}: dense {dense[-1]:.1f} tokens/s; " +
            ", ".join(f"{n} {ratios[n][-1]:.2f}x" for n in names) + (f"; spread wide for {wide}" if wide else ""))
        if r + 1 >= rounds and not wide:
            stopped = "spread" if focus else "min_rounds"
            break
    return dict(dense=dense, rounds=len(dense) - 1, stopped=stopped,
                points={n: dict(decode_rounds=sparse[n], paired_dense_rounds=paired[n],
                                ratios=[a / b for a, b in zip(sparse[n], paired[n])]) for n in names})


def measure_speed(model, prompt, neurons, heads, s: PilotSettings, points: list, quality: list[dict],
                  focus: list[str]) -> dict:
    """Decode tokens/s of dense and every point (paired_rounds), the gathered sparse path (prefill dense).
    Neuron and head gathers read the output-major weights, input-side ones the input-major weights
    (one copy): the model is re-stored before each decode that needs the other layout (outside the
    timing); dense decodes in the output-major layout, as `dejavu generate` without --input-density."""
    from .selectors import InputSelector
    from .sparse import Gathered, InputSparsity
    make = {}
    for p, q in zip(points, quality):
        if is_input(p):
            inputs = InputSelector(model, s.input_score)
            make[point_name(p)] = lambda q=q, inputs=inputs: InputSparsity(
                model.to_input_major(), inputs, q["thresholds"], gathered=True, target=q["input_density"])
        else:
            make[point_name(p)] = lambda sel=selectors_at(neurons, heads, p): Gathered(model.to_output_major(), *sel)
    last, prefill = {}, []

    def decode(name, new_tokens=s.new_tokens):
        if name is None:
            model.to_output_major()
            rate, pre = timed_decode(model, prompt, new_tokens)
            prefill.append(pre)
            return rate
        last[name] = make[name]()
        return timed_decode(model, prompt, new_tokens, last[name])[0]

    for name in [None, *make]:  # warm-up (first-use allocations and kernel compiles outside timing)
        decode(name, 4)
    prefill.clear()
    res = paired_rounds(decode, list(make), s.rounds, s.max_rounds, s.mode("max_spread"), focus,
                        log=(lambda *_: None) if not s.progress else tqdm.write)
    model.to_output_major()
    for name, p in res["points"].items():
        stats = spread(p["ratios"])
        gathered = not last[name].input_side  # input-side decode counts nothing (its masked run did)
        p.update(speedup=stats["median"], speedup_spread=stats, decode_tokens_per_s=statistics.median(p["decode_rounds"]),
                 dense_tokens_per_s=statistics.median(p["paired_dense_rounds"]),
                 achieved_mlp_density=last[name].density("mlp") if gathered else None,
                 achieved_attn_density=last[name].density("attn") if gathered else None)
    res["prefill_tokens_per_s"] = statistics.median(prefill)
    return res


# ---------------------------------------------------------------- the decision

def cost_per_million(tokens_per_s: float, price_per_hour: float) -> float:
    return price_per_hour / 3600 / tokens_per_s * 1e6


def acc_drop(baseline: dict, zs: dict | None) -> float | None:
    """Mean zero-shot accuracy below dense, in points; None where the point was not scored."""
    return None if zs is None else 100 * (baseline["zero_shot"]["mean_acc"] - zs["mean_acc"])


def within_budget(ppl_increase: float, drop: float | None, s: PilotSettings) -> bool:
    return ppl_increase <= s.max_ppl_increase and drop is not None and drop <= s.max_accuracy_drop


def decide(result: dict, s: PilotSettings) -> dict:
    """Rows (dense + points) with quality deltas, the Pareto front, the recommendation and costs."""
    b = result["baseline"]
    rows = [dict(name="dense", family="dense", mlp_density=1.0, attn_density=1.0, input_density=None, speedup=1.0,
                 speedup_spread=None, ppl=b["ppl"],
                 ppl_increase=0.0, mean_acc=b["zero_shot"]["mean_acc"], acc_drop=0.0,
                 decode_tokens_per_s=b["decode_tokens_per_s"], dense_tokens_per_s=b["decode_tokens_per_s"])]
    for p in result["points"]:
        rows.append(dict(name=p["label"], family=p.get("family", "neurons/heads"), mlp_density=p["mlp_density"],
                         attn_density=p["attn_density"], input_density=p.get("input_density"), speedup=p["speedup"],
                         speedup_spread=p["speedup_spread"], ppl=p["ppl"], ppl_increase=p["ppl"] / b["ppl"] - 1,
                         mean_acc=p["zero_shot"]["mean_acc"] if p["zero_shot"] else None,
                         acc_drop=acc_drop(b, p["zero_shot"]),
                         decode_tokens_per_s=p["decode_tokens_per_s"], dense_tokens_per_s=p["dense_tokens_per_s"],
                         agreement=(p["guard"] or {}).get("agreement"), kl=(p["guard"] or {}).get("kl")))
    for r in rows:
        r["within_budget"] = within_budget(r["ppl_increase"], r["acc_drop"], s)
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
        sp = best["speedup_spread"]
        why = (f"the fastest point with perplexity at most {s.max_ppl_increase:.0%} above dense and mean zero-shot "
               f"accuracy at most {s.max_accuracy_drop:g} points below: {best['speedup']:.2f}x dense decode "
               f"(paired rounds {sp['q1']:.2f}-{sp['q3']:.2f}x interquartile)")
    # cost: dense and the recommendation from the same paired measurement (the point's own dense rounds)
    dense_rate, rec_rate = best["dense_tokens_per_s"], best["decode_tokens_per_s"]
    cost = dict(price_per_hour=s.price_per_hour, price_note=PRICE_NOTE if s.price_per_hour == 0.10 else "your price",
                dense_tokens_per_s=dense_rate, recommended_tokens_per_s=rec_rate,
                dense_per_million=cost_per_million(dense_rate, s.price_per_hour),
                recommended_per_million=cost_per_million(rec_rate, s.price_per_hour))
    return dict(rows=rows, recommendation=dict(name=best["name"], mlp_density=best["mlp_density"],
                                                attn_density=best["attn_density"],
                                                input_density=best["input_density"], speedup=best["speedup"],
                                                ppl_increase=best["ppl_increase"], acc_drop=best["acc_drop"],
                                                why=why, **usage(best, result, s)),
                cost=cost, budget=dict(max_ppl_increase=s.max_ppl_increase, max_accuracy_drop=s.max_accuracy_drop,
                                       min_speedup=MIN_SPEEDUP))


def usage(best: dict, result: dict, s: PilotSettings) -> dict:
    """The `dejavu generate` command and a Python script, both runnable as pasted, for the
    recommended point: same model, dtype and device as measured, its predictors and densities."""
    flags, load_args = "", repr(s.model)
    if s.model != DEFAULT_MODEL:
        flags += f" --model {shlex.quote(s.model)}"
    default_dtype = "float32" if s.device == "cpu" else "bfloat16"  # `dejavu generate`'s default
    if s.dtype != default_dtype:
        flags += f" --dtype {s.dtype}"
    if s.device != "cpu":
        flags += f" --device {s.device}"
        load_args += f", device={s.device!r}"
    load_args += f", dtype=torch.{s.dtype}"
    prompt = f"--prompt '{EXAMPLE_PROMPT}'"
    head = ["import torch", "from dejavu import load", "from dejavu.generate import generate_ids"]
    load_lines = [f"m = load({load_args})", f"prompt = m.tokenizer({EXAMPLE_PROMPT!r}).input_ids"]
    show = "print(m.tokenizer.decode(ids[0]))"
    if best["name"] == "dense":
        return dict(flags=f"dejavu generate{flags} {prompt}", python="\n".join([
            *head, *load_lines, "ids = generate_ids(m.model, [prompt], 64, eos_id=m.stop_ids)", show]))
    if best.get("input_density") is not None:
        d, score = best["input_density"], s.input_score
        return dict(
            flags=f"dejavu generate{flags} --sparse --input-density {d:g} --input-score {score} {prompt}",
            python="\n".join([
                *head, "from dejavu.evaluate import text_stream", "from dejavu.selectors import InputSelector",
                "from dejavu.sparse import InputSparsity, calibrate_thresholds", *load_lines,
                f"sel = InputSelector(m.model.to_input_major(), {score!r})",
                "calib = text_stream(m.tokenizer, None, 'calibration', 2048).view(4, 512)",
                f"sparsity = InputSparsity(m.model, sel, calibrate_thresholds(m.model, sel, calib, {d:g}), gathered=True)",
                "ids = generate_ids(m.model, [prompt], 64, sparsity=sparsity, eos_id=m.stop_ids)", show]))
    folder = result["predictors"]["folder"]
    md, ad = best["mlp_density"], best["attn_density"]
    return dict(
        flags=(f"dejavu generate{flags} --sparse --predictors {shlex.quote(folder)} --mlp-density {md:g} --attn-density {ad:g} "
               f"--guard {prompt}"),
        python="\n".join([
            *head, "from dejavu.guard import Guard", "from dejavu.predictor import Predictors", *load_lines,
            f"guard = Guard.from_predictors(m.model, Predictors.load({folder!r}, m.model), "
            f"mlp_density={md:g}, attn_density={ad:g})",
            "ids = generate_ids(m.model, [prompt], 64, guard=guard, eos_id=m.stop_ids)", show,
            "print(guard.metrics.summary())"]))


# ---------------------------------------------------------------- the report

def hardware(model) -> str:
    dtype = str(model.dtype).removeprefix("torch.")
    if model.device.type == "cuda":
        return f"{torch.cuda.get_device_name(model.device)}, {dtype}"
    return f"{os.cpu_count()}-core CPU ({cpu_info()}), {dtype}"


def command_line(s: PilotSettings) -> str:
    default = PilotSettings()
    flags = []
    for k, v in asdict(s).items():
        if k == "progress" or v == getattr(default, k):
            continue
        flag = "--" + k.replace("_", "-")
        if k == "points":
            v = ",".join(f"{m:g}/{a:g}" for m, a in v)
        elif k == "input_points":
            v = ",".join(f"{d:g}" for d in v)
        elif k == "tasks":
            v = ",".join(v)
        elif k == "text":
            v = " ".join(v)
        elif k == "new_tokens":
            flag = "--max-new-tokens"
        elif v is True:
            flags.append(flag)
            continue
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
    units = [row for row in rows if row.get("family") != "input"]
    attn_levels = sorted({row["attn_density"] for row in units}, reverse=True)
    out = {}

    def lines(ax, y, label_fmt, err=None):
        groups = [(label_fmt.format(a), [(row["mlp_density"], row) for row in units if row["attn_density"] == a])
                  for a in attn_levels]
        groups.append(("input-side (x: input channels kept)",
                       [(row["input_density"], row) for row in rows if row.get("family") == "input"]
                       + [(1.0, rows[0])]))
        for label, members in groups:
            pts = sorted(((x, y(row), row) for x, row in members if y(row) is not None), key=lambda p: p[0])
            if len(pts) < 2 and label.startswith("input-side"):
                continue  # only dense: no input-side points run
            if err is None:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            else:  # asymmetric bars: the interquartile range of the paired rounds
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=list(zip(*[err(p[2]) for p in pts])),
                            marker="o", capsize=3, label=label)
        ax.set_xlabel("density (MLP neurons computed; input-side: input channels kept)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    lines(axes[0], lambda row: row["ppl"], "attention density {:g}")
    axes[0].axhline(b["ppl"] * (1 + r["budget"]["max_ppl_increase"]), color="r", ls=":", lw=1, label="budget")
    axes[0].set_ylabel(f"perplexity ({b['ppl_tokens']} held-out tokens)")
    axes[0].set_title("perplexity vs density")
    lines(axes[1], lambda row: None if row["mean_acc"] is None else 100 * row["mean_acc"], "attention density {:g}")
    axes[1].set_ylabel(f"mean zero-shot accuracy, % ({', '.join(r['settings']['tasks'])})")
    axes[1].set_title(f"accuracy vs density ({r['settings']['limit']} examples per task, "
                      f"stderr ±{100 * b['zero_shot']['mean_acc_stderr']:.1f})"
                      + ("" if r["settings"]["thorough"] else ";\npoints inside the perplexity budget only"),
                      fontsize=10)
    fig.tight_layout()
    out["quality"] = figure_png(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    lines(axes[0], lambda row: row["decode_tokens_per_s"], "attention density {:g}")
    axes[0].set_ylabel("decode tokens/s (batch 1)")
    axes[0].set_title("decode speed vs density")
    iqr = lambda row: (0, 0) if row["speedup_spread"] is None else (
        row["speedup"] - row["speedup_spread"]["q1"], row["speedup_spread"]["q3"] - row["speedup"])
    lines(axes[1], lambda row: row["speedup"], "attention density {:g}", err=iqr)
    axes[1].axhline(1.0, color="k", ls="--", lw=1)
    axes[1].set_ylabel("speed-up over dense (paired rounds: median, IQR)")
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
    head = ["point", "decode tok/s", "dense tok/s (paired)", "speed-up", "speed-up IQR", "perplexity", "ppl +%",
            "mean acc %", "acc drop (pts)", "top-1 agree", "KL", "$ / M tokens", "Pareto", "in budget"]
    body = []
    for row in r["rows"]:
        sp = row["speedup_spread"]
        body.append([row["name"] + (" (recommended)" if row["recommended"] else ""),
                     f"{row['decode_tokens_per_s']:.1f}", f"{row['dense_tokens_per_s']:.1f}", f"{row['speedup']:.2f}x",
                     "-" if sp is None else f"{sp['q1']:.2f}-{sp['q3']:.2f}",
                     f"{row['ppl']:.2f}", f"{100 * row['ppl_increase']:+.1f}",
                     "-" if row["mean_acc"] is None else f"{100 * row['mean_acc']:.1f}",
                     "-" if row["acc_drop"] is None else f"{row['acc_drop']:+.1f}",
                     "-" if row.get("agreement") is None else f"{row['agreement']:.2f}",
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
    s, sp = r["settings"], r["speed"]
    pred = r["predictors"]
    calib = (f"predictors reused from {pred['folder']}" if pred["reused"] else
             f"predictors calibrated on {pred['calibration_tokens']} tokens, {s['epochs']} epochs, head predictors "
             + (f"tuned end to end on {s['tune_tokens']} tokens" if s["tune_tokens"] else "not tuned end to end "
                "(--thorough tunes them, which lowers the perplexity at attention-sparse points)"))
    stop = {"spread": f"stopped once every point inside the quality budget had an interquartile range of its "
                      f"paired ratios within {sp['max_spread']:.0%} of the median",
            "min_rounds": "no point inside the quality budget, so no rounds were added",
            "max_rounds": f"stopped at the cap of {s['max_rounds']} rounds with the spread still wider than "
                          f"{sp['max_spread']:.0%} for a point inside the budget: a busy machine; the speed-ups are "
                          "medians, see the IQR column"}[sp["stopped"]]
    return [
        f"Measured on {r['hardware']}; {r['date']}; command `{r['command']}`. The stages took "
        f"{r['stages_total_seconds']:.0f} s together when they ran; this invocation {r['wall_seconds']:.0f} s "
        f"wall ({sum(t['cached'] for t in r['stage_seconds'].values())} stages reused from the work folder).",
        f"Text: {r['text']}.",
        f"Mode: {'--thorough' if s['thorough'] else 'quick (the default; --thorough is the fuller run)'}; {calib}.",
        f"Speed: batch-1 greedy decode of {s['new_tokens']} tokens after a {s['prompt_tokens']}-token prompt, in "
        f"rounds in one process: a dense decode, every point in turn (the order reversed every other round), a "
        f"dense decode. Each sparse decode's ratio is to the dense rate interpolated at its place in the round, so "
        f"drifting load cancels; the speed-up is the median ratio, with its interquartile range. {sp['rounds']} "
        f"rounds (at least {s['rounds']}, at most {s['max_rounds']}): {stop}. Sparse decode uses the gathered path "
        "(prefill dense).",
        f"Quality: perplexity on the held-out tokens (windows of {s['window']}) and zero-shot accuracy "
        f"(lm-eval, {', '.join(s['tasks'])}, first {s['limit']} examples per task: a small set chosen to keep the "
        "pilot short, so accuracy differences under about two stderr are noise); sparse scoring uses masked "
        "execution (every token with its own selected units). "
        + ("Every point is scored." if s["thorough"] else "Zero-shot accuracy is scored only at points whose "
           "perplexity is inside the budget ('-' elsewhere: it could not change the decision)."),
        f"Guard figures (top-1 agreement, KL(dense||sparse)): every decode step of "
        f"{next((p['guard']['generations'] for p in r['points'] if p['guard']), 0)} generation(s) of "
        f"{s['new_tokens']} tokens also run dense; a checked step keeps the dense step's K/V, as the run-time guard "
        "does (input-side points have none: the guard checks neuron and head selectors).",
        f"Input-side points: in every projection of every layer a token's input channel counts where its score "
        f"({s['input_score']}) passes a threshold set so that a share D passes on the first 2048 calibration "
        "tokens; their speed is decoded on input-major weights (the neuron points' on output-major ones), the "
        "C++ row gather on a CPU.",
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
    cols = [0, 1, 3, 4, 5, 6, 7, 8, 9, 13]
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
