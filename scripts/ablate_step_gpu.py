"""What each small kernel of a decode step costs on the critical path: the CUDA-graph step's ms/token
with a kernel removed (its output replaced by a buffer saved from a real call, so the kernels after
it see real-looking values and the same channels pass). Upper bounds for fusing that kernel away.

    PYTHONPATH=src python scripts/ablate_step_gpu.py --shape llama-3-8b --input-sparsity 0.5
"""
import argparse
import statistics

import torch

from dejavu import engine
from dejavu.kernels import triton_attention, triton_norm
from dejavu.load import load
from dejavu.selectors import InputSelector
from dejavu.sparse import InputSparsity, calibrate_thresholds

ap = argparse.ArgumentParser()
ap.add_argument("--shape", default="llama-3-8b")
ap.add_argument("--input-sparsity", type=float, default=0.5)
ap.add_argument("--gen", type=int, default=128)
args = ap.parse_args()

model = load(args.shape, dtype=torch.bfloat16, device="cuda", max_seq_len=300).model
prompt = torch.randint(0, model.cfg.vocab_size, (1, 128), device="cuda")
real_norm, real_attend, real_n_splits = triton_norm.norm, triton_attention._attend, triton_attention._n_splits
saved: dict = {}


def saved_norm(x, weight, bias, eps, rms, residual=None):
    key = ("norm", x.shape, residual is None)
    if key not in saved:
        saved[key] = real_norm(x, weight, bias, eps, rms, residual)
    return saved[key]


def saved_attention(*a, **k):
    key = ("attn", a[0].shape)
    if key not in saved:
        saved[key] = real_attend(*a, **k)
    return saved[key]


def split_only(q, k_cache, v_cache, head_idx, n_heads, length, key_valid, scale, n_splits, block_s, new_token=None):
    """_attend without its reduce kernel: the split kernel runs, the output is a saved real one."""
    key = ("attn", q.shape)
    if key not in saved:
        saved[key] = real_attend(q, k_cache, v_cache, head_idx, n_heads, length, key_valid, scale, n_splits, block_s,
                                 new_token)
        return saved[key]
    triton_attention.launcher = lambda kernel: (real_launcher(kernel) if kernel is triton_attention._decode_split_kernel
                                                else _NoLaunch())
    try:
        real_attend(q, k_cache, v_cache, head_idx, n_heads, length, key_valid, scale, n_splits, block_s, new_token)
    finally:
        triton_attention.launcher = real_launcher
    return saved[key]


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *a, **k: None


real_launcher = triton_attention.launcher
ABLATIONS = {
    "none": {},
    "attention in one split": {(triton_attention, "_n_splits"): lambda *a: 1},
    "no norms": {(triton_norm, "norm"): saved_norm},
    "no attention reduce": {(triton_attention, "_attend"): split_only},
    "no attention": {(triton_attention, "_attend"): saved_attention},
}


def timed(make_sparsity) -> float:
    dec = engine.GraphDecoder(model, 1, 128 + args.gen + 4, make_sparsity())
    dec.prefill(prompt)
    return statistics.median(dec.decode(args.gen)[1])


def input_side():
    sel = InputSelector(model, "teal")
    return InputSparsity(model, sel, calibrate_thresholds(model, sel, prompt, 1 - args.input_sparsity), gathered=True)


variants = {"dense (cuBLAS)": lambda: None}
for layout in ("output-major", "input-major"):
    if layout == "input-major":
        model.to_input_major()
        variants = {"dense (input-major)": lambda: None, f"teal {args.input_sparsity:g}": input_side}
    for name, make in variants.items():
        for rnd in range(2):
            for ablation, patches in ABLATIONS.items():
                saved.clear()
                for (mod, attr), fn in patches.items():
                    setattr(mod, attr, fn)
                try:
                    ms = timed(make)
                finally:
                    triton_norm.norm, triton_attention._attend = real_norm, real_attend
                    triton_attention._n_splits = real_n_splits
                print(f"{args.shape} {name:<22} round {rnd}  {ablation:<32} {ms:6.3f} ms/token", flush=True)
