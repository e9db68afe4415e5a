"""What several commands share: the model from --model/--device/--dtype, the predictors folder
and the sparse decoder from --predictors and the densities, the guard from its flags."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from ..errors import DejavuError
from ..load import DEFAULT_MODEL, PRESETS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def device_from_args(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise DejavuError(f"--device {args.device}: give cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DejavuError(f"--device {args.device}: no CUDA GPU is visible here; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise DejavuError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return args.device


def load_from_args(args):
    from transformers.utils import logging as hf_logging
    from ..load import load
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    device = device_from_args(args)
    low_precision = device != "cpu" or args.model in PRESETS  # presets are for GPU speed work
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if low_precision else torch.float32)
    world = getattr(args, "tp", 1)
    rank = tensor_parallel_rank(world, device)
    return load(args.model, dtype=dtype, device=device, tp=(rank, world))


def tensor_parallel_rank(world: int, device: str) -> int:
    """--tp N: join torchrun's N processes (one GPU each) -> this rank. Ranks other than 0 print
    nothing: every rank runs the same steps, rank 0 speaks for them."""
    from .. import tp
    if world == 1:
        tp.init(1)  # refuses a torchrun launch without --tp
        return 0
    rank = tp.init(world)  # one GPU per rank (NCCL); on the CPU, gloo: slow, for tests
    if rank:
        sys.stdout = sys.stderr = open(os.devnull, "w")
    return rank


def need_tokenizer(loaded):
    if loaded.tokenizer is None:
        raise DejavuError(f"--model {loaded.name} has synthetic weights and no tokenizer; text commands need a "
                          f"real model (--model {DEFAULT_MODEL} or a folder)")
    return loaded.tokenizer


def check_fits(model, prompt_tokens: int, max_new_tokens: int):
    """A prompt and its new tokens must fit the model's context (the library raises ValueError)."""
    if prompt_tokens + max_new_tokens > model.cfg.max_seq_len:
        raise DejavuError(f"the prompt ({prompt_tokens} tokens) and --max-new-tokens {max_new_tokens} exceed the "
                          f"model's context of {model.cfg.max_seq_len} tokens: shorten the prompt or lower "
                          "--max-new-tokens")


def run_dir(model: str, what: str) -> Path:
    """runs/<model>/<what>: a folder name from --model (a local folder's last part, a hub id's
    '/' as '--')."""
    name = Path(model).name if Path(model).exists() else model
    return Path("runs") / name.replace("/", "--") / what


def predictors_folder(args) -> Path | str:
    """--predictors, or by default the folder `dejavu calibrate` writes for this model."""
    return args.predictors if args.predictors else run_dir(args.model, "predictors")


def load_predictors(model, args):
    """The predictors of --predictors ('synthetic': untrained ones of the right shapes, for speed
    work on presets). The default folder missing is a clear error, not a traceback."""
    from ..predictor import Predictors, random_predictors
    if args.predictors and args.predictors.startswith("synthetic"):
        return random_predictors(model, **synthetic_ranks(args.predictors))
    folder = predictors_folder(args)
    if not args.predictors and not Path(folder).exists():
        raise DejavuError(f"no predictors in {folder} (the default --predictors for --model {args.model}): "
                          "run `dejavu calibrate` first, or pass --predictors DIR")
    return Predictors.load(folder, model)


def synthetic_ranks(spec: str) -> dict:
    """'synthetic' (default ranks) or 'synthetic:MLP_RANK,HEAD_RANK' -> random_predictors' ranks."""
    if spec == "synthetic":
        return {}
    try:
        mlp, head = (int(r) for r in spec.removeprefix("synthetic:").split(","))
        if mlp < 1 or head < 1:
            raise ValueError
    except ValueError:
        raise DejavuError(f"--predictors {spec}: write 'synthetic' or 'synthetic:MLP_RANK,HEAD_RANK' "
                          "(e.g. synthetic:256,224)") from None
    return dict(mlp_rank=mlp, head_rank=head)


_thresholds: dict = {}  # (model, score, density) -> calibrated input-side thresholds, made once per process


def input_sparsity(model, tokenizer, density: float, score: str, gathered: bool):
    """Input-side sparsity (sparse.InputSparsity) at `density` of the input channels, thresholds set
    on 2048 calibration tokens (held-out-free Wikipedia; random ids for synthetic weights, which
    are speed only). Gathered decode reads input channels as rows: the model is re-stored
    input-major (Transformer.to_input_major) in place."""
    import torch
    from ..evaluate import text_stream
    from ..selectors import InputSelector
    from ..sparse import INPUT_CALIBRATION_TOKENS, InputSparsity, calibrate_thresholds
    if gathered:
        model.to_input_major()
    sel = InputSelector(model, score)
    key = (id(model), score, density)
    if key not in _thresholds:
        if tokenizer is not None:
            ids = text_stream(tokenizer, None, "calibration", INPUT_CALIBRATION_TOKENS)
        else:
            ids = torch.randint(0, model.cfg.vocab_size, (INPUT_CALIBRATION_TOKENS,),
                                generator=torch.Generator().manual_seed(1))
        _thresholds[key] = calibrate_thresholds(model, sel, ids, density)
    return InputSparsity(model, sel, _thresholds[key], gathered, target=density)


def sparse_decoder(model, args, tokenizer=None):
    """The gathered sparse decoder: input-side sparsity with --input-density (tokenizer: for its
    calibration text), else neurons and heads from --predictors and the densities; a part at
    density 1 runs dense (no selection cost)."""
    from ..selectors import default_selectors
    from ..sparse import Gathered
    if getattr(args, "input_density", None) is not None:
        return input_sparsity(model, tokenizer, args.input_density, args.input_score, gathered=True)
    neurons, heads = default_selectors(model, load_predictors(model, args))
    return Gathered(model, mlp=None if args.mlp_density == 1 else neurons,
                    heads=None if args.attn_density == 1 else heads,
                    mlp_density=args.mlp_density, attn_density=args.attn_density)


def achieved(sparsity) -> str:
    """'MLP density 0.500, attention dense': what a sparse decoder computed (a part it did not
    select, e.g. at density 1, ran dense)."""
    from ..sparse import InputSparsity
    if isinstance(sparsity, InputSparsity):  # decode does not count channels (no host sync): say what was asked
        return f"{sparsity.selector.name}, thresholds set for {sparsity.target:g} of the input channels"
    parts = []
    for name, kind in (("MLP", "mlp"), ("attention", "attn")):
        d = sparsity.density(kind)
        parts.append(f"{name} dense" if d is None else f"{name} density {d:.3f}")
    return ", ".join(parts)


def guard_from_args(model, sparsity, args):
    """The run-time guard (guard.py) from --guard / --conservative and their overrides, or None."""
    from ..guard import CONSERVATIVE, Guard, GuardSettings, settings_with
    if not (args.guard or args.conservative):
        return None
    settings = settings_with(CONSERVATIVE if args.conservative else GuardSettings(), check_every=args.check_every,
                             min_agreement=args.min_agreement, on_trip=args.on_trip)
    return Guard(model, sparsity.mlp, sparsity.head_sel, args.mlp_density, args.attn_density, settings)
