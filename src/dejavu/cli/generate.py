"""`dejavu generate`: stream a completion, dense, sparse (optionally guarded) or lossless."""
from __future__ import annotations

import sys

from ..errors import DejavuError
from .common import achieved, check_fits, guard_from_args, load_from_args, need_tokenizer, sparse_decoder

DEFAULT_PROMPT = "The history of the city of Paris"


def run(args):
    from ..generate import GenerationStats, generate
    loaded = load_from_args(args)
    tok = need_tokenizer(loaded)
    prompts = args.prompt or [DEFAULT_PROMPT]
    if any(not p.strip() for p in prompts):
        raise DejavuError("--prompt is empty: give some text to continue")
    if args.chat:
        if tok.chat_template is None:
            raise DejavuError(f"--chat: {loaded.name} has no chat template; drop --chat")
        ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in prompts]
    else:
        ids = [tok(p).input_ids for p in prompts]
    if any(not i for i in ids):
        raise DejavuError("a --prompt encodes to no tokens: give some text to continue")
    check_fits(loaded.model, max(map(len, ids)), args.max_new_tokens)
    if args.lossless and len(ids) > 1:
        raise DejavuError(f"--lossless decodes one prompt at a time, got {len(ids)} --prompt: give one")
    stats = GenerationStats()
    sparsity = sparse_decoder(loaded.model, args) if args.sparse or args.lossless else None
    guard = guard_from_args(loaded.model, sparsity, args) if args.sparse and not args.lossless else None
    if args.lossless:
        from ..speculative import generate_lossless
        steps = generate_lossless(loaded.model, ids, args.max_new_tokens, sparsity, args.temperature, args.top_p,
                                  loaded.stop_ids, args.seed, stats, args.draft_tokens)
    else:
        steps = generate(loaded.model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         eos_id=loaded.stop_ids, pad_id=tok.pad_token_id or 0, seed=args.seed, stats=stats,
                         sparsity=None if guard else sparsity, guard=guard)
    outs: list[list[int]] = [[] for _ in prompts]
    printed = ""
    for nxt in steps:
        for row, t in zip(outs, nxt.tolist()):
            if not row or row[-1] not in loaded.stop_ids:
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
    if guard is not None:
        print(f"[{guard.metrics.summary()}]", file=sys.stderr)
    elif stats.lossless is not None:
        s = stats.lossless
        print(f"[lossless: dense output; {s.accepted}/{s.drafted} sparse drafts kept ({s.acceptance_rate:.1%}; "
              f"per checked draft {s.alpha:.1%}), {s.rounds} rounds, mean draft length {s.mean_draft_length:.2f}]",
              file=sys.stderr)
    elif sparsity is not None:
        if sparsity.density("mlp") is None and sparsity.density("attn") is None:
            # the first new token ended the text (no decode step), or both densities are 1
            print("[sparse decode: no part ran sparse (no decode step, or both densities 1); prefill ran dense]",
                  file=sys.stderr)
        else:
            print(f"[sparse decode: achieved {achieved(sparsity)} (union over the batch); prefill ran dense]",
                  file=sys.stderr)
