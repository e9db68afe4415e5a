"""Record predictor inputs and labels over calibration text, as sharded safetensors.

Per layer l and token, from the dense engine:
  resid.l   [N, d]     the residual stream entering layer l: exactly the tensor lookahead
                       predictors read at inference (sparse.Masked.enter sees the same)
  neuron.l  [N, d_ff]  neuron importance |a_i| * ||W_down[:, i]||  (labels as scores: any
                       density's top set can be taken from them later)
  head.l    [N, H]     head importance ||o_h W_o[:, h]||
  mlp_in.l  [N, d]     (with same_layer) the MLP's own normalized input, for same-layer predictors
fp16 on disk. Shards hold a fixed token range each and are written atomically, so an
interrupted run resumes where it stopped and memory stays bounded by one shard.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from .errors import DejavuError
from .model import Transformer
from .sparse import Recorder

RECORD_VERSION = 1


def fingerprint_sample(block) -> bytes:
    with torch.no_grad():
        return b"".join(w.flatten()[:256].float().cpu().numpy().tobytes()
                        for w in (block.attn.wq, block.mlp.w_in, block.mlp.w_out_t))


def model_fingerprint(model: Transformer, samples: list[bytes] | None = None) -> str:
    """Config plus a sample of every layer's weights: the same model gives the same print.
    `samples`: fingerprint_sample of each layer, taken earlier (a shard loaded layer by layer)."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True).encode())
    for s in samples if samples is not None else map(fingerprint_sample, model.layers):
        h.update(s)
    return h.hexdigest()[:16]


def bytes_per_token(model: Transformer, same_layer: bool = False) -> int:
    cfg = model.cfg
    return cfg.n_layers * (cfg.d_model * (2 if same_layer else 1) + cfg.d_ff + cfg.n_heads) * 2


def record(model: Transformer, stream: torch.Tensor, out: Path, window: int = 512, shard_tokens: int = 2048,
           batch: int = 4, progress: bool = True, same_layer: bool = False) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    window = min(window, shard_tokens, model.cfg.max_seq_len)  # a short-context model records shorter windows
    shard_tokens = shard_tokens // window * window
    n_shards = len(stream) // shard_tokens
    if n_shards == 0:
        raise DejavuError(f"need at least {shard_tokens} tokens of calibration text, got {len(stream)}")
    manifest = dict(version=RECORD_VERSION, fingerprint=model_fingerprint(model), config=model.cfg.to_dict(),
                    window=window, shard_tokens=shard_tokens, shards=n_shards, tokens=n_shards * shard_tokens,
                    same_layer=same_layer, bytes=n_shards * shard_tokens * bytes_per_token(model, same_layer))
    mpath = out / "record.json"
    if mpath.exists():
        old = json.loads(mpath.read_text())
        keys = ("version", "fingerprint", "window", "shard_tokens", "same_layer")
        if {k: old.get(k) for k in keys} != {k: manifest[k] for k in keys}:
            raise DejavuError(f"{out} holds a recording of another model or settings; use another --out or delete it")
    mpath.write_text(json.dumps(manifest, indent=1))
    todo = [i for i in range(n_shards) if not shard_path(out, i).exists()]
    rec = Recorder(model, torch.float16)
    rec.keep_mlp_in = same_layer
    bar = tqdm(total=len(todo) * shard_tokens, desc="recording", unit="tok", disable=not progress)
    for i in todo:
        chunks = stream[i * shard_tokens:(i + 1) * shard_tokens].view(-1, window)
        parts: dict[str, list[torch.Tensor]] = {}
        with torch.inference_mode():
            for j in range(0, len(chunks), batch):
                rec.reset()
                model(chunks[j:j + batch].to(model.device), sparsity=rec)
                for name, lst in (("resid", rec.resid), ("neuron", rec.neuron_imp), ("head", rec.head_imp),
                                  ("mlp_in", rec.mlp_in)):
                    for layer, t in enumerate(lst):
                        parts.setdefault(f"{name}.{layer}", []).append(t.cpu())
                bar.update(chunks[j:j + batch].numel())
        tmp = shard_path(out, i).with_suffix(f".tmp{os.getpid()}")
        save_file({k: torch.cat(v).contiguous() for k, v in parts.items()}, tmp)
        tmp.rename(shard_path(out, i))  # atomic: a shard is either whole or absent
    bar.close()
    return manifest


def shard_path(out: Path, i: int) -> Path:
    return Path(out) / f"shard-{i:05d}.safetensors"


def read_manifest(out: Path, model: Transformer | None = None) -> dict:
    mpath = Path(out) / "record.json"
    if not mpath.exists():
        raise DejavuError(f"{out} has no recording (record.json); run `dejavu calibrate` first")
    m = json.loads(mpath.read_text())
    if model is not None and m["fingerprint"] != model_fingerprint(model):
        raise DejavuError(f"the recording in {out} was made with another model; record again for this one")
    missing = [i for i in range(m["shards"]) if not shard_path(out, i).exists()]
    if missing:
        raise DejavuError(f"{out} is incomplete ({len(missing)} of {m['shards']} shards missing); "
                          "rerun `dejavu calibrate` to finish it")
    return m


def load_layer(out: Path, names: list[str], shards: range | list[int] | None = None) -> dict[str, torch.Tensor]:
    """Concatenate tensors (e.g. ['resid.3', 'neuron.3']) over shards, as float32."""
    m = read_manifest(out)
    shards = range(m["shards"]) if shards is None else shards
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in shards:
        try:
            with safe_open(shard_path(out, i), framework="pt") as f:
                for n in names:
                    parts[n].append(f.get_tensor(n).float())
        except Exception as e:
            raise DejavuError(f"cannot read {shard_path(out, i)} ({type(e).__name__}); the file is corrupt: "
                              "delete it and rerun `dejavu calibrate` to record it again") from None
    return {n: torch.cat(v) for n, v in parts.items()}


def split_shards(n_shards: int, heldout_frac: float = 0.125) -> tuple[list[int], list[int]]:
    """Train / held-out shards for predictor training and k calibration (held-out: the last ones)."""
    n_held = max(1, math.ceil(n_shards * heldout_frac)) if n_shards > 1 else 0
    return list(range(n_shards - n_held)), list(range(n_shards - n_held, n_shards))
