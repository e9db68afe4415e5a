"""`dejavu ...`: the command line."""
from __future__ import annotations

import argparse
import sys
import time

import torch

from .load import DEFAULT_MODEL, PRESETS, DejavuError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'{DEFAULT_MODEL}' (packaged, the default), a local Hugging Face folder, a hub id "
                        f"already in the local cache, or a shape preset with synthetic weights: {', '.join(PRESETS)}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype (default: float32 on cpu, bfloat16 on cuda and for presets)")


def load_from_args(args):
    from transformers.utils import logging as hf_logging
    from .load import load
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DejavuError(f"--device {device}: no CUDA GPU is visible here; use --device cpu")
    low_precision = device != "cpu" or args.model in PRESETS  # presets are for GPU speed work
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if low_precision else torch.float32)
    return load(args.model, dtype=dtype, device=device)


def need_tokenizer(loaded):
    if loaded.tokenizer is None:
        raise DejavuError(f"--model {loaded.name} has synthetic weights and no tokenizer; text commands need a "
                          f"real model (--model {DEFAULT_MODEL} or a folder)")
    return loaded.tokenizer


def cmd_generate(args):
    from .generate import GenerationStats, generate
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    prompts = args.prompt or ["The history of the city of Paris"]
    if any(not p.strip() for p in prompts):
        raise DejavuError("--prompt is empty: give some text to continue")
    if args.chat:
        if tok.chat_template is None:
            raise DejavuError(f"--chat: {loaded.name} has no chat template; drop --chat")
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in prompts]
    else:
        ids = [tok(p).input_ids for p in prompts]
    stats = GenerationStats()
    steps = generate(loaded.model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id or 0, seed=args.seed, stats=stats)
    outs: list[list[int]] = [[] for _ in prompts]
    printed = ""
    for nxt in steps:
        for row, t in zip(outs, nxt.tolist()):
            if not row or row[-1] != tok.eos_token_id:
                row.append(t)
        if len(prompts) == 1:  # stream a single completion as it comes
            text = tok.decode(outs[0], skip_special_tokens=True)
            if not args.chat and not printed:
                print(prompts[0], end="")
            print(text[len(printed):], end="", flush=True)
            printed = text
    if len(prompts) == 1:
        print()
    else:
        for p, row in zip(prompts, outs):
            print(f"--- {p}\n{p if not args.chat else ''}{tok.decode(row, skip_special_tokens=True)}\n")
    print(f"[{loaded.name} on {loaded.model.device}, {loaded.model.dtype}: prompt {stats.prompt_tokens} tokens "
          f"in {stats.prefill_seconds * 1e3:.0f} ms, {stats.new_tokens} new tokens x {stats.batch}, "
          f"decode {stats.decode_tokens_per_s:.1f} tokens/s]", file=sys.stderr)


def cmd_info(args):
    from .model import param_bytes
    if args.model in PRESETS and args.device == "auto":
        args.device = "meta"  # shapes and bytes only: allocate nothing for synthetic presets
    loaded = load_from_args(args)
    cfg = loaded.model.cfg
    print(f"model      {loaded.name}")
    print(f"source     {loaded.source}")
    print(f"loaded in  {loaded.load_seconds:.2f} s on {loaded.model.device}, {loaded.model.dtype}")
    print(f"family     {cfg.family}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} query heads / "
          f"{cfg.n_kv_heads} KV heads of {cfg.head_dim}, MLP {cfg.d_ff} "
          f"({'gated ' + cfg.act if cfg.gated else cfg.act}), vocab {cfg.vocab_size}, context {cfg.max_seq_len}")
    print(f"           norm {cfg.norm}, positions {cfg.positions}, tied embeddings {cfg.tie_embeddings}")
    parts = param_bytes(loaded.model)
    for k, v in parts.items():
        note = "  (tied with the embeddings)" if k == "lm_head" and cfg.tie_embeddings else ""
        print(f"  {k:<11} {v / 2**20:10.1f} MiB  {v / parts['total']:6.1%}{note}")


def cmd_perplexity(args):
    from .data import read_text_files, wiki_split
    from .evaluate import perplexity, token_stream
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    docs = read_text_files(args.text) if args.text else wiki_split("heldout")
    stream = token_stream(tok, docs, args.max_tokens)
    t = time.perf_counter()
    r = perplexity(loaded.model, stream, window=args.window)
    where = ", ".join(args.text) if args.text else "held-out Wikipedia articles (gensim test data)"
    print(f"perplexity {r.ppl:.3f} over {r.tokens} predicted tokens ({where}; windows of {r.window}) "
          f"in {time.perf_counter() - t:.1f} s")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dejavu", description="Contextual sparsity (Deja Vu) for LLM inference.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="stream text from a model", description="Stream a completion.")
    add_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="model shape and bytes per part",
                       description="Print the model's shape, parameter bytes per part and where it came from.")
    add_model_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("perplexity", help="perplexity on held-out text",
                       description="Perplexity of the dense model on held-out Wikipedia text or your files.")
    add_model_args(p)
    p.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files (default: held-out Wikipedia)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of text to score (default 16384)")
    p.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    p.set_defaults(func=cmd_perplexity)
    return ap


def check_args(args):
    for name in ("max_new_tokens", "max_tokens", "window"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise DejavuError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if getattr(args, "temperature", 0) < 0:
        raise DejavuError(f"--temperature must be >= 0, got {args.temperature}")
    top_p = getattr(args, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise DejavuError(f"--top-p must be in (0, 1], got {top_p}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        args.func(args)
    except (DejavuError, ValueError) as e:
        print(f"dejavu: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("\ndejavu: interrupted", file=sys.stderr)
        return 130
    return 0
