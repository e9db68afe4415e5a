"""`dejavu pilot`, the run-time guard and the drift check, on the real SmolLM2 with tiny settings."""
import base64
import copy
import dataclasses
import io
import json
import re
import shlex
import shutil
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from dejavu import pilot
from dejavu.cli import main
from dejavu.errors import DejavuError
from dejavu.generate import generate_ids
from dejavu.guard import Guard, GuardSettings, drift
from dejavu.predictor import Predictors
from dejavu.selectors import PredictorSelector, default_selectors
from dejavu.sparse import Gathered

TINY = dict(calib_tokens=4096, epochs=1, eval_tokens=256, window=128, tasks=["copa"], limit=4, prompt_tokens=32,
            new_tokens=6, rounds=1, max_rounds=2, progress=False)  # the speed rounds' logic: a scripted test below


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pilot from scratch (it calibrates its own predictors): its result and work folder."""
    work = tmp_path_factory.mktemp("pilot")
    result = pilot.run_pilot(pilot.PilotSettings(work=str(work), points=[(0.5, 1.0), (0.5, 0.67)], input_points=[0.7],
                                                 **TINY))
    return result, work


@pytest.fixture(scope="module")
def model_and_preds(run):
    from dejavu import load
    m = load("smollm2-135m")
    return m, Predictors.load(run[0]["predictors"]["folder"], m.model)


class Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs).get("src", ""))


def test_report_is_self_contained_and_consistent(run):
    """Every plot is an inline PNG that decodes; the recommendation follows from the measured rows."""
    from PIL import Image
    result, work = run
    page = (work / "report.html").read_text()
    parser = Images()
    parser.feed(page)
    assert len(parser.srcs) == 4
    for src in parser.srcs:
        assert src.startswith("data:image/png;base64,")
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1], validate=True)))
        assert img.format == "PNG" and img.size[0] > 300
    saved = json.loads((work / "report.json").read_text())
    rec, rows = saved["recommendation"], saved["rows"]
    ok = [r for r in rows[1:] if r["ppl_increase"] <= saved["budget"]["max_ppl_increase"] and r["acc_drop"]
          is not None and r["acc_drop"] <= saved["budget"]["max_accuracy_drop"] and r["speedup"] >= pilot.MIN_SPEEDUP]
    assert rec["name"] == (max(ok, key=lambda r: r["speedup"])["name"] if ok else "dense")
    assert f"<b>{rec['name']}</b>" in page and f"{rec['speedup']:.2f}x" in page
    assert f"${saved['cost']['dense_per_million']:.3f}" in page
    assert f"${saved['cost']['recommended_per_million']:.3f}" in page
    assert saved["cpu"] in page and "dejavu pilot" in page  # what ran, on which hardware
    assert saved["speed"]["rounds"] == len(saved["baseline"]["decode_rounds"]) - 1  # a dense decode around each
    assert [p["label"] for p in saved["points"]] == ["MLP 0.5 / attn 1", "MLP 0.5 / attn 0.67", "input-side 0.7"]
    for p in saved["points"]:  # measured, not made up: paired rates and a real guard check (neurons and heads)
        assert p["decode_tokens_per_s"] > 0 and p["dense_tokens_per_s"] > 0
        if p["family"] == "input":  # thresholds set on calibration text; the held-out text kept about 0.7
            assert p["guard"] is None and len(p["thresholds"]) == 30
            assert all(0.55 < d < 0.85 for d in p["achieved_input_density"].values())
        else:
            assert p["guard"]["checked"] > 0
        assert len(p["ratios"]) == saved["speed"]["rounds"]
        assert p["ratios"] == pytest.approx([a / b for a, b in zip(p["decode_rounds"], p["paired_dense_rounds"])])
        assert p["speedup"] == pytest.approx(statistics.median(p["ratios"]))
        assert p["speedup_spread"]["min"] <= p["speedup_spread"]["q1"] <= p["speedup"] <= p["speedup_spread"]["q3"]
        # zero-shot is scored exactly where it can change the decision: perplexity inside the budget
        inside = p["ppl"] / saved["baseline"]["ppl"] - 1 <= saved["budget"]["max_ppl_increase"]
        assert (p["zero_shot"] is not None) == inside
    md = (work / "report.md").read_text()
    assert rec["flags"] in md and f"{saved['baseline']['ppl']:.2f}" in md


def test_resume_skips_finished_stages(run, tmp_path, monkeypatch):
    """A run interrupted in its second point keeps what it finished; the rerun measures only the rest."""
    settings = pilot.PilotSettings(work=str(tmp_path), points=[(0.5, 1.0), (0.4, 1.0)], max_ppl_increase=0.0,
                                   input_points=[], predictors=run[0]["predictors"]["folder"], **TINY)
    real_point, real_baseline = pilot.measure_quality, pilot.measure_baseline
    calls = []

    def interrupted(*a, **k):
        calls.append(a[6])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second point
        return real_point(*a, **k)
    monkeypatch.setattr(pilot, "measure_quality", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pilot.run_pilot(settings)
    done = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    assert set(done) == {"baseline.json", "calibration.json", "layers.json", "point-0.50-1.00.json"}
    assert not (tmp_path / "report.html").exists()

    calls.clear()
    monkeypatch.setattr(pilot, "measure_baseline", lambda *a, **k: pytest.fail("baseline measured again"))
    monkeypatch.setattr(pilot, "measure_quality", lambda *a, **k: calls.append(a[6]) or real_point(*a, **k))
    result = pilot.run_pilot(settings)
    assert calls == [(0.4, 1.0)]
    assert all((tmp_path / n).stat().st_mtime_ns == t for n, t in done.items())  # untouched
    assert [p["mlp_density"] for p in result["points"]] == [0.5, 0.4]
    assert (tmp_path / "report.html").exists()
    assert result["stage_seconds"]["baseline"]["cached"] and not result["stage_seconds"]["point-0.40-1.00"]["cached"]

    # no sparse point is inside a zero budget, so none was scored zero-shot; a looser budget scores them now
    assert all(p["zero_shot"] is None for p in result["points"])
    calls.clear()
    result = pilot.run_pilot(dataclasses.replace(settings, max_ppl_increase=1e9))
    assert calls == [(0.5, 1.0), (0.4, 1.0)] and all(p["zero_shot"] is not None for p in result["points"])


def python_snippet(report_md: str) -> str:
    return re.search(r"```python\n(.*?)```", report_md, re.S).group(1)


def run_as_pasted(code: str, cwd) -> str:
    """The snippet in a fresh interpreter, in a folder of its own (as a user pastes it)."""
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def parses_as_dejavu_command(line: str):
    from dejavu.cli import build_parser, check_args
    argv = shlex.split(line)
    assert argv[0] == "dejavu"
    args = build_parser().parse_args(argv[1:])
    check_args(args)  # the checks `dejavu` runs before the command (flags that do nothing are refused)
    return args


def test_use_it_runs_as_pasted(run, tmp_path):
    """The report's 'Use it' Python runs in a fresh interpreter, and its command parses with the
    real parser and carries the recommendation: predictors folder and densities (sparse), or none (dense)."""
    result, work = run
    s = pilot.PilotSettings(work=str(work), **TINY).resolved()
    folder = result["predictors"]["folder"]
    sparse = pilot.usage(dict(name="MLP 0.5 / attn 0.67", mlp_density=0.5, attn_density=0.67), result, s)
    dense = pilot.usage(dict(name="dense", mlp_density=1.0, attn_density=1.0), result, s)
    rec = result["recommendation"]
    md = (work / "report.md").read_text()
    assert python_snippet(md).strip() == rec["python"] and rec["flags"] in md

    args = parses_as_dejavu_command(sparse["flags"])
    assert args.sparse and args.guard and args.predictors == folder
    assert (args.mlp_density, args.attn_density) == (0.5, 0.67)
    args = parses_as_dejavu_command(dense["flags"])
    assert not args.sparse and not args.guard
    if rec["input_density"] is not None:
        assert parses_as_dejavu_command(rec["flags"]).input_density == rec["input_density"]
    elif rec["name"] != "dense":
        args = parses_as_dejavu_command(rec["flags"])
        assert (args.predictors, args.mlp_density, args.attn_density) == (folder, rec["mlp_density"],
                                                                          rec["attn_density"])

    inputs = pilot.usage(dict(name="input-side 0.7", mlp_density=None, attn_density=None, input_density=0.7), result, s)
    args = parses_as_dejavu_command(inputs["flags"])
    assert args.sparse and args.input_density == 0.7 and args.input_score == "teal" and not args.guard
    assert len(run_as_pasted(inputs["python"], tmp_path).strip()) > 0

    out = run_as_pasted(sparse["python"], tmp_path)
    assert re.search(r"guard: \d+ of \d+ steps checked", out) and "Predictors.load(" + repr(folder) in sparse["python"]
    assert len(run_as_pasted(dense["python"], tmp_path).strip()) > 0  # the dense text


def test_speed_rounds_stop_when_the_paired_ratios_agree():
    """paired_rounds on a scripted timer: steady ratios stop at the minimum rounds; a wide spread adds
    rounds up to the cap; drift during a round cancels out of the ratio (dense interpolated)."""
    def timer(rates):
        seq = iter(rates)
        return lambda name: next(seq)

    # dense speeds up by 1 tokens/s per decode; the point always runs at 1.5x the dense of its moment
    t = [0]

    def drifting(name):
        t[0] += 1
        return 10.0 + t[0] if name is None else 1.5 * (10.0 + t[0])
    steady = pilot.paired_rounds(drifting, ["a"], 3, 8, 0.05, ["a"])
    assert steady["rounds"] == 3 and steady["stopped"] == "spread"
    assert steady["points"]["a"]["ratios"] == pytest.approx([1.5, 1.5, 1.5])

    # ratios alternate 1.2 / 1.8 (dense fixed at 10): the IQR stays wide, so rounds run to the cap
    wide = pilot.paired_rounds(timer([10] + [12, 10, 18, 10] * 10), ["a"], 3, 6, 0.10, ["a"])
    assert wide["rounds"] == 6 and wide["stopped"] == "max_rounds"
    assert pilot.spread(wide["points"]["a"]["ratios"])["iqr"] > 0.10
    # the same timings with no point in the budget: nothing to decide, the minimum rounds only
    assert pilot.paired_rounds(timer([10] + [12, 10, 18, 10] * 10), ["a"], 3, 6, 0.10, [])["rounds"] == 3

    s = pilot.spread([1.0, 1.2, 1.4, 1.6, 3.0])
    assert (s["median"], s["q1"], s["q3"], s["min"], s["max"]) == pytest.approx((1.4, 1.2, 1.6, 1.0, 3.0))


def test_dtype_is_honoured(run, tmp_path):
    """--dtype bfloat16: the model runs in bfloat16, the float32 model's predictors are refused (their
    fingerprint differs), and the report and its command say so. The run reuses the float32 run's
    predictors stamped with the bfloat16 model's fingerprint: recording the 4096 calibration tokens
    in bfloat16 takes minutes on a CPU without bf16 matmuls."""
    from dejavu import load
    from dejavu.collect import model_fingerprint
    tiny = dict(TINY, eval_tokens=128, limit=2, new_tokens=4)
    fp32_preds = Path(run[0]["predictors"]["folder"])
    settings = dict(dtype=torch.bfloat16, points=[(0.5, 1.0)], input_points=[], **tiny)
    with pytest.raises(DejavuError, match="made for another model"):
        pilot.run_pilot(pilot.PilotSettings(work=str(tmp_path / "refused"), predictors=str(fp32_preds), **settings))
    stamped = tmp_path / "bf16_predictors"
    shutil.copytree(fp32_preds, stamped)
    meta = json.loads((stamped / "predictors.json").read_text())
    meta["fingerprint"] = model_fingerprint(load("smollm2-135m", dtype=torch.bfloat16).model)
    (stamped / "predictors.json").write_text(json.dumps(meta))
    result = pilot.run_pilot(pilot.PilotSettings(work=str(tmp_path / "pilot"), predictors=str(stamped), **settings))
    assert result["settings"]["dtype"] == "bfloat16" and result["hardware"].endswith("bfloat16")
    assert "--dtype bfloat16" in result["command"] and "--dtype bfloat16" in result["recommendation"]["flags"]
    assert "dtype=torch.bfloat16" in result["recommendation"]["python"]
    assert result["baseline"]["weights_mib"] < run[0]["baseline"]["weights_mib"] * 0.6  # 2 bytes a weight
    with pytest.raises(DejavuError, match="--dtype int8"):
        pilot.run_pilot(pilot.PilotSettings(work=str(tmp_path), dtype="int8", **tiny))


def shuffled(preds: Predictors) -> Predictors:
    """The same predictors with every weight tensor's entries permuted: confidently wrong."""
    bad = copy.deepcopy(preds)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for net in bad.mlp + bad.heads:
            for p in net.parameters():
                p.copy_(p.flatten()[torch.randperm(p.numel(), generator=g)].view_as(p))
    return bad


def test_bad_predictor_trips_the_guard_and_the_output_is_dense(model_and_preds):
    m, preds = model_and_preds
    model = m.model
    prompt = [m.tokenizer("The history of the city of Paris begins").input_ids]
    dense = generate_ids(model, prompt, 24)
    bad = PredictorSelector(shuffled(preds))
    unguarded = generate_ids(model, prompt, 24, sparsity=Gathered(model, bad, bad, 0.3, 0.34))
    assert unguarded != dense  # the bad predictor really breaks the output
    guard = Guard(model, bad, bad, 0.3, 0.34)
    assert generate_ids(model, prompt, 24, guard=guard) == dense
    g = guard.metrics
    assert g.fallbacks == 1 and g.trips == 1 and g.dense_now and g.agreement_rolling < 0.5
    assert g.mlp_recall_mean < 0.5 and g.kl_mean > 1.0

    raising = Guard(model, bad, bad, 0.3, 0.34, GuardSettings(on_trip="raise", check_every=1))
    generate_ids(model, prompt, 24, guard=raising)
    assert raising.metrics.raises >= 1  # densities stepped up before any fallback
    assert raising.metrics.dense_now or raising.metrics.mlp_density > 0.3


def test_good_predictors_pass_the_guard_and_checks_follow_the_schedule(model_and_preds):
    m, preds = model_and_preds
    neurons, heads = default_selectors(m.model, preds)
    guard = Guard(m.model, neurons, heads, 0.8, None, GuardSettings(check_every=4, warmup=2))
    generate_ids(m.model, [m.tokenizer("The history of the city of Paris begins").input_ids], 21, guard=guard)
    g = guard.metrics
    assert g.steps == 20 and g.checked == 2 + 5  # steps 1, 2 (warm-up) and 4, 8, 12, 16, 20
    assert g.fallbacks == 0 and g.sparse_steps == 20 and g.agreement_mean >= 0.5
    assert g.attn_recall_mean is None and 0.5 < g.mlp_recall_mean <= 1.0
    assert set(g.as_dict()) >= {"checked", "agreement_rolling", "kl_mean", "fallbacks"}


def test_drift_on_code_says_recalibrate(model_and_preds):
    """Python source is far from the Wikipedia calibration text: the head predictors find fewer
    of the oracle's heads and sparse perplexity falls further behind dense."""
    import dejavu.model
    from dejavu.evaluate import text_stream
    from dejavu.evaluate import token_stream
    m, preds = model_and_preds
    neurons, heads = default_selectors(m.model, preds)
    code = token_stream(m.tokenizer, [Path(dejavu.model.__file__).read_text()], 512)
    wiki = text_stream(m.tokenizer, None, "heldout", 512)
    report = drift(m.model, neurons, heads, code, wiki, 0.5, 0.67)
    assert report.new.attn_recall < report.reference.attn_recall
    assert report.new.ppl_gap > report.reference.ppl_gap + report.max_gap_increase
    assert report.verdict == "recalibrate" and "verdict: recalibrate" in report.summary()
    same = drift(m.model, neurons, heads, wiki[:256], wiki[:256], 0.5, 0.67)
    assert same.verdict == "fine" and same.new == same.reference


def test_generate_prints_guard_figures(run, capsys):
    folder = run[0]["predictors"]["folder"]
    assert main(["generate", "--sparse", "--predictors", folder, "--conservative", "--prompt", "Paris is",
                 "--max-new-tokens", "6"]) == 0
    err = capsys.readouterr().err
    assert re.search(r"guard: \d+ of 5 steps checked against dense; top-1 agreement", err)


@pytest.mark.parametrize("argv,msg", [
    (["pilot", "--points", "0.5"], "each point is MLP/ATTN"),
    (["pilot", "--points", "1/1"], "is dense"),
    (["pilot", "--points", "0.5/1.5"], "attention density must be in (0, 1]"),
    (["pilot", "--tasks", "nope"], "unknown task"),
    (["drift", "--text", "/nonexistent"], "does not exist"),
    (["generate", "--sparse", "--predictors", "synthetic", "--guard", "--min-agreement", "2"], "min_agreement"),
])
def test_bad_input_is_refused_clearly(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
