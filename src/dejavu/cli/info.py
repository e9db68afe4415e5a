"""`dejavu info`: the model's shape, parameter bytes per part and where it came from."""
from __future__ import annotations

from ..load import PRESETS
from .common import load_from_args


def run(args):
    from ..model import param_bytes
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
