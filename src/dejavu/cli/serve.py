"""`dejavu serve`: the OpenAI-compatible HTTP server, dense or (--sparse) sparse decode."""
from __future__ import annotations

import os

from ..errors import DejavuError
from .common import guard_from_args, load_from_args, need_tokenizer, sparse_decoder

GPU_MAX_SPARSE_BATCH = 32  # the gathered Triton kernels take batches up to this


def run(args):
    from ..serve import Settings, serve
    loaded = load_from_args(args)
    need_tokenizer(loaded)
    if args.sparse and loaded.model.device.type == "cuda" and args.sparse_max_batch > GPU_MAX_SPARSE_BATCH:
        raise DejavuError(f"--sparse-max-batch {args.sparse_max_batch}: the gathered GPU kernels take batches up "
                          f"to {GPU_MAX_SPARSE_BATCH}")
    sparsity = sparse_decoder(loaded.model, args, loaded.tokenizer) if args.sparse else None  # bad predictors stop here
    guard = guard_from_args(loaded.model, sparsity, args) if sparsity is not None else None
    settings = Settings(api_key=args.api_key or os.environ.get("DEJAVU_API_KEY") or None,
                        request_timeout=args.request_timeout, max_tokens_limit=args.max_tokens_limit,
                        max_request_bytes=args.max_request_bytes, read_timeout=args.read_timeout,
                        keep_alive_timeout=args.keep_alive_timeout, test_faults=args.test_faults)
    serve(loaded, sparsity, guard, args.host, args.port, args.batch_size, args.max_queue, args.sparse_max_batch,
          settings)
