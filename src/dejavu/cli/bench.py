"""`dejavu bench decode | kernels | e2e`: decode speed in this process (CPU or GPU, dense vs
sparse, optionally lossless), the GPU gather kernels, the GPU end-to-end latency table."""
from __future__ import annotations

import sys

import torch

from ..errors import DejavuError
from .common import DTYPES, achieved, check_fits, load_from_args, sparse_decoder
from ..evaluate import text_stream


def run_decode(args):
    from ..bench import decode
    from ..kernels import cpu as cpu_kernels
    loaded = load_from_args(args)
    model = loaded.model
    check_fits(model, args.prompt_tokens, args.max_new_tokens)
    if loaded.tokenizer is not None:
        prompt = text_stream(loaded.tokenizer, None, "heldout", args.prompt_tokens).tolist()
    else:  # synthetic weights: any tokens will do
        prompt = torch.randint(0, model.cfg.vocab_size, (args.prompt_tokens,),
                               generator=torch.Generator().manual_seed(0)).tolist()
    where = torch.cuda.get_device_name(model.device) if model.device.type == "cuda" else decode.cpu_info()
    setup = (f"batch 1, prompt {len(prompt)} tokens, {args.max_new_tokens} new tokens, {args.rounds} rounds; "
             f"{where}; {loaded.name} {model.dtype}")
    def make_sparse():
        return sparse_decoder(model, args, loaded.tokenizer)

    if args.lossless:
        print(f"greedy decode, {setup}; draft: MLP density {args.mlp_density:g}, attention {args.attn_density:g}")
        rows = decode.bench_lossless(model, prompt, args.max_new_tokens, make_sparse, args.draft_tokens, args.rounds)
        print("\n" + decode.lossless_table(rows))
        return
    variants = {"dense": (None, False)}
    if args.sparse:
        make_sparse()  # missing or wrong predictors stop here, before the timing
        variants["sparse"] = (make_sparse, True)
        if model.device.type == "cpu" and cpu_kernels.available():
            variants["sparse, torch reference"] = (make_sparse, False)
    print(f"decode, {setup}")
    rates = decode.bench_decode(model, prompt, args.max_new_tokens, variants, args.rounds)
    print("\n" + decode.decode_table(decode.summarize(rates)))
    if args.sparse:
        s = make_sparse()
        decode.decode_rate(model, prompt, 8, s)
        if s.input_side:
            print(f"sparse: {achieved(s)}")
        else:
            names = [type(sel).__name__ if sel is not None else "none (dense)" for sel in (s.mlp, s.head_sel)]
            print(f"sparse: {achieved(s)} (selectors: {names[0]} for neurons, {names[1]} for heads)")


def need_gpu(what: str):
    if not torch.cuda.is_available():
        raise DejavuError(f"`dejavu bench {what}` times GPU kernels: it needs a CUDA GPU")


def run_kernels(args):
    from ..bench import kernels
    need_gpu("kernels")
    res = kernels.bench_kernels(args.shapes, args.densities, args.batches, DTYPES[args.dtype])
    print("\n" + kernels.kernels_markdown(res))
    if args.out:
        print("wrote " + ", ".join(map(str, kernels.save(res, args.out))))


def run_gated(args):
    from ..bench import gated
    need_gpu("gated")
    rows = []
    for shape, layers in args.shape or [("llama-3-8b", None), ("llama-3-70b", 40)]:
        rows += gated.bench_gated(shape, args.sparsity, args.prompt_tokens, args.max_new_tokens, layers,
                                  DTYPES[args.dtype])
    command = "dejavu " + " ".join(sys.argv[1:])
    print("\n" + gated.gated_markdown(rows, command))
    if args.out:
        print("wrote " + ", ".join(map(str, gated.save(rows, command, args.out))))


def run_e2e(args):
    from .. import tp
    from ..bench import e2e
    need_gpu("e2e")
    points = [(args.mlp_density, args.attn_density)] + args.point
    rank = tp.init(args.tp)
    res = e2e.bench_e2e(args.shape, args.prompt_tokens, args.max_new_tokens, points, DTYPES[args.dtype],
                        args.mlp_rank, args.head_rank, args.batches, hf_rows=not args.no_hf, tp=(rank, args.tp),
                        layers=args.layers, log=print if rank == 0 else lambda *a: None)
    if rank:
        return
    print("\n" + e2e.e2e_markdown(res))
    if args.out:
        print("wrote " + ", ".join(map(str, e2e.save(res, args.out))))
