"""Input-side sparsity (TEAL / WINA), masked: keeping k input channels of a projection computes
what reading only those columns of its weight computes; the bytes accounting."""
import pytest
import torch
import torch.nn.functional as F

from dejavu.errors import DejavuError
from dejavu.selectors import InputSelector, OracleSelector, weights_read_fraction
from dejavu.sparse import INPUT_GROUPS, InputMasked, Masked, input_channels
from test_model import random_pair


def tokens(n=24, b=2, seed=0, vocab=101):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("score", ["teal", "wina"])
@pytest.mark.parametrize("name", ["llama-gqa", "llama-biases", "opt-relu"])
def test_input_sparsity_at_full_density_equals_dense(name, score):
    model, _ = random_pair(name)
    x = tokens()
    with torch.no_grad():
        dense = model(x)
        sel = InputMasked(model, InputSelector(model, score), 1.0)
        assert torch.equal(model(x, sparsity=sel), dense)
    assert all(sel.density(g) == 1.0 for g in INPUT_GROUPS)


@pytest.mark.parametrize("score", ["teal", "wina"])
@pytest.mark.parametrize("name", ["llama-biases", "opt-relu"])
def test_every_hook_keeps_exactly_k_channels_per_token(name, score):
    model, _ = random_pair(name)
    x = tokens()
    sel = InputMasked(model, InputSelector(model, score), dict(qkv=0.5, o=0.25, gate_up=0.75, down=0.4))
    with torch.no_grad():
        out = model(x, sparsity=sel)
    assert not torch.allclose(out, model(x))
    per_layer = x.numel() * model.cfg.n_layers
    for g, n in input_channels(model).items():
        assert sel.kept[g] == [per_layer * sel.k[g], per_layer * n]  # each group, each layer, each token: k of n
    mask = sel.inputs(0, "down", torch.randn(3, 5, model.cfg.d_ff)) != 0
    assert (mask.sum(-1) == sel.k["down"]).all()


@pytest.mark.parametrize("score", ["teal", "wina"])
@pytest.mark.parametrize("name", ["llama-biases", "opt-relu"])
def test_masked_projection_equals_reading_only_the_kept_columns(name, score):
    """Each group, by hand: the kept channels' columns of the weight (rows of W^T), F.linear."""
    model, _ = random_pair(name)
    sel = InputMasked(model, InputSelector(model, score), 0.5)
    layer = model.cfg.n_layers - 1
    attn, mlp = model.layers[layer].attn, model.layers[layer].mlp
    norms = dict(qkv=attn.wqkv.norm(dim=0), o=attn.wo_t.norm(dim=1), gate_up=mlp.w_in.flatten(0, 1).norm(dim=0),
                 down=mlp.w_out_t.norm(dim=1))
    weights = dict(qkv=(attn.wqkv, attn.bqkv), o=(attn.wo_t.T, attn.bo),
                   gate_up=(mlp.w_in.flatten(0, 1), None if mlp.b_in is None else mlp.b_in.flatten()),
                   down=(mlp.w_out_t.T, mlp.b_out))
    projections = dict(qkv=lambda v: torch.cat([t.transpose(1, 2).flatten(2) for t in attn.qkv(v)], -1),
                       o=attn.project_out, down=mlp.project_out,
                       gate_up=lambda v: F.linear(v, *weights["gate_up"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for group, n in input_channels(model).items():
            x = torch.randn(2, 5, n, generator=g)
            got = projections[group](sel.inputs(layer, group, x))
            s = x.abs() * (norms[group] if score == "wina" else 1)
            w, b = weights[group]
            for i in range(2):
                for t in range(5):
                    idx = s[i, t].topk(sel.k[group]).indices
                    want = F.linear(x[i, t, idx], w[:, idx], b)
                    assert torch.allclose(got[i, t], want, atol=1e-5), group


def test_wina_on_down_is_oracle_neuron_selection():
    """|a_i| * ||W_down[:, i]|| is the neuron importance: input-side wina on `down` alone
    selects what the oracle keeps (the hook sits where the model's activations enter W_down)."""
    model, _ = random_pair("llama-biases")
    x = tokens()
    with torch.no_grad():
        wina = model(x, sparsity=InputMasked(model, InputSelector(model, "wina"), dict(qkv=1, o=1, gate_up=1, down=0.5)))
        oracle = model(x, sparsity=Masked(model, mlp=OracleSelector(model), mlp_density=0.5))
    assert torch.allclose(wina, oracle, atol=1e-5)


def test_wina_and_teal_pick_differently_when_column_norms_differ():
    model, _ = random_pair("llama-gqa")
    with torch.no_grad():
        model.layers[0].attn.wqkv[:, 0] *= 0.01   # channel 0: a large input into small weights
        model.layers[0].attn.wqkv[:, 1] *= 100.0  # channel 1: a smaller input into large ones
    x = torch.zeros(1, 1, model.cfg.d_model)
    x[..., 0], x[..., 1] = 1.0, 0.5
    d = 1 / model.cfg.d_model  # one channel kept
    teal = InputMasked(model, InputSelector(model, "teal"), d).inputs(0, "qkv", x)
    wina = InputMasked(model, InputSelector(model, "wina"), d).inputs(0, "qkv", x)
    assert teal[0, 0].nonzero().flatten().tolist() == [0]
    assert wina[0, 0].nonzero().flatten().tolist() == [1]


def test_unsupported_input_side_uses_are_refused():
    model, _ = random_pair("llama-gqa")
    with pytest.raises(DejavuError, match="teal"):
        InputSelector(model, "magnitude")
    with pytest.raises(DejavuError, match="groups"):
        InputMasked(model, InputSelector(model), dict(qkv=0.5))
    with pytest.raises(DejavuError, match="must be in"):
        InputMasked(model, InputSelector(model), 1.5)
    with torch.no_grad(), pytest.raises(DejavuError, match="input channels, not neurons"):
        model(tokens(), sparsity=Masked(model, mlp=InputSelector(model), mlp_density=0.5))
    with pytest.raises(DejavuError, match="not built"):
        weights_read_fraction(model, neurons=OracleSelector(model), mlp_density=0.5, input_density=0.5)


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
    from dejavu.selectors import GateSelector
    gate = L * 96 * d * (1 + 0.75 + 0.5)   # all of W_gate, 1.5 k up rows, k down columns
    assert weights_read_fraction(model, GateSelector(model), None, 0.5) == pytest.approx(
        (gate + L * attn + small + head) / dense)
