"""Input-side sparsity (TEAL / WINA): calibrated thresholds; masked (a token's channels below the
bar zeroed) computes what reading only the passing columns of the weight computes; gathered decode
(kernels.linear, input-major or not) equals masked; the bytes accounting."""
import pytest
import torch
import torch.nn.functional as F

from dejavu import kernels
from dejavu.errors import DejavuError
from dejavu.selectors import GateSelector, InputSelector, OracleSelector, weights_read_fraction
from dejavu.sparse import (INPUT_GROUPS, InputSparsity, Masked, allocate_input_densities, calibrate_thresholds,
                           input_group_params, neuron_importance, neuron_norms)
from test_model import random_pair


def tokens(n=24, b=2, seed=0, vocab=101):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def input_sparsity(model, score, density, gathered=False, calibration=None):
    sel = InputSelector(model, score)
    calibration = tokens(48, 2, seed=7) if calibration is None else calibration
    return InputSparsity(model, sel, calibrate_thresholds(model, sel, calibration, density), gathered)


@pytest.mark.parametrize("score", ["teal", "wina"])
@pytest.mark.parametrize("name", ["llama-gqa", "llama-biases", "opt-relu"])
def test_input_sparsity_at_full_density_equals_dense(name, score):
    model, _ = random_pair(name)
    x = tokens()
    with torch.no_grad():
        dense = model(x)
        sp = input_sparsity(model, score, 1.0)
        assert torch.equal(model(x, sparsity=sp), dense)
    assert all(sp.density(g) == 1.0 for g in INPUT_GROUPS)


@pytest.mark.parametrize("score", ["teal", "wina"])
def test_thresholds_keep_the_calibrated_share_of_the_calibration_text(score):
    model, _ = random_pair("llama-biases")
    calib = tokens(64, 2, seed=5)
    densities = dict(qkv=0.5, o=0.25, gate_up=0.75, down=0.4)
    sp = input_sparsity(model, score, densities, calibration=calib)
    with torch.no_grad():
        out = model(calib, sparsity=sp)
    assert not torch.allclose(out, model(calib))
    for g, d in densities.items():  # the masked run sees slightly different inputs from layer 1 on
        assert sp.density(g) == pytest.approx(d, abs=0.05), g
    first = [t["qkv"] for t in sp.thresholds][0]  # layer 0's qkv input is the same as in calibration: exact
    h = model.layers[0].attn_norm(model.embed(calib, model.positions(*calib.shape, 0, None)))
    assert (sp.selector.input_scores(0, "qkv", h) > first).float().mean() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("score", ["teal", "wina"])
@pytest.mark.parametrize("name", ["llama-biases", "opt-relu"])
def test_masked_projection_equals_reading_only_the_passing_columns(name, score):
    """Each group, by hand: the passing channels' columns of the weight (rows of W^T), F.linear."""
    model, _ = random_pair(name)
    sel = InputSelector(model, score)
    layer = model.cfg.n_layers - 1
    attn, mlp = model.layers[layer].attn, model.layers[layer].mlp
    norms = dict(qkv=attn.wqkv.norm(dim=0), o=attn.wo_t.norm(dim=1), gate_up=mlp.w_in.flatten(0, 1).norm(dim=0),
                 down=mlp.w_out_t.norm(dim=1))
    weights = dict(qkv=(attn.wqkv, attn.bqkv), o=(attn.wo_t.T, attn.bo),
                   gate_up=(mlp.w_in.flatten(0, 1), None if mlp.b_in is None else mlp.b_in.flatten()),
                   down=(mlp.w_out_t.T, mlp.b_out))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        channels = dict(qkv=model.cfg.d_model, o=attn.wo_t.shape[0], gate_up=model.cfg.d_model, down=model.cfg.d_ff)
        for group, n in channels.items():
            x = torch.randn(2, 5, n, generator=g)
            w, b = weights[group]
            s = x.abs() * (norms[group] if score == "wina" else 1)
            bar = [dict.fromkeys(INPUT_GROUPS, float(s.median())) for _ in range(model.cfg.n_layers)]
            got = F.linear(InputSparsity(model, sel, bar).inputs(layer, group, x), w, b)
            for i in range(2):
                for t in range(5):
                    idx = (s[i, t] > bar[0][group]).nonzero().flatten()
                    assert 0 < len(idx) < n
                    want = F.linear(x[i, t, idx], w[:, idx], b)
                    assert torch.allclose(got[i, t], want, atol=1e-5), group


def decode_logits(model, prompt, steps, sparsity):
    """Dense prefill, then `steps` greedy decode steps with `sparsity`: the logits of each step."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + steps + 1)
    out = []
    with torch.no_grad():
        nxt = model(prompt, cache, 0)[:, -1:].argmax(-1)
        for i in range(steps):
            logits = model(nxt, cache, prompt.shape[1] + i, sparsity)[:, -1]
            out.append(logits)
            nxt = logits.argmax(-1, keepdim=True)
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["llama-biases", "qwen2-qkv-bias", "gemma-geglu", "opt-relu", "qwen3-qk-norm",
                                  "gemma3-local-global"])
def test_gathered_decode_equals_masked(name):
    """One token at a time: the projection applying the rule itself (kernels.linear: the C++ row
    gather on an input-major model, torch on the output-major one) gives the masked logits."""
    model, _ = random_pair(name)
    prompt = tokens(12, 1, seed=2)
    masked = decode_logits(model, prompt, 6, input_sparsity(model, "wina", 0.5))
    gathered = decode_logits(model, prompt, 6, input_sparsity(model, "wina", 0.5, gathered=True))
    assert torch.allclose(gathered, masked, atol=1e-4)
    model.to_input_major()
    assert kernels.is_input_major(model.layers[0].attn.wqkv) and kernels.is_input_major(
        model.layers[0].mlp.w_in.flatten(0, 1))
    major = decode_logits(model, prompt, 6, input_sparsity(model, "wina", 0.5, gathered=True))
    assert torch.allclose(major, masked, atol=1e-4)
    assert not torch.allclose(major, decode_logits(model, prompt, 6, None), atol=1e-3)  # it is sparse


def test_gathered_batch_reads_the_union_of_its_rows():
    model, _ = random_pair("llama-biases")
    model.to_input_major()
    sp = input_sparsity(model, "teal", 0.3, gathered=True)
    rule = sp.input_rule(1, "down")
    mlp = model.layers[1].mlp
    a = torch.randn(3, 1, model.cfg.d_ff, generator=torch.Generator().manual_seed(4)) * rule.threshold * 0.7
    union = rule.keep(a).any(0)
    assert 0 < union.float().mean() < 1
    with torch.no_grad():
        assert torch.allclose(mlp.project_out(a, rule), F.linear(a * union, mlp.w_out_t.T, mlp.b_out), atol=1e-5)


def test_input_major_model_is_the_same_model():
    model, hf = random_pair("llama-biases")
    x = tokens()
    with torch.no_grad():
        dense = model(x)
        model.to_input_major()
        assert torch.allclose(model(x), dense, atol=1e-5)
        assert torch.allclose(decode_logits(model, x, 3, None), decode_logits(random_pair("llama-biases")[0], x, 3, None),
                              atol=1e-5)


def test_wina_on_down_scores_neurons_by_their_importance():
    """|a_i| * ||W_down[:, i]|| is the neuron importance the oracle ranks by."""
    model, _ = random_pair("llama-biases")
    a = torch.randn(2, 3, model.cfg.d_ff)
    assert torch.allclose(InputSelector(model, "wina").input_scores(1, "down", a),
                          neuron_importance(a, neuron_norms(model)[1]))


def test_wina_and_teal_pick_differently_when_column_norms_differ():
    model, _ = random_pair("llama-gqa")
    with torch.no_grad():
        model.layers[0].attn.wqkv[:, 0] *= 0.01   # channel 0: a large input into small weights
        model.layers[0].attn.wqkv[:, 1] *= 100.0  # channel 1: a smaller input into large ones
    x = torch.zeros(1, 1, model.cfg.d_model)
    x[..., 0], x[..., 1] = 1.0, 0.5
    kept = {}
    for score in ("teal", "wina"):
        sel = InputSelector(model, score)
        s = sel.input_scores(0, "qkv", x)[0, 0]
        bar = [dict.fromkeys(INPUT_GROUPS, float(s[:2].min())) for _ in range(model.cfg.n_layers)]
        kept[score] = InputSparsity(model, sel, bar).inputs(0, "qkv", x)[0, 0].nonzero().flatten().tolist()
    assert kept == dict(teal=[0], wina=[1])


def test_unsupported_input_side_uses_are_refused():
    model, _ = random_pair("llama-gqa")
    sel = InputSelector(model)
    with pytest.raises(DejavuError, match="teal"):
        InputSelector(model, "magnitude")
    with pytest.raises(DejavuError, match="groups"):
        calibrate_thresholds(model, sel, tokens(), dict(qkv=0.5))
    with pytest.raises(DejavuError, match="must be in"):
        calibrate_thresholds(model, sel, tokens(), 1.5)
    with pytest.raises(DejavuError, match="calibration tokens"):
        calibrate_thresholds(model, sel, tokens(0, 1), 0.5)
    with pytest.raises(DejavuError, match="layers"):
        InputSparsity(model, sel, [dict.fromkeys(INPUT_GROUPS, 0.0)])
    with torch.no_grad(), pytest.raises(DejavuError, match="input channels, not neurons"):
        model(tokens(), sparsity=Masked(model, mlp=sel, mlp_density=0.5))
    with pytest.raises(DejavuError, match="not built"):
        weights_read_fraction(model, neurons=OracleSelector(model), mlp_density=0.5, input_density=0.5)
    model.to_input_major()  # neuron selection gathers output-major rows: a clear refusal, not wrong rows
    from dejavu.sparse import Gathered
    with torch.no_grad(), pytest.raises(DejavuError, match="input-major"):
        model(tokens(1, 1), model.new_cache(1, 4), 0, Gathered(model, GateSelector(model), None, 0.5))


def test_weights_read_fraction_on_a_tiny_config():
    """llama-gqa: d 64, 4 heads of 16, 2 K/V heads, d_ff 96, vocab 101, 3 layers, untied LM head."""
    model, _ = random_pair("llama-gqa")
    d, L = 64, 3
    attn = (64 + 64 + 2 * 32) * d          # Q, W_o, K and V
    mlp = 3 * 96 * d                        # gate, up, down
    small = L * 2 * d + d                   # the layers' two norms and the final norm (no biases here)
    head = 101 * d + d                      # the LM head in full, one embedding row
    dense = L * (attn + mlp) + small + head
    assert sum(p.numel() for p in model.parameters()) == dense + 100 * d  # what decode does not read: 100 rows
    assert weights_read_fraction(model) == pytest.approx(1.0)
    half = L * (attn + mlp) / 2 + small + head
    assert weights_read_fraction(model, input_density=0.5) == pytest.approx(half / dense)
    oracle = OracleSelector(model)
    heads = L * (2 * 32 + 2 * 64 * 0.5) * d
    assert weights_read_fraction(model, oracle, oracle, 0.5, 0.5) == pytest.approx(
        (L * mlp * 0.5 + heads + small + head) / dense)
    gate = L * 96 * d * (1 + 0.75 + 0.5)   # all of W_gate, 1.5 k up rows, k down columns
    assert weights_read_fraction(model, GateSelector(model), None, 0.5) == pytest.approx(
        (gate + L * attn + small + head) / dense)


def test_block_wise_greedy_reads_the_target_share_in_every_layer():
    """allocate_input_densities: each layer ends at the target share of its projection weights
    (within one step of the smallest group), groups may differ, and thresholds follow the result."""
    model, _ = random_pair("llama-biases")
    sel, calib = InputSelector(model, "wina"), tokens(48, 2, seed=7)
    alloc = allocate_input_densities(model, sel, calib, 0.6, step=0.1)
    params = input_group_params(model)
    total = sum(params.values())
    assert len(alloc) == model.cfg.n_layers
    for d in alloc:
        share = sum(d[g] * params[g] for g in INPUT_GROUPS) / total
        assert 0.6 - 0.1 * max(params.values()) / total - 1e-9 <= share <= 0.6 + 1e-9
        assert all(0 < d[g] <= 1 for g in INPUT_GROUPS)
    thresholds = calibrate_thresholds(model, sel, calib, alloc)
    sp = InputSparsity(model, sel, thresholds)
    with torch.no_grad():
        model(calib, sparsity=sp)
    reads = sum(sp.density(g) * params[g] for g in INPUT_GROUPS) / total
    assert reads == pytest.approx(0.6, abs=0.1)
    with pytest.raises(DejavuError, match="layers"):
        calibrate_thresholds(model, sel, calib, alloc[:1])
