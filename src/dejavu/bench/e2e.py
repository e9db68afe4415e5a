"""GPU end-to-end bench (`dejavu bench e2e`): ms/token of the CUDA-graph engine, dense and
sparse, against transformers' generate (a twin sharing our weights) on synthetic weights of a
shape preset, each row next to its roofline (bytes a decode step must read / copy bandwidth)."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from .kernels import copy_bandwidth


def step_bytes(model, context: float, mlp_density: float | None = None, attn_density: float | None = None,
               predictors=None, lazy_kv: bool = False, batch: int = 1) -> float:
    """Bytes a decode step must read: weights (the selected rows only when sparse), each row's
    KV cache over `context` tokens (the selected heads' groups only), the lm_head, the predictors.
    With the lazy K/V fill, K/V rows of the selected heads plus the heads refreshed in turn."""
    from ..engine import LAZY_WINDOW
    c, el = model.cfg, model.dtype.itemsize
    md, ad = mlp_density or 1.0, attn_density or 1.0
    qo = 2 * c.n_heads * c.head_dim * c.d_model * ad
    kv = 2 * c.n_kv_heads * c.head_dim * c.d_model
    if lazy_kv:
        kv *= min(1.0, ad + -(-c.n_heads // (LAZY_WINDOW - 1)) / c.n_heads)
    mlp = (c.n_in + 1) * c.d_ff * c.d_model * md
    kv_groups = min(1.0, ad * c.n_heads / c.n_kv_heads) if c.n_kv_heads == c.n_heads else 1.0
    cache = 2 * c.n_kv_heads * kv_groups * context * c.head_dim * batch
    per_layer = (qo + kv + mlp + cache) * el
    head = c.vocab_size * c.d_model * el
    pred = 0
    if predictors is not None:  # the MLP predictors only when the MLP is sparse, the head ones only for heads
        used = (predictors.mlp if mlp_density else []) + (predictors.heads if attn_density else [])
        pred = sum(p.numel() * p.element_size() for m in used for p in m.parameters())
    return c.n_layers * per_layer + head + pred


def hf_twin(model, hf_config):
    """A transformers model whose parameters are views of ours (no second copy of the weights):
    W_o and W_down as transposed views of wo_t and w_out_t, gate/up/fc1 as slices of w_in."""
    from transformers import AutoModelForCausalLM
    c = model.cfg
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=model.dtype)
    sd = {}
    opt = c.family == "opt"
    pre = "model.decoder." if opt else "model."
    sd[pre + "embed_tokens.weight"] = model.tok_emb.weight
    if opt:
        pos = model.pos_emb.weight  # OPT's table has an offset of 2 and its full length; ours the used part
        table = torch.zeros(hf_config.max_position_embeddings + 2, c.d_model, dtype=pos.dtype, device=pos.device)
        table[2:2 + len(pos)] = pos
        sd[pre + "embed_positions.weight"] = table
        sd[pre + "final_layer_norm.weight"], sd[pre + "final_layer_norm.bias"] = model.norm.weight, model.norm.bias
    else:
        sd[pre + "norm.weight"] = model.norm.weight
    for i, b in enumerate(model.layers):
        p, a, m = f"{pre}layers.{i}.", b.attn, b.mlp
        names = ("self_attn_layer_norm", "final_layer_norm", "out_proj") if opt else \
            ("input_layernorm", "post_attention_layernorm", "o_proj")
        for norm, name in zip((b.attn_norm, b.mlp_norm), names[:2]):
            sd[p + name + ".weight"] = norm.weight
            if norm.bias is not None:
                sd[p + name + ".bias"] = norm.bias
        for x, w, bias in (("q", a.wq, a.bq), ("k", a.wk, a.bk), ("v", a.wv, a.bv), ("o", a.wo_t.t(), a.bo)):
            name = names[2] if x == "o" else f"{x}_proj"
            sd[f"{p}self_attn.{name}.weight"] = w
            if bias is not None:
                sd[f"{p}self_attn.{name}.bias"] = bias
        if opt:
            sd[p + "fc1.weight"], sd[p + "fc1.bias"] = m.w_in[:, 0], m.b_in[:, 0]
            sd[p + "fc2.weight"], sd[p + "fc2.bias"] = m.w_out_t.t(), m.b_out
        else:
            sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"] = m.w_in[:, 0], m.w_in[:, 1]
            sd[p + "mlp.down_proj.weight"] = m.w_out_t.t()
    sd["lm_head.weight"] = model.tok_emb.weight if model.lm_head is None else model.lm_head
    missing = hf.load_state_dict(sd, strict=False, assign=True).missing_keys
    if missing:
        raise RuntimeError(f"hf_twin: no weights for {missing[:5]}")
    if not opt:  # rotary buffers were made on meta
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config, device=model.device)
    for name, t in list(hf.named_parameters()) + list(hf.named_buffers()):
        if t.is_meta:
            raise RuntimeError(f"hf_twin: {name} left on the meta device")
    return hf.eval()


def hf_ms_per_token(hf, prompt: torch.Tensor, n: int, static: bool = False) -> list[float]:
    """transformers `generate`, greedy, n new tokens; ms between consecutive tokens from CUDA
    events recorded as each step's logits arrive. `static`: its static cache (transformers
    compiles the forward for it where it can)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self):
            self.events = []

        def __call__(self, input_ids, scores):
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.events.append(e)
            return scores

    stamp = Stamp()
    extra = dict(cache_implementation="static") if static else {}
    with torch.no_grad():
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                    do_sample=False, logits_processor=LogitsProcessorList([stamp]), pad_token_id=0, **extra)
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in zip(stamp.events[1:], stamp.events[2:])]  # decode steps only


def bench_e2e(shape: str, prompts: list[int], gen: int, points: list[tuple[float, float]], dtype=torch.float16,
              mlp_rank: int | None = None, head_rank: int | None = None, batches: tuple[int, ...] = (),
              hf_rows: bool = True, tp: tuple[int, int] = (0, 1), layers: int | None = None, log=print) -> dict:
    """The latency table of the GPU engine issue: per prompt length, ms/token (median over the
    generated tokens) for transformers eager, transformers static cache, our dense CUDA-graph
    engine and our sparse one at each (MLP, attention) density point, with roofline fractions
    and peak memory. Synthetic weights of the named shape: speed only. `layers`: the first n
    layers only (a model too large to hold); the table then adds a full-depth estimate."""
    from .. import engine
    from ..load import hf_config_for_preset, load
    from ..predictor import random_predictors
    from ..selectors import PredictorSelector
    from ..sparse import Gathered

    loaded = load(shape, dtype=dtype, device="cuda", max_seq_len=max(prompts) + gen + 8, tp=tp, layers=layers)
    model = loaded.model
    if tp[1] > 1 and hf_rows:
        log(f"tensor parallelism over {tp[1]} GPUs: no transformers rows (its model is not sharded); roofline "
            "and memory are per GPU (one shard), the all-reduces are not in the roofline")
        hf_rows = False
    bw = copy_bandwidth()
    preds = random_predictors(model, mlp_rank=mlp_rank, head_rank=head_rank)
    sel = PredictorSelector(preds)
    side = torch.cuda.Stream()
    card = torch.cuda.get_device_name()
    weights_gb = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9
    pred_gb = sum(p.numel() * p.element_size() for m in preds.mlp + preds.heads for p in m.parameters()) / 1e9
    log(f"{card}: copy bandwidth {bw / 1e12:.2f} TB/s; {loaded.source}, {dtype}, {weights_gb:.1f} GB of weights; "
        f"predictors (untrained) MLP rank {preds.meta['mlp_rank']}, head rank {preds.meta['head_rank']}: "
        f"{pred_gb:.2f} GB")
    hf = hf_twin(model, hf_config_for_preset(shape, layers)) if hf_rows else None
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []

    def add(prompt_len, variant, ms_list, nbytes, peak=None, note=""):
        ms = statistics.median(ms_list)
        roof = nbytes / bw * 1e3
        rows.append(dict(prompt=prompt_len, variant=variant, ms_per_token=ms, roofline_ms=roof,
                         roofline_frac=roof / ms, peak_gb=peak, note=note))
        log(f"  prompt {prompt_len:>5}  {variant:<44} {ms:8.2f} ms/token  roofline {roof:6.2f} ms "
            f"({roof / ms:5.1%})" + (f"  peak {peak:.1f} GB" if peak else "") + (f"  {note}" if note else ""))

    def ours(prompt, mlp_d=None, attn_d=None, stream=side, lazy_kv=None, union_cap=None):
        sparsity = None if mlp_d is None else Gathered(model, sel, sel, mlp_d, attn_d, side_stream=stream,
                                                       union_cap=union_cap)
        torch.cuda.reset_peak_memory_stats()
        dec = engine.GraphDecoder(model, prompt.shape[0], prompt.shape[1] + gen + 4, sparsity, lazy_kv)
        dec.prefill(prompt)
        tokens, ms = dec.decode(gen)
        return ms, torch.cuda.max_memory_allocated() / 1e9

    for T in prompts:
        prompt = torch.randint(0, model.cfg.vocab_size, (1, T), device="cuda", generator=g)
        ctx = T + gen / 2
        dense_bytes = step_bytes(model, ctx)
        if hf is not None:
            hf_ms_per_token(hf, prompt, 4)  # warm-up
            add(T, "transformers eager generate", hf_ms_per_token(hf, prompt, gen), dense_bytes)
            try:
                hf_ms_per_token(hf, prompt, 4, static=True)  # compiles
                add(T, "transformers static cache (+ its compile)", hf_ms_per_token(hf, prompt, gen, static=True),
                    dense_bytes)
            except Exception as e:  # report, don't hide
                log(f"  prompt {T:>5}  transformers static cache: failed ({type(e).__name__}: {str(e)[:200]})")
                rows.append(dict(prompt=T, variant="transformers static cache (+ its compile)", ms_per_token=None,
                                 note=f"failed: {type(e).__name__}"))
        ms, peak = ours(prompt)
        add(T, "dejavu dense, CUDA graph", ms, dense_bytes, peak)
        for i, (mlp_d, attn_d) in enumerate(points):
            lazy = engine.lazy_kv_applies(model, 1, Gathered(model, sel, sel, mlp_d, attn_d))
            ms, peak = ours(prompt, mlp_d, attn_d)
            nbytes = step_bytes(model, ctx, mlp_d, attn_d, preds, lazy)
            add(T, f"dejavu sparse MLP {mlp_d:g} / attention {attn_d:g}, CUDA graph"
                + (", lazy K/V" if lazy else ""), ms, nbytes, peak)
            if i == 0:  # the overlap: the same step with the predictors inline on the main stream
                ms_inline, _ = ours(prompt, mlp_d, attn_d, stream=None)
                add(T, "  same, predictors inline (no side stream)", ms_inline, nbytes,
                    note=f"side stream saves {statistics.median(ms_inline) - statistics.median(ms):.2f} ms")
            if i == 0 and lazy:  # the simple form: K/V for every head
                ms_full, _ = ours(prompt, mlp_d, attn_d, lazy_kv=False)
                add(T, "  same, K/V for every head (no lazy fill)", ms_full,
                    step_bytes(model, ctx, mlp_d, attn_d, preds), note="")
    mlp_d, attn_d = points[0]

    def throughput_rows(B):
        T = prompts[0]
        prompt = torch.randint(0, model.cfg.vocab_size, (B, T), device="cuda", generator=g)
        union = union_density(model, Gathered(model, sel, sel, mlp_d, attn_d), prompt)
        rows = []
        for variant, (ms, peak), (m, a) in (
                ("dejavu dense, CUDA graph", ours(prompt), (None, None)),
                (f"dejavu sparse MLP {mlp_d:g} / attention {attn_d:g}, union {union[0]:.2f} / {union[1]:.2f}",
                 ours(prompt, mlp_d, attn_d, union_cap=union), union)):
            med = statistics.median(ms)
            roof = step_bytes(model, T + gen / 2, m, a, preds if m else None, batch=B) / bw * 1e3
            rows.append(dict(batch=B, prompt=T, variant=variant, ms_per_step=med, tokens_per_s=B * 1e3 / med,
                             roofline_frac=roof / med, peak_gb=peak))
            log(f"  batch {B:>2}  {variant:<60} {med:8.2f} ms/step  {B * 1e3 / med:8.1f} tokens/s  "
                f"roofline {roof / med:5.1%}  peak {peak:.1f} GB")
        return rows

    batch_rows = []
    for B in (b for b in batches if b > 1):  # throughput: dense, and sparse at the batch's union density
        try:
            batch_rows += throughput_rows(B)
        except Exception as e:  # report it and keep the latency table above
            log(f"  batch {B:>2}: failed ({type(e).__name__}: {str(e)[:300]})")
            batch_rows.append(dict(batch=B, variant=f"failed: {type(e).__name__}: {str(e)[:120]}"))
    full_layers = hf_config_for_preset(shape).num_hidden_layers
    return dict(card=card, copy_bandwidth=bw, shape=shape, tp=tp[1], batch_rows=batch_rows, weights=loaded.source,
                layers=model.cfg.n_layers, full_layers=full_layers,
                dtype=str(dtype), gen=gen,
                mlp_rank=preds.meta["mlp_rank"], head_rank=preds.meta["head_rank"], predictor_gb=pred_gb,
                weights_gb=weights_gb, rows=rows)


@torch.no_grad()
def eager_steps(model, prompt: torch.Tensor, steps: int, sparsity):
    """Dense prefill, then `steps` greedy eager decode steps with `sparsity` (which counts what it kept)."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps + 1)
    nxt = model(prompt, cache, 0)[:, -1:].argmax(-1)
    for i in range(steps):
        nxt = model(nxt, cache, prompt.shape[1] + i, sparsity)[:, -1:].argmax(-1)


def union_density(model, sparsity, prompt: torch.Tensor, steps: int = 8) -> tuple[float, float]:
    """MLP and attention density of the union of a batch's selections, measured over a few eager
    decode steps (what union_cap then fixes for the graph)."""
    eager_steps(model, prompt, steps, sparsity)
    return sparsity.density("mlp"), sparsity.density("attn")


def e2e_markdown(res: dict) -> str:
    gpus = f"{res['tp']} x " if res.get("tp", 1) > 1 else ""
    lines = [f"## {res['shape']} on {gpus}{res['card']} ({res['dtype']}, {res['weights']})", "",
             f"Copy bandwidth {res['copy_bandwidth'] / 1e12:.2f} TB/s; batch 1; {res['gen']} new tokens, "
             f"ms/token = median over them (CUDA events). Predictors untrained (speed only), MLP rank "
             f"{res['mlp_rank']}, head rank {res['head_rank']}, {res['predictor_gb']:.2f} GB, counted in the roofline.",
             "", "| prompt | variant | ms/token | vs dejavu dense | roofline ms | of roofline | peak GB |",
             "|---|---|---|---|---|---|---|"]
    dense = {r["prompt"]: r["ms_per_token"] for r in res["rows"] if r["variant"].startswith("dejavu dense")}
    for r in res["rows"]:
        if r["ms_per_token"] is None:
            lines.append(f"| {r['prompt']} | {r['variant']} | {r['note']} | | | | |")
            continue
        lines.append(f"| {r['prompt']} | {r['variant']} | {r['ms_per_token']:.2f} | "
                     f"{dense[r['prompt']] / r['ms_per_token']:.2f}x | {r['roofline_ms']:.2f} | "
                     f"{r['roofline_frac']:.0%} | {'' if r['peak_gb'] is None else format(r['peak_gb'], '.1f')} |")
    if res.get("batch_rows"):
        lines += ["", "Throughput at larger batches (prompt as above; sparse computes the union of the batch's "
                  "selections, its size fixed per step at the union density measured over 8 eager steps). The "
                  "union comes from untrained predictors on synthetic weights, whose top sets barely differ "
                  "between rows: a real model's union is far larger (SmolLM2, MLP 0.5, batch 8: about 0.9, "
                  "results/smollm2-135m/serve_load.md), so these sparse rows are a bound, not a forecast.", "",
                  "| batch | variant | ms/step | tokens/s | of roofline | peak GB |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['batch']} | {r['variant']} | {r['ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | "
                  f"{r['roofline_frac']:.0%} | {r['peak_gb']:.1f} |" if "ms_per_step" in r else
                  f"| {r['batch']} | {r['variant']} | | | | |" for r in res["batch_rows"]]
    n, full = res.get("layers"), res.get("full_layers")
    if n and full and n < full:  # a partial model: extrapolate, labelled as such
        lines += ["", f"**Estimate** for all {full} layers (the rows above time the first {n}): ms/token x {full}/{n}. "
                  "The embedding, final norm and LM head are counted that many times too, so this overestimates.", "",
                  "| prompt | variant | estimated ms/token, all layers |", "|---|---|---|"]
        lines += [f"| {r['prompt']} | {r['variant']} | {r['ms_per_token'] * full / n:.1f} |"
                  for r in res["rows"] if r["ms_per_token"] is not None]
    return "\n".join(lines) + "\n"


def e2e_plot(res: dict, path):
    """ms/token against prompt length, one line per variant, the roofline of dense and sparse
    dashed (matplotlib PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(11, 4.8))
    variants = list(dict.fromkeys(r["variant"] for r in res["rows"]))
    for v in variants:
        pts = [(r["prompt"], r["ms_per_token"]) for r in res["rows"] if r["variant"] == v and r["ms_per_token"]]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=v.strip())
    for v in variants:
        if v.startswith("dejavu dense") or v.startswith("dejavu sparse MLP 0.1"):
            pts = [(r["prompt"], r["roofline_ms"]) for r in res["rows"] if r["variant"] == v]
            ax.plot(*zip(*pts), ls="--", color="gray", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["prompt"] for r in res["rows"]}), labels=sorted({r["prompt"] for r in res["rows"]}))
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("ms / token (batch 1, median)")
    gpus = f"{res['tp']} x " if res.get("tp", 1) > 1 else ""
    ax.set_title(f"{res['shape']} (synthetic weights) on {gpus}{res['card']}; dashed: rooflines", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save(res: dict, out) -> list[Path]:
    """e2e_<shape>[_tpN][_Nlayers].json, .md and .png in the folder `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"e2e_{res['shape']}" + (f"_tp{res['tp']}" if res["tp"] > 1 else "") + \
        (f"_{res['layers']}layers" if res["layers"] < res["full_layers"] else "")
    paths = [out / f"{stem}.json", out / f"{stem}.md", out / f"{stem}.png"]
    paths[0].write_text(json.dumps(res, indent=1))
    paths[1].write_text(e2e_markdown(res))
    e2e_plot(res, paths[2])
    return paths
