"""`dejavu analyze`: does contextual sparsity exist in this model, and how well is it predicted?

On held-out text, per layer:
  - the oracle density that keeps 90/95/99% of the block output (relative L2 error of the
    kept units' output against the dense output at most 10/5/1%), for MLP neurons and heads;
  - cosine similarity of the residual stream entering consecutive layers (why lookahead works);
and perplexity against density for oracle contextual top-k, the best static mask (units
ranked by mean importance on calibration text), the predictors, and for gated MLPs the gate
selector: for the MLP alone, the heads alone, and both. Then the honest axis: perplexity against
the fraction of the weights a decode step reads per token, for every selector above and for
input-side sparsity (teal, wina) at the same density in every projection group.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .evaluate import perplexity
from .model import Transformer
from .selectors import (GateSelector, InputSelector, OracleSelector, PredictorSelector,
                        default_selectors, weights_read_fraction)
from .sparse import INPUT_GROUPS, InputSparsity, Masked, Recorder, calibrate_thresholds, head_contributions

KEEP = (0.90, 0.95, 0.99)


def keep_density(contrib: torch.Tensor, imp: torch.Tensor, keep: tuple[float, ...] = KEEP) -> list[float]:
    """contrib [N, units, d] per-unit output, imp [N, units] -> mean density needed per keep level."""
    order = imp.argsort(dim=-1, descending=True)
    sorted_c = contrib.gather(1, order[..., None].expand_as(contrib))
    partial = sorted_c.cumsum(dim=1)                      # output of the top-k units, every k
    full = partial[:, -1:]
    err = (partial - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)   # [N, units]
    n = imp.shape[-1]
    return [((err > 1 - q).sum(dim=1) + 1).clamp(max=n).float().mean().item() / n for q in keep]


@torch.inference_mode()
def layer_stats(model: Transformer, tokens: torch.Tensor, sample_tokens: int = 64) -> list[dict]:
    """Keep-densities and residual cosines from one dense pass over `tokens` [B, T]."""
    rec = Recorder(model, torch.float32)
    rec.keep_acts = True
    model(tokens, sparsity=rec)
    N = rec.resid[0].shape[0]
    pick = torch.linspace(0, N - 1, min(sample_tokens, N)).long()
    stats = []
    for layer, block in enumerate(model.layers):
        a = rec.acts[layer][pick].float()
        w = block.mlp.w_out_t.float()
        mlp_keep = []
        for i in range(0, len(pick), 8):  # [8, d_ff, d] at a time: bounded memory
            mlp_keep.append(torch.tensor(keep_density(a[i:i + 8, :, None] * w, rec.neuron_imp[layer][pick[i:i + 8]])))
        contrib = head_contributions(block.attn.wo_t, rec.head_out[layer][pick][None])[0]
        attn_keep = keep_density(contrib, rec.head_imp[layer][pick])
        cos = None
        if layer + 1 < len(rec.resid):
            cos = torch.nn.functional.cosine_similarity(rec.resid[layer], rec.resid[layer + 1], dim=-1).mean().item()
        stats.append(dict(layer=layer, mlp_keep=dict(zip(map(str, KEEP), torch.stack(mlp_keep).mean(0).tolist())),
                          attn_keep=dict(zip(map(str, KEEP), attn_keep)), resid_cos_next=cos))
    return stats


def selectors(model: Transformer, predictors=None, static=None) -> dict[str, dict]:
    """name -> neuron selector, head selector, and the predictors whose per-layer MLP allocation to use.
    'default' is what dejavu uses for this family: the gate selector for gated MLPs (measured best,
    predictor issue), the lookahead predictors otherwise; heads always from the predictors."""
    oracle = OracleSelector(model)
    out = {"oracle": dict(neurons=oracle, heads=oracle), "static": dict(neurons=static, heads=static)}
    if predictors is not None:
        pred = PredictorSelector(predictors)
        out["predicted"] = dict(neurons=pred, heads=pred)
    if model.cfg.gated:
        out["gate"] = dict(neurons=GateSelector(model), heads=out.get("predicted", out["oracle"])["heads"])
    if predictors is not None:
        neurons, heads = default_selectors(model, predictors)
        out["default, allocated"] = dict(neurons=neurons, heads=heads, allocate=predictors)
    return out


def curves(model: Transformer, stream: torch.Tensor, sels: dict, mlp_densities, attn_densities, window=512,
           progress=True, log=print) -> list[dict]:
    """Perplexity for every (part, selector, density); part is 'mlp', 'attn' or 'both'.
    Densities are the mean over layers; 'allocated' selectors spread them per layer."""
    rows = []
    plan = [("mlp", d, None) for d in mlp_densities] + [("attn", None, d) for d in attn_densities] + \
        [("both", m, a) for m, a in zip(mlp_densities, attn_densities)]
    for part, md, ad in plan:
        for name, sel in sels.items():
            nsel = sel["neurons"] if part in ("mlp", "both") else None
            hsel = sel["heads"] if part in ("attn", "both") else None
            if (part != "attn" and nsel is None) or (part != "mlp" and hsel is None):
                continue
            alloc = sel.get("allocate")
            if part == "attn" and (name == "gate" or alloc is not None):  # these differ from others in the MLP only
                continue
            mds = alloc.allocation("mlp", md) if alloc is not None and md is not None else md
            ads = ad
            mask = Masked(model, mlp=nsel, heads=hsel, mlp_density=mds, attn_density=ads)
            t = time.perf_counter()
            r = perplexity(model, stream, window, sparsity=mask, progress=progress, desc=f"{part} {name}")
            kept = {k: (v[0] / v[1] if v[1] else None) for k, v in mask.kept.items()}
            rows.append(dict(part=part, selector=name, mlp_density=md, attn_density=ad, ppl=r.ppl,
                             achieved_mlp_density=kept["mlp"], achieved_attn_density=kept["attn"],
                             per_layer_mlp=mds if isinstance(mds, list) else None,
                             per_layer_attn=ads if isinstance(ads, list) else None,
                             mlp_bytes_fraction=(nsel.mlp_bytes_fraction(md) if hasattr(nsel, "mlp_bytes_fraction")
                                                 and md is not None else md)))
            log(f"  {part:<4} {name:<19} mlp {fmt(md)} attn {fmt(ad)}  ppl {r.ppl:8.2f}  "
                f"({time.perf_counter() - t:.0f} s)")
    return rows


def bytes_vs_ppl(model: Transformer, stream: torch.Tensor, sels: dict, rows: list[dict], dense_ppl: float,
                 input_densities, calibration: torch.Tensor, window=512, progress=True, log=print) -> list[dict]:
    """Perplexity against the weights read per token (selectors.weights_read_fraction): the
    curves' rows (neurons, heads, both) and input-side teal and wina, thresholds calibrated on the
    `calibration` stream to one density for every projection group; an input-side row's weights
    read are from the densities the held-out text actually kept."""
    label = {"mlp": "neurons", "attn": "heads", "both": "neurons + heads"}
    names = {"gate": "gate-first"}  # the curves' short name for dejavu's gated-MLP default
    out = [dict(selector="dense", weights_read_fraction=1.0, perplexity=dense_ppl)]
    for r in rows:
        sel = sels[r["selector"]]
        frac = weights_read_fraction(model, sel["neurons"] if r["mlp_density"] is not None else None,
                                     sel["heads"] if r["attn_density"] is not None else None,
                                     r["mlp_density"], r["attn_density"])
        name = f"{names.get(r['selector'], r['selector'])} {label[r['part']]}"
        out.append(dict(selector=name, weights_read_fraction=frac,
                        perplexity=r["ppl"], mlp_density=r["mlp_density"], attn_density=r["attn_density"]))
    for score in ("teal", "wina"):
        selector = InputSelector(model, score)
        for d in input_densities:
            t = time.perf_counter()
            mask = InputSparsity(model, selector, calibrate_thresholds(model, selector, calibration, d, window))
            ppl = perplexity(model, stream, window, sparsity=mask, progress=progress, desc=selector.name).ppl
            kept = {g: mask.density(g) for g in INPUT_GROUPS}
            out.append(dict(selector=selector.name, weights_read_fraction=weights_read_fraction(model, input_density=kept),
                            perplexity=ppl, input_density=d, achieved_input_density=kept))
            log(f"  {selector.name:<24} inputs {d:.2f}  reads {out[-1]['weights_read_fraction']:.3f}  ppl {ppl:8.2f}  "
                f"({time.perf_counter() - t:.0f} s)")
    return out


def plot_bytes(result: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    style = {" neurons + heads": ("D", "--"), " neurons": ("o", "-"), " heads": ("^", ":")}  # by what is selected
    names = list(dict.fromkeys(r["selector"] for r in rows if r["selector"] != "dense"))
    bases = list(dict.fromkeys(next((n[:-len(s)] for s in style if n.endswith(s)), n) for n in names))
    fig, ax = plt.subplots(figsize=(10, 6))
    for name in names:  # colour: the selector; marker and line: neurons, heads, both, input channels
        suffix = next((s for s in style if name.endswith(s)), "")
        marker, ls = style.get(suffix, ("s", "-"))
        pts = sorted((r["weights_read_fraction"], r["perplexity"]) for r in rows if r["selector"] == name)
        ax.plot(*zip(*pts), marker=marker, ls=ls, lw=2.5 if not suffix else 1.2, label=name,
                color=plt.cm.tab10(bases.index(name[:len(name) - len(suffix)]) % 10))
    ax.plot([1.0], [result["dense_ppl"]], "k*", ms=12, label=f"dense {result['dense_ppl']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("weights read per token (fraction of the dense decode step; LM head read in full)")
    ax.set_ylabel("perplexity (held-out)")
    ax.set_title(f"{result['model']}: perplexity vs weights read ({result['eval_tokens']} held-out tokens)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "bytes_vs_ppl.png", dpi=110)
    plt.close(fig)


def save_bytes(result: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "bytes_vs_ppl.json").write_text(json.dumps(result, indent=1))
    plot_bytes(result, out)


def fmt(d):
    return "  -  " if d is None else f"{d:.2f} "


def plot(result: dict, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    dense = result["dense_ppl"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, part in zip(axes, ("mlp", "attn", "both")):
        for name in sorted({r["selector"] for r in result["curves"] if r["part"] == part}):
            rows = [r for r in result["curves"] if r["part"] == part and r["selector"] == name]
            xs = [r["attn_density" if part == "attn" else "mlp_density"] for r in rows]
            ax.plot(xs, [r["ppl"] for r in rows], marker="o", label=name)
        ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense {dense:.2f}")
        ax.set_yscale("log")
        ax.set_xlabel("attention density" if part == "attn" else "MLP density" + (" (attn paired)" if part == "both"
                                                                                    else ""))
        ax.set_ylabel("perplexity (held-out)")
        ax.set_title({"mlp": "MLP neurons", "attn": "attention heads", "both": "both"}[part])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{result['model']}: perplexity vs density ({result['eval_tokens']} held-out tokens)")
    fig.tight_layout()
    fig.savefig(out / "perplexity_vs_density.png", dpi=110)
    plt.close(fig)

    layers = result["layers"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    x = [s["layer"] for s in layers]
    for q in map(str, KEEP):
        axes[0].plot(x, [s["mlp_keep"][q] for s in layers], marker=".", label=f"MLP, keep {float(q):.0%}")
        axes[0].plot(x, [s["attn_keep"][q] for s in layers], ls="--", marker=".", label=f"heads, keep {float(q):.0%}")
    axes[0].set_xlabel("layer")
    axes[0].set_ylabel("oracle density needed")
    axes[0].set_title("density that keeps the block output")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    cos = [(s["layer"], s["resid_cos_next"]) for s in layers if s["resid_cos_next"] is not None]
    axes[1].plot([c[0] for c in cos], [c[1] for c in cos], marker="o")
    axes[1].set_xlabel("layer l")
    axes[1].set_ylabel("cosine(residual entering l, entering l+1)")
    axes[1].set_title("residual-stream similarity (why lookahead works)")
    axes[1].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "layers.png", dpi=110)
    plt.close(fig)


def summary_table(result: dict) -> str:
    """Markdown: perplexity per selector and density, per part."""
    lines = [f"Dense perplexity: {result['dense_ppl']:.2f} ({result['eval_tokens']} held-out tokens)", ""]
    for part in ("mlp", "attn", "both"):
        rows = [r for r in result["curves"] if r["part"] == part]
        if not rows:
            continue
        key = "attn_density" if part == "attn" else "mlp_density"
        dens = sorted({r[key] for r in rows}, reverse=True)
        names = list(dict.fromkeys(r["selector"] for r in rows))
        head = {"mlp": "MLP density", "attn": "attention density", "both": "MLP / attention density"}[part]
        cols = [f"{d:.2f}" if part != "both" else
                f"{d:.2f} / {next(r['attn_density'] for r in rows if r[key] == d):.2f}" for d in dens]
        lines.append(f"| {head} | " + " | ".join(cols) + " |")
        lines.append("|---" * (len(dens) + 1) + "|")
        for n in names:
            vals = {r[key]: cell(r) for r in rows if r["selector"] == n}
            lines.append(f"| {n} | " + " | ".join(vals.get(d, "") for d in dens) + " |")
        lines.append("")
    lines.append("[reads N%]: MLP weights read per token where that differs from the density (the gate "
                 "selector reads all of W_gate; predictors add their own weights).")
    return "\n".join(lines)


def cell(row: dict) -> str:
    frac, md = row.get("mlp_bytes_fraction"), row.get("mlp_density")
    extra = f" [reads {frac:.0%}]" if frac is not None and md is not None and abs(frac - md) > 1e-6 else ""
    return f"{row['ppl']:.2f}{extra}"


def save(result: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    (out / "analysis.md").write_text(summary_table(result))
    plot(result, out)
