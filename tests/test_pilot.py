"""`dejavu pilot`, the run-time guard and the drift check, on the real SmolLM2 with tiny settings."""
import base64
import copy
import io
import json
import re
from html.parser import HTMLParser

import pytest
import torch

from dejavu import pilot
from dejavu.cli import main
from dejavu.generate import generate_ids
from dejavu.guard import Guard, GuardSettings, drift
from dejavu.predictor import PredictorSelector, Predictors, default_selectors
from dejavu.sparse import Gathered

TINY = dict(calib_tokens=4096, epochs=1, eval_tokens=256, window=128, tasks=["copa"], limit=4, prompt_tokens=32,
            new_tokens=6, rounds=1, progress=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny pilot from scratch (it calibrates its own predictors): its result and work folder."""
    work = tmp_path_factory.mktemp("pilot")
    result = pilot.run_pilot(pilot.PilotSettings(work=str(work), points=[(0.5, 1.0), (0.5, 0.67)], **TINY))
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
    ok = [r for r in rows[1:] if r["ppl_increase"] <= saved["budget"]["max_ppl_increase"]
          and r["acc_drop"] <= saved["budget"]["max_accuracy_drop"] and r["speedup"] >= pilot.MIN_SPEEDUP]
    assert rec["name"] == (max(ok, key=lambda r: r["speedup"])["name"] if ok else "dense")
    assert f"<b>{rec['name']}</b>" in page and f"{rec['speedup']:.2f}x" in page
    assert f"${saved['cost']['dense_per_million']:.3f}" in page
    assert f"${saved['cost']['recommended_per_million']:.3f}" in page
    assert saved["cpu"] in page and "dejavu pilot" in page  # what ran, on which hardware
    for p in saved["points"]:  # measured, not made up: paired rates and a real guard check
        assert p["decode_tokens_per_s"] > 0 and p["dense_tokens_per_s"] > 0 and p["guard"]["checked"] > 0
        assert p["speedup"] == pytest.approx(p["decode_tokens_per_s"] / p["dense_tokens_per_s"])
    md = (work / "report.md").read_text()
    assert rec["flags"] in md and f"{saved['baseline']['ppl']:.2f}" in md


def test_resume_skips_finished_stages(run, tmp_path, monkeypatch):
    """A run interrupted in its second point keeps what it finished; the rerun measures only the rest."""
    settings = pilot.PilotSettings(work=str(tmp_path), points=[(0.5, 1.0), (0.4, 1.0)],
                                   predictors=run[0]["predictors"]["folder"], **TINY)
    real_point, real_baseline = pilot.measure_point, pilot.measure_baseline
    calls = []

    def interrupted(*a, **k):
        calls.append(a[6])
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the second point
        return real_point(*a, **k)
    monkeypatch.setattr(pilot, "measure_point", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pilot.run_pilot(settings)
    done = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.json")}
    assert set(done) == {"baseline.json", "calibration.json", "layers.json", "point-0.50-1.00.json"}
    assert not (tmp_path / "report.html").exists()

    calls.clear()
    monkeypatch.setattr(pilot, "measure_baseline", lambda *a, **k: pytest.fail("baseline measured again"))
    monkeypatch.setattr(pilot, "measure_point", lambda *a, **k: calls.append(a[6]) or real_point(*a, **k))
    result = pilot.run_pilot(settings)
    assert calls == [(0.4, 1.0)]
    assert all((tmp_path / n).stat().st_mtime_ns == t for n, t in done.items())  # untouched
    assert [p["mlp_density"] for p in result["points"]] == [0.5, 0.4]
    assert (tmp_path / "report.html").exists()
    assert result["stage_seconds"]["baseline"]["cached"] and not result["stage_seconds"]["point-0.40-1.00"]["cached"]


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
    from pathlib import Path

    import dejavu.model
    from dejavu.cli import text_stream
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
