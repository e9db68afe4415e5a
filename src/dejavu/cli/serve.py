"""`dejavu serve`: the OpenAI-compatible HTTP server, dense or (--sparse) sparse decode."""
from __future__ import annotations

import os

from ..errors import DejavuError
from .common import guard_from_args, load_from_args, need_tokenizer, sparse_decoder


def with_tokenizer(loaded, folder: str):
    """--tokenizer: a local transformers tokenizer folder for a model that has none (or another)."""
    import dataclasses

    from transformers import AutoTokenizer

    from ..load import stop_ids
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise DejavuError(f"--tokenizer {folder}: no tokenizer could be read there ({type(e).__name__}: "
                          f"{str(e)[:200]}); give a folder with tokenizer.json or the files of a transformers "
                          "tokenizer") from None
    if len(tok) > loaded.model.cfg.vocab_size:
        raise DejavuError(f"--tokenizer {folder} has {len(tok)} tokens, more than the model's vocabulary of "
                          f"{loaded.model.cfg.vocab_size}: use the model's own tokenizer")
    return dataclasses.replace(loaded, tokenizer=tok, stop_ids=stop_ids(tok))


def run(args):
    from ..serve import Settings, serve
    from ..serve.app import follow
    if args.tp > 1 and (args.guard or args.conservative):
        raise DejavuError("--guard with --tp is not built (the guard's checks are not sharded): serve on one GPU "
                          "to guard, or drop --guard")
    loaded = load_from_args(args)
    if args.tokenizer:
        loaded = with_tokenizer(loaded, args.tokenizer)
    need_tokenizer(loaded)
    gpu = loaded.model.device.type == "cuda"
    guarded = args.guard or args.conservative
    if gpu and not guarded and args.sparse_max_batch is not None:
        raise DejavuError("--sparse-max-batch sets where the CPU (and the guarded) server stops decoding sparse; "
                          "on a GPU every step runs every row, each selecting its own units, so that answers do "
                          "not depend on the load: leave it out")
    if args.sparse_max_batch is None:
        args.sparse_max_batch = 1
    sparsity = sparse_decoder(loaded.model, args, loaded.tokenizer) if args.sparse else None  # bad predictors stop here
    guard = guard_from_args(loaded.model, sparsity, args) if sparsity is not None else None
    if args.tp > 1:
        import torch.distributed as dist
        if dist.get_rank():  # the other ranks run rank 0's steps on their shards; rank 0 answers
            return follow(loaded, sparsity, args.batch_size, args.max_queue, args.sparse_max_batch)
    settings = Settings(api_key=args.api_key or os.environ.get("DEJAVU_API_KEY") or None,
                        request_timeout=args.request_timeout, max_tokens_limit=args.max_tokens_limit,
                        max_request_bytes=args.max_request_bytes, read_timeout=args.read_timeout,
                        keep_alive_timeout=args.keep_alive_timeout, test_faults=args.test_faults)
    serve(loaded, sparsity, guard, args.host, args.port, args.batch_size, args.max_queue, args.sparse_max_batch,
          settings)
