"""Masked sparse execution, recording, predictors: correctness on real and random models."""
import json

import pytest
import torch
import torch.nn.functional as F

from dejavu.collect import load_layer, read_manifest, record
from dejavu.errors import DejavuError
from dejavu.predictor import Predictors, TrainSettings, selection_metrics, train
from dejavu.selectors import GateSelector, OracleSelector, PredictorSelector, StaticSelector
from dejavu.sparse import Masked, Recorder, head_importance
from test_model import random_pair


def tokens(n=64, b=2, seed=0, vocab=101):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "gemma-geglu", "llama-biases", "qwen2-qkv-bias",
                                  "qwen3-qk-norm", "phi3-fused", "gemma3-local-global"])
def test_masked_at_full_density_equals_dense(name):
    model, _ = random_pair(name)
    x = tokens()
    oracle = OracleSelector(model)
    static = StaticSelector([torch.rand(model.cfg.d_ff)] * 3, [torch.rand(model.cfg.n_heads)] * 3)
    with torch.no_grad():
        dense = model(x)
        for sel in (oracle, static):
            mask = Masked(model, mlp=sel, heads=sel, mlp_density=1.0, attn_density=1.0)
            assert torch.equal(model(x, sparsity=mask), dense)
            assert mask.kept["mlp"][0] == mask.kept["mlp"][1] > 0


def test_masking_really_changes_the_output_and_density_is_achieved():
    model, _ = random_pair("llama-gqa")
    x = tokens()
    with torch.no_grad():
        dense = model(x)
        mask = Masked(model, mlp=OracleSelector(model), mlp_density=0.25)
        sparse = model(x, sparsity=mask)
    assert not torch.allclose(sparse, dense)
    kept, total = mask.kept["mlp"]
    assert kept / total == pytest.approx(round(0.25 * 96) / 96)


def test_oracle_beats_static_on_the_real_model(smollm2):
    """The paper's contextual-vs-static claim, on SmolLM2, on one held-out window."""
    loaded, _ = smollm2
    model = loaded.model
    from dejavu.data import wiki_split
    from dejavu.evaluate import perplexity, token_stream
    held = token_stream(loaded.tokenizer, wiki_split("heldout"), 256)
    rec = Recorder(model)
    with torch.no_grad():
        model(token_stream(loaded.tokenizer, wiki_split("calibration"), 512)[None], sparsity=rec)
    static = StaticSelector([t.mean(0) for t in rec.neuron_imp], [t.mean(0) for t in rec.head_imp])
    oracle = OracleSelector(model)
    ppl = {name: perplexity(model, held, 256, progress=False,
                            sparsity=Masked(model, mlp=sel, mlp_density=0.5)).ppl
           for name, sel in (("oracle", oracle), ("static", static), ("gate", GateSelector(model)))}
    dense = perplexity(model, held, 256, progress=False).ppl
    assert dense < ppl["oracle"] < ppl["gate"] < ppl["static"]


def test_relu_model_records_exact_zero_labels(tmp_path):
    model, _ = random_pair("opt-relu")
    stream = tokens(n=256, b=1)[0]
    record(model, stream, tmp_path, window=64, shard_tokens=128, progress=False)
    assert read_manifest(tmp_path, model)["shards"] == 2
    data = load_layer(tmp_path, ["resid.1", "neuron.1"])
    with torch.no_grad():  # recompute fc1 pre-activations from the recorded input path
        rec = Recorder(model)
        rec.keep_acts = True
        model(stream.view(-1, 64), sparsity=rec)
    a = rec.acts[1]
    zero = data["neuron.1"] == 0
    assert zero.float().mean() > 0.2                     # ReLU: many exact zeros
    assert torch.equal(zero, a <= 0)                     # ... exactly where the neuron is off
    assert torch.allclose(data["resid.1"], rec.resid[1].float(), atol=1e-2, rtol=1e-2)  # fp16 on disk


def test_recording_resumes_and_refuses_another_model(tmp_path):
    model, _ = random_pair("llama-gqa")
    stream = tokens(n=512, b=1)[0]
    record(model, stream, tmp_path, window=64, shard_tokens=128, progress=False)
    before = (tmp_path / "shard-00001.safetensors").stat().st_mtime_ns
    (tmp_path / "shard-00002.safetensors").unlink()      # an interrupted run
    record(model, stream, tmp_path, window=64, shard_tokens=128, progress=False)
    assert (tmp_path / "shard-00002.safetensors").exists()
    assert (tmp_path / "shard-00001.safetensors").stat().st_mtime_ns == before  # not redone
    other, _ = random_pair("llama-gqa", seed=1)
    with pytest.raises(DejavuError, match="another model"):
        record(other, stream, tmp_path, window=64, shard_tokens=128, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model, _ = random_pair("llama-gqa")
    rec = tmp_path_factory.mktemp("rec")
    record(model, tokens(n=2048, b=1)[0], rec, window=128, shard_tokens=512, progress=False)
    preds = train(model, rec, TrainSettings(epochs=3), progress=False)
    return model, preds


def test_predictors_round_trip(trained, tmp_path):
    model, preds = trained
    preds.save(tmp_path)
    again = Predictors.load(tmp_path, model)
    x = torch.randn(5, model.cfg.d_model)
    for a, b in zip(preds.mlp + preds.heads, again.mlp + again.heads):
        assert torch.equal(a(x), b(x))
    assert again.meta["metrics"] == json.loads(json.dumps(preds.meta["metrics"]))
    mask = Masked(model, mlp=PredictorSelector(again), heads=PredictorSelector(again), mlp_density=0.5,
                  attn_density=0.5)
    with torch.no_grad():
        assert torch.isfinite(model(tokens(), sparsity=mask)).all()


def test_mismatched_or_corrupt_predictors_are_refused(trained, tmp_path):
    model, preds = trained
    preds.save(tmp_path)
    other, _ = random_pair("opt-relu")
    with pytest.raises(DejavuError, match="made for another model.*llama.*not this one.*opt"):
        Predictors.load(tmp_path, other)
    (tmp_path / "predictors.safetensors").write_bytes(b"broken")
    with pytest.raises(DejavuError, match="corrupt"):
        Predictors.load(tmp_path, model)
    with pytest.raises(DejavuError, match="holds no predictors"):
        Predictors.load(tmp_path / "missing", model)


def test_head_tuning_lowers_the_kl_and_leaves_the_model_alone(trained):
    """tune_heads: the tuned head predictors keep the sparse model closer to the dense one (KL,
    hard top-k masks, on the tuning text); the model's weights and requires_grad are untouched."""
    import copy
    from dejavu.predictor import tune_heads
    model, preds = trained
    nets = [copy.deepcopy(n) for n in preds.heads]
    stream = tokens(n=4096, b=1, seed=3)[0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.requires_grad for p in model.parameters()]
    x = stream[:512].view(4, 128)  # the model's context is 128: tuning windows are 128 too
    k = 2  # of the model's 4 heads: one of the tuned head counts

    def kl():
        sel = PredictorSelector(Predictors(preds.mlp, nets, None, None, preds.meta))
        with torch.no_grad():
            dense = F.log_softmax(model(x), -1)
            sparse = F.log_softmax(model(x, sparsity=Masked(model, heads=sel, attn_density=k / 4)), -1)
        return F.kl_div(sparse.flatten(0, 1), dense.flatten(0, 1), log_target=True, reduction="batchmean").item()
    assert model.cfg.n_heads == 4
    before = kl()
    info = tune_heads(model, nets, preds.meta["lookahead"], stream,
                      TrainSettings(tune_tokens=4096, tune_epochs=4, tune_lr=1e-2), progress=False)
    assert info["steps"] == 4 * 4096 // 128 // 4 and k in info["head_counts"]
    assert kl() < 0.95 * before  # a random model is close to dense already: 0.0034 -> 0.0030 here
    assert all(torch.equal(v, model.state_dict()[k_]) for k_, v in weights.items())
    assert [p.requires_grad for p in model.parameters()] == grads


def test_selection_metrics_on_known_rankings():
    imp = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    perfect = selection_metrics(imp, imp, 0.5, 0.9)
    assert perfect["recall"] == 1.0 and perfect["calibrated_density"] == 0.5
    reversed_ = selection_metrics(-imp, imp, 0.5, 0.9)
    assert reversed_["recall"] == 0.0 and reversed_["calibrated_density"] == 1.0


@pytest.mark.parametrize("bad", [0.0, 1.5, -0.1])
def test_impossible_densities_are_refused(bad):
    model, _ = random_pair("llama-gqa")
    with pytest.raises(DejavuError, match="density must be in \\(0, 1\\]"):
        Masked(model, mlp=OracleSelector(model), mlp_density=bad)


def test_head_importance_is_the_norm_of_the_contribution():
    model, _ = random_pair("llama-gqa")
    attn = model.layers[0].attn
    y = torch.randn(1, 3, 4, 16)
    full = (y.reshape(1, 3, 64) @ attn.wo_t)
    contribs = [(y[:, :, h] @ attn.wo_t[h * 16:(h + 1) * 16]) for h in range(4)]
    assert torch.allclose(sum(contribs), full, atol=1e-5)
    assert torch.allclose(head_importance(attn.wo_t, y)[0, :, 2], contribs[2][0].norm(dim=-1), atol=1e-5)


def test_same_layer_predictors_need_and_use_the_mlp_input(tmp_path):
    model, _ = random_pair("llama-gqa")
    stream = tokens(n=1024, b=1)[0]
    record(model, stream, tmp_path / "la", window=128, shard_tokens=256, progress=False)
    with pytest.raises(DejavuError, match="same-layer predictors need"):
        train(model, tmp_path / "la", TrainSettings(epochs=1, lookahead=False), progress=False)
    record(model, stream, tmp_path / "same", window=128, shard_tokens=256, progress=False, same_layer=True)
    preds = train(model, tmp_path / "same", TrainSettings(epochs=1, lookahead=False), progress=False)
    assert preds.meta["lookahead"] is False
    sel = PredictorSelector(preds)
    x_in, resid = torch.randn(1, 4, 64), [torch.randn(1, 4, 64)] * 3
    a = torch.zeros(1, 4, 96)
    assert torch.equal(sel.neuron_scores(2, resid, x_in, a), preds.mlp[2](x_in))


def test_allocation_keeps_the_mean_and_favours_cheap_layers():
    from dejavu.predictor import GRID, allocate
    cheap = [0.0] * len(GRID)                             # losing units here costs nothing
    costly = [1.0 - d for d in GRID]                      # here every unit dropped costs
    dens = allocate([cheap, costly], 0.55, 100)
    assert dens[0] < dens[1] and sum(dens) / 2 == pytest.approx(0.55, abs=0.03)
    with pytest.raises(DejavuError):
        allocate([cheap], 0.0, 100)


def quick_predictors(model, folder):
    """Predictors trained for one epoch on 1,024 random tokens: enough to select with."""
    record(model, tokens(n=1024, b=1)[0], folder, window=128, shard_tokens=256, progress=False)
    return train(model, folder, TrainSettings(epochs=1), progress=False)


def decode_side_by_side(model, gathered, masked, prompt, length, atol):
    """Dense prefill, then gathered and masked decode in step; their logits must agree at every
    step. A third cache decodes the same tokens densely. Returns the last token, the last gathered
    and dense logits (same context: same tokens, same slots) and the gathered and masked caches."""
    caches = [model.new_cache(len(prompt), length) for _ in range(3)]
    with torch.no_grad():
        nxt = model(prompt, caches[0], 0)[:, -1].argmax(-1)
        model(prompt, caches[1], 0)
        model(prompt, caches[2], 0)
        for pos in range(prompt.shape[1], length):
            lg = model(nxt[:, None], caches[0], pos, sparsity=gathered)
            lm = model(nxt[:, None], caches[1], pos, sparsity=masked)
            dense = model(nxt[:, None], caches[2], pos)
            assert torch.allclose(lg, lm, atol=atol, rtol=1e-4), pos
            nxt = lg[:, -1].argmax(-1)
    return nxt, lg, dense, caches[:2]


@pytest.mark.parametrize("name,batch,selector", [("llama-gqa", 1, "predicted"), ("llama-gqa", 3, "predicted"),
                                                 ("opt-relu", 2, "predicted"), ("llama-gqa", 2, "gate"),
                                                 ("llama-gqa", 1, "gate"), ("gemma-geglu", 1, "gate"),
                                                 ("llama-gqa", 1, "gate, torch path"),
                                                 ("llama-biases", 1, "predicted"), ("qwen2-qkv-bias", 2, "predicted"),
                                                 ("llama-biases", 2, "gate"), ("llama-biases", 1, "gate"),
                                                 ("llama-biases", 1, "gate, torch path"),
                                                 ("qwen3-qk-norm", 2, "predicted"), ("qwen3-qk-norm", 1, "gate"),
                                                 ("phi3-fused", 1, "predicted"), ("mistral-window", 2, "predicted"),
                                                 ("gemma3-local-global", 1, "predicted"), ("gemma3-local-global", 2, "gate"),
                                                 ("gemma2-softcap", 2, "predicted")])
def test_gathered_equals_masked_over_a_generation(name, batch, selector, tmp_path, monkeypatch):
    """The fast path computes what was evaluated: same selection -> same logits, step after step
    over the KV cache (batch > 1: both use the batch's union of sets)."""
    from dejavu.kernels import cpu as cpu_kernels
    from dejavu.sparse import Gathered
    if selector == "gate, torch path":  # the one-token torch path the GPU uses, not the fused C++ call
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    model, _ = random_pair(name)
    preds = quick_predictors(model, tmp_path)
    pick = lambda: (GateSelector(model) if selector.startswith("gate") else PredictorSelector(preds), PredictorSelector(preds))
    (n1, h1), (n2, h2) = pick(), pick()
    gathered = Gathered(model, mlp=n1, heads=h1, mlp_density=0.4, attn_density=0.5)
    masked = Masked(model, mlp=n2, heads=h2, mlp_density=0.4, attn_density=0.5, union=True)
    nxt, lg, dense, caches = decode_side_by_side(model, gathered, masked, tokens(n=9, b=batch, seed=5), 40, atol=1e-5)
    assert not torch.allclose(lg, dense, atol=1e-3)  # sparsity really acted (dense: the same tokens and slots)
    assert torch.allclose(caches[0].k, caches[1].k, atol=1e-5) and torch.allclose(caches[0].v, caches[1].v, atol=1e-5)
    one_token = round(0.4 * model.cfg.d_ff) / model.cfg.d_ff
    assert gathered.density("mlp") == masked.density("mlp")
    if batch > 1:
        assert gathered.density("mlp") > one_token  # the union of several tokens' sets is larger
    else:
        assert gathered.density("mlp") == pytest.approx(one_token)


@pytest.mark.parametrize("name,batch,selector", [("llama-gqa", 3, "predicted"), ("opt-relu", 2, "predicted"),
                                                 ("llama-gqa", 2, "gate"), ("llama-biases", 2, "gate"),
                                                 ("qwen2-qkv-bias", 2, "predicted")])
def test_a_set_per_row_equals_each_tokens_own_masked_selection(name, batch, selector, tmp_path):
    """Gathered.per_row (serving): every row gathers its own top-k, which is what the masked
    evaluation computes token by token (no union); a free row (live 0) computes nothing and
    changes nothing for the others."""
    from dejavu.sparse import Gathered
    model, _ = random_pair(name)
    preds = quick_predictors(model, tmp_path)
    pick = lambda: (GateSelector(model) if selector == "gate" else PredictorSelector(preds), PredictorSelector(preds))
    (n1, h1), (n2, h2) = pick(), pick()
    live = torch.ones(batch, dtype=torch.long)
    gathered = Gathered(model, mlp=n1, heads=h1, mlp_density=0.4, attn_density=0.5).per_row(live)
    masked = Masked(model, mlp=n2, heads=h2, mlp_density=0.4, attn_density=0.5)
    prompt = tokens(n=9, b=batch, seed=5)
    nxt, lg, dense, _ = decode_side_by_side(model, gathered, masked, prompt, 30, atol=1e-5)
    assert not torch.allclose(lg, dense, atol=1e-3)
    assert gathered.density("mlp") == pytest.approx(round(0.4 * model.cfg.d_ff) / model.cfg.d_ff)
    live[1] = 0  # row 1 free: the others' logits are unchanged, its MLP and attention output only biases
    caches = [model.new_cache(batch, 16) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(prompt, c, 0)
        freed = model(nxt[:, None], caches[0], 9, sparsity=gathered)
        live[1] = 1
        every = model(nxt[:, None], caches[1], 9, sparsity=gathered)
    rest = [r for r in range(batch) if r != 1]
    assert torch.allclose(freed[rest], every[rest], atol=1e-6) and not torch.allclose(freed[1], every[1], atol=1e-3)


def test_the_same_context_check_sees_a_dense_run():
    """decode_side_by_side's dense logits are the dense step over the same context: with dense
    "sparse" runs (no selectors) the gathered logits equal them (the generation test's `not
    allclose` then means sparsity acted)."""
    from dejavu.sparse import Gathered
    model, _ = random_pair("llama-gqa")
    _, lg, dense, _ = decode_side_by_side(model, Gathered(model), Masked(model), tokens(n=9, b=2, seed=5), 20,
                                          atol=1e-5)
    assert torch.allclose(lg, dense, atol=1e-5)


@pytest.mark.parametrize("path", ["fused C++", "torch"])
@pytest.mark.parametrize("batch", [1, 2])
def test_gate_first_with_mlp_biases_at_full_density_is_dense(path, batch, monkeypatch):
    """mlp_bias (Llama configs may ask for it): gate-first selection keeping every neuron computes the
    dense MLP, gate and up biases included (gathered decode: the dense logits), and its masked-mode
    scores are then the true importances (the oracle's)."""
    from dejavu.kernels import cpu as cpu_kernels
    from dejavu.sparse import Gathered
    if path == "torch":
        monkeypatch.setattr(cpu_kernels, "ENABLED", False)
    model, _ = random_pair("llama-biases")
    assert model.layers[0].mlp.b_in is not None and model.layers[0].mlp.b_in.abs().min() > 0
    prompt, nxt = tokens(n=9, b=batch, seed=5), tokens(n=1, b=batch, seed=6)
    caches = [model.new_cache(batch, 16) for _ in range(2)]
    with torch.no_grad():
        for c in caches:
            model(prompt, c, 0)
        got = model(nxt, caches[0], 9, sparsity=Gathered(model, mlp=GateSelector(model), mlp_density=1.0))
        want = model(nxt, caches[1], 9)
        x = torch.randn(batch, 3, model.cfg.d_model)
        mlp = model.layers[1].mlp
        scores = GateSelector(model).neuron_scores(1, None, x, k=model.cfg.d_ff)
        oracle = OracleSelector(model).neuron_scores(1, None, x, out=mlp.activations(x))
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert torch.allclose(scores, oracle, atol=1e-5, rtol=1e-4)
