"""`dejavu perplexity`: the dense model's perplexity on held-out Wikipedia or your files."""
from __future__ import annotations

import time

from .common import load_from_args, need_tokenizer
from ..evaluate import text_stream


def run(args):
    from ..evaluate import perplexity
    loaded = load_from_args(args)
    stream = text_stream(need_tokenizer(loaded), args.text, "heldout", args.max_tokens)
    t = time.perf_counter()
    r = perplexity(loaded.model, stream, window=args.window)
    where = ", ".join(args.text) if args.text else "held-out Wikipedia articles (gensim test data)"
    print(f"perplexity {r.ppl:.3f} over {r.tokens} predicted tokens ({where}; windows of {r.window}) "
          f"in {time.perf_counter() - t:.1f} s")
