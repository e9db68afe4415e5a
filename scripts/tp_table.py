"""results/gpu/tp_decode.json and .md: tensor-parallel decode, from the runs in one folder.

    python scripts/tp_table.py results/gpu/tp_h200x2 --out results/gpu

Reads the folder's `bench e2e --tp N` JSONs (e2e_<shape>_tp<N>[_24layers][_nccl].json; `_nccl`:
run with DEJAVU_ALL_REDUCE=nccl) and `dejavu generate --tp N` logs (generate_<shape>_tp<N>_<variant>.log,
the line generate prints on stderr). Each row: shape, layers, command, variant, all-reduce, ms per
token, against the same command's dense row, card."""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

GENERATE_LINE = re.compile(r"^\[(?P<shape>\S+) on cuda:0.*\((?P<ms>[\d.]+) ms per step\)\]", re.M)


def e2e_rows(path: Path) -> list[dict]:
    res = json.loads(path.read_text())
    all_reduce = "nccl" if path.stem.endswith("_nccl") else "one-shot"
    rows = []
    for r in res["rows"]:
        if r["prompt"] != 128 or r["variant"].startswith("  ") or "transformers" in r["variant"]:
            continue  # the ablations (predictors inline, K/V for every head) stay in the e2e tables
        variant = "dense" if "dense" in r["variant"] else r["variant"].removeprefix("dejavu ").split(", CUDA")[0]
        rows.append(dict(shape=res["shape"], layers="all" if res["layers"] == res["full_layers"] else f"{res['layers']} of {res['full_layers']}", tp=res["tp"],
                         command="bench e2e", variant=variant, all_reduce=all_reduce,
                         ms_per_token=round(r["ms_per_token"], 2), card=res["card"]))
    return rows


def generate_rows(path: Path, card: str) -> list[dict]:
    m = GENERATE_LINE.search(path.read_text())
    if m is None:
        return []
    stem = path.stem.removeprefix("generate_")
    shape, tp, variant = re.fullmatch(r"(.+)_tp(\d+)_(\w+)", stem).groups()
    variant = {"dense": "dense", "sparse": "sparse MLP 0.1 / attention 0.42",
               "input50": "input-side 0.5 (teal)"}.get(variant, variant)
    return [dict(shape=shape, layers="all", tp=int(tp), command="generate", variant=variant, all_reduce="one-shot",
                 ms_per_token=float(m["ms"]), card=card)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--out", type=Path, default=Path("results/gpu"))
    args = ap.parse_args()
    rows = []
    for p in sorted(args.folder.glob("e2e_*_tp[2-8]*.json")):
        rows += e2e_rows(p)
    card = rows[0]["card"] if rows else "unknown"
    for p in sorted(args.folder.glob("generate_*_tp*.log")):
        rows += generate_rows(p, card)
    for r in rows:  # against the dense row of the same shape, command and all-reduce
        dense = next(d for d in rows if d["variant"] == "dense" and
                     all(d[k] == r[k] for k in ("shape", "layers", "command", "all_reduce")))
        r["vs_dense"] = round(dense["ms_per_token"] / r["ms_per_token"], 2)
    (args.out / "tp_decode.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [f"# Tensor-parallel decode, batch 1, prompt 128, bf16, synthetic weights ({card})", "",
             f"`python scripts/tp_table.py {args.folder} --out {args.out}`; the runs' commands are in "
             "results/README.md. One-shot: kernels/triton_allreduce.py; nccl: the same run with "
             "DEJAVU_ALL_REDUCE=nccl.", "",
             "| shape | layers | GPUs | command | variant | all-reduce | ms/token | vs dense |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['layers']} | {r['tp']} | {r['command']} | {r['variant']} | {r['all_reduce']} | "
              f"{r['ms_per_token']} | {r['vs_dense']}x |" for r in rows]
    (args.out / "tp_decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
