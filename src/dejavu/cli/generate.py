"""`dejavu generate`: stream a completion, dense, sparse (optionally guarded) or lossless."""
from __future__ import annotations

import sys

from ..detokenize import Detokenizer
from ..errors import DejavuError
from .common import achieved, check_fits, guard_from_args, load_from_args, need_tokenizer, sparse_decoder

DEFAULT_PROMPT = "The history of the city of Paris"


def run(args):
    from ..generate import GenerationStats
    loaded = load_from_args(args)
    if args.tp > 1 and args.temperature > 0 and args.seed is None:
        import random
        from ..tp import same_on_every_rank
        args.seed = same_on_every_rank(random.randrange(2 ** 62))  # the ranks must sample alike
    if args.prompt_tokens is not None:
        return run_prompt_tokens(loaded, args)
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
    steps, sparsity, guard = decode_steps(loaded, ids, args, stats, tok.pad_token_id or 0)
    outs: list[list[int]] = [[] for _ in prompts]
    stream = Detokenizer(tok, frozenset(loaded.stop_ids))  # a single completion streams as it comes
    if len(prompts) == 1 and not args.chat:
        print(prompts[0], end="")
    for nxt in steps:
        for row, t in zip(outs, nxt.tolist()):
            if not row or row[-1] not in loaded.stop_ids:
                row.append(t)
                if len(prompts) == 1:
                    shown = len(stream.text)
                    stream.add(t)
                    print(stream.text[shown:], end="", flush=True)
    if len(prompts) == 1:
        shown = len(stream.text)
        stream.flush()
        print(stream.text[shown:])
    else:
        for p, row in zip(prompts, outs):
            print(f"--- {p}\n{p if not args.chat else ''}{tok.decode(row, skip_special_tokens=True)}\n")
    report(loaded, stats, sparsity, guard)


def decode_steps(loaded, ids, args, stats, pad_id: int = 0):
    """(the generator of new tokens, the sparse decoder or None, the guard or None) from the flags."""
    from ..generate import generate
    sparsity = sparse_decoder(loaded.model, args, loaded.tokenizer) if args.sparse or args.lossless else None
    guard = guard_from_args(loaded.model, sparsity, args) if args.sparse and not args.lossless else None
    if args.lossless:
        from ..speculative import generate_lossless
        steps = generate_lossless(loaded.model, ids, args.max_new_tokens, sparsity, args.temperature, args.top_p,
                                  loaded.stop_ids, args.seed, stats, args.draft_tokens)
    else:
        steps = generate(loaded.model, ids, args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                         eos_id=loaded.stop_ids, pad_id=pad_id, seed=args.seed, stats=stats,
                         sparsity=None if guard else sparsity, guard=guard)
    return steps, sparsity, guard


def run_prompt_tokens(loaded, args):
    """--prompt-tokens N: N tokens of held-out text (or random ids: synthetic weights), the new
    tokens' count and the timings. What `dejavu generate` delivers on a shape preset."""
    import torch
    from ..generate import GenerationStats
    from ..evaluate import text_stream
    model = loaded.model
    if args.prompt_tokens < 1:
        raise DejavuError(f"--prompt-tokens must be at least 1, got {args.prompt_tokens}")
    check_fits(model, args.prompt_tokens, args.max_new_tokens)
    if loaded.tokenizer is not None:
        ids = text_stream(loaded.tokenizer, None, "heldout", args.prompt_tokens).tolist()
    else:
        ids = torch.randint(0, model.cfg.vocab_size, (args.prompt_tokens,),
                            generator=torch.Generator().manual_seed(0)).tolist()
    stats = GenerationStats()
    steps, sparsity, guard = decode_steps(loaded, [ids], args, stats)
    out = [int(t) for t in steps]
    if loaded.tokenizer is not None:
        print(loaded.tokenizer.decode(ids + out, skip_special_tokens=True))
    else:
        print(f"{len(out)} new tokens (synthetic weights: ids only) {out[:16]}{' ...' if len(out) > 16 else ''}")
    report(loaded, stats, sparsity, guard)


def report(loaded, stats, sparsity, guard):
    """The run's figures on stderr: prefill, decode speed, and what the sparse path achieved."""
    step_ms = 1e3 * stats.decode_seconds / stats.decode_steps if stats.decode_steps else float("nan")
    print(f"[{loaded.name} on {loaded.model.device}, {loaded.model.dtype}: prompt {stats.prompt_tokens} tokens "
          f"in {stats.prefill_seconds * 1e3:.0f} ms, {stats.new_tokens} new tokens x {stats.batch}, "
          f"decode {stats.decode_tokens_per_s:.1f} tokens/s ({step_ms:.2f} ms per step)]", file=sys.stderr)
    if guard is not None:
        print(f"[{guard.metrics.summary()}]", file=sys.stderr)
    elif stats.lossless is not None:
        s = stats.lossless
        print(f"[lossless: dense output; {s.accepted}/{s.drafted} sparse drafts kept ({s.acceptance_rate:.1%}; "
              f"per checked draft {s.alpha:.1%}), {s.rounds} rounds, mean draft length {s.mean_draft_length:.2f}]",
              file=sys.stderr)
    elif sparsity is not None:
        if sparsity.input_side:
            print(f"[sparse decode: {achieved(sparsity)}; prefill ran dense]", file=sys.stderr)
        elif sparsity.density("mlp") is None and sparsity.density("attn") is None:
            # the first new token ended the text (no decode step), or both densities are 1
            print("[sparse decode: no part ran sparse (no decode step, or both densities 1); prefill ran dense]",
                  file=sys.stderr)
        else:
            print(f"[sparse decode: achieved {achieved(sparsity)} (union over the batch); prefill ran dense]",
                  file=sys.stderr)
