"""What users get on the GPU: `dejavu generate` (dense and sparse) against `dejavu bench e2e`,
same shapes, same card, one run. Writes runtime.json and runtime.md to the folder given.

    PYTHONPATH=src python scripts/runtime_table.py OUT_DIR [--shapes opt-30b,opt-66b] [--input-shapes llama-3-8b]

Synthetic weights (speed only), bf16, batch 1, prompt 128 tokens, 256 new tokens, sparse at
MLP 0.1 / attention 0.42 with untrained predictors of ranks 256 (MLP) and 224 (heads). Gated
shapes (--input-shapes): `dejavu generate` dense and with input-side sparsity (teal) at input
densities 0.6 and 0.5 (`dejavu bench gated` times the same step: results/gpu/gated.json).
"""
import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

PROMPT, NEW, MLP, ATTN, RANKS = 128, 256, 0.1, 0.42, (256, 224)
INPUT_DENSITIES = (0.6, 0.5)


def dejavu(*argv: str) -> str:
    cmd = [sys.executable, "-m", "dejavu", *argv]
    print("$ dejavu " + " ".join(argv), flush=True)
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"failed ({run.returncode}):\n{run.stderr[-3000:]}")
    print(run.stderr.strip()[-600:], flush=True)
    return run.stdout + run.stderr


def generate_row(shape: str, sparse: bool, card: str, input_density: float | None = None) -> dict:
    argv = ["generate", "--model", shape, "--prompt-tokens", str(PROMPT), "--max-new-tokens", str(NEW)]
    if input_density is not None:
        argv += ["--sparse", "--input-density", str(input_density)]
    elif sparse:
        argv += ["--sparse", "--predictors", f"synthetic:{RANKS[0]},{RANKS[1]}", "--mlp-density", str(MLP),
                 "--attn-density", str(ATTN)]
    out = dejavu(*argv)
    ms = float(re.search(r"\(([\d.]+) ms per step\)", out).group(1))
    family = "dense" if not (sparse or input_density) else ("input-side teal" if input_density else "neurons + heads")
    return dict(shape=shape, command="generate", variant="sparse" if sparse or input_density else "dense",
                family=family, input_density=input_density, ms_per_token=ms, tokens_per_s=1e3 / ms, card=card,
                argv="dejavu " + " ".join(argv))


def bench_rows(shape: str, out_dir: Path) -> list[dict]:
    argv = ["bench", "e2e", "--shape", shape, "--prompt-tokens", str(PROMPT), "--max-new-tokens", str(NEW),
            "--mlp-density", str(MLP), "--attn-density", str(ATTN), "--mlp-rank", str(RANKS[0]),
            "--head-rank", str(RANKS[1]), "--no-hf", "--batches", "1", "--out", str(out_dir)]
    dejavu(*argv)
    res = json.loads((out_dir / f"e2e_{shape}.json").read_text())
    rows = []
    for r in res["rows"]:
        if r["variant"].startswith("dejavu dense"):
            variant = "dense"
        elif r["variant"].startswith("dejavu sparse"):
            variant = "sparse"
        else:
            continue
        rows.append(dict(shape=shape, command="bench e2e", variant=variant, ms_per_token=r["ms_per_token"],
                         tokens_per_s=1e3 / r["ms_per_token"], roofline_frac=r.get("roofline_frac"),
                         card=res["card"], argv="dejavu " + " ".join(argv)))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| shape | command | variant | family | ms/token | tokens/s | card |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        family = r.get("family", "") + (f" {r['input_density']:g}" if r.get("input_density") else "")
        lines.append(f"| {r['shape']} | {r['command']} | {r['variant']} | {family} | {r['ms_per_token']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['card']} |")
    by = {(r["shape"], r["command"], r["variant"]): r["ms_per_token"] for r in rows}
    lines.append("")
    for shape in dict.fromkeys(r["shape"] for r in rows):
        g_d = by.get((shape, "generate", "dense"))
        for r in rows:
            if r["shape"] == shape and r.get("input_density") and g_d:
                lines.append(f"- {shape}: `dejavu generate` input-side at density {r['input_density']:g} is "
                             f"{g_d / r['ms_per_token']:.2f}x `dejavu generate` dense")
        g_s = next((r["ms_per_token"] for r in rows if r["shape"] == shape and r["command"] == "generate"
                    and r["family"] == "neurons + heads"), None)
        b_s = by.get((shape, "bench e2e", "sparse"))
        if g_d and g_s:
            lines.append(f"- {shape}: `dejavu generate` sparse is {g_d / g_s:.2f}x `dejavu generate` dense"
                         + (f"; generate's sparse ms/token is {g_s / b_s - 1:+.1%} against bench e2e's" if b_s else ""))
    lines.append("\nCommands:\n")
    lines += [f"    {a}" for a in dict.fromkeys(r["argv"] for r in rows)]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shapes", default="opt-30b,opt-66b")
    ap.add_argument("--input-shapes", default="", help="gated shapes for the input-side generate rows")
    args = ap.parse_args()
    import torch
    card = torch.cuda.get_device_name()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for shape in filter(None, args.shapes.split(",")):
        rows += [generate_row(shape, False, card), generate_row(shape, True, card)]
        rows += bench_rows(shape, args.out)
        (args.out / "runtime.json").write_text(json.dumps(rows, indent=1))
        (args.out / "runtime.md").write_text(markdown(rows))
    for shape in filter(None, args.input_shapes.split(",")):
        rows += [generate_row(shape, False, card)] + [generate_row(shape, False, card, d) for d in INPUT_DENSITIES]
        (args.out / "runtime.json").write_text(json.dumps(rows, indent=1))
        (args.out / "runtime.md").write_text(markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()
