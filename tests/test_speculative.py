"""Lossless mode (speculative.py): the sparse model drafts, the dense model verifies; the output
is the dense model's (greedy: token for token; sampling: in distribution)."""

import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, LlamaConfig

from dejavu.cli import main
from dejavu.generate import GenerationStats, generate, generate_ids
from dejavu.sampling import probabilities
from dejavu.kernels import cpu as cpu_kernels
from dejavu.errors import DejavuError
from dejavu.load import from_hf_model, load
from dejavu.predictor import Predictors
from dejavu.selectors import GateSelector, StaticSelector, default_selectors
from dejavu.sparse import Gathered, Masked
from dejavu.speculative import DraftLength, SpeculativeDecoder, expected_tokens, generate_lossless
from test_sparse import quick_predictors

PROMPTS = ["The history of the city of Paris", "def fibonacci(n):\n    ", "Photosynthesis is the process"]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """SmolLM2 with quick predictors trained here: never a checkout's runs/ folder, so CI and a
    developer's machine test the same thing."""
    loaded = load("smollm2-135m")
    folder = tmp_path_factory.mktemp("preds")
    quick_predictors(loaded.model, folder / "recording").save(folder)
    assert "runs" not in folder.parts
    return loaded, folder


def smol_draft(loaded, folder, mlp=0.5, attn=0.67):
    neurons, heads = default_selectors(loaded.model, Predictors.load(folder, loaded.model))
    return Gathered(loaded.model, mlp=neurons, heads=heads, mlp_density=mlp, attn_density=attn)


def test_greedy_lossless_is_dense_greedy_over_long_generations(smol):
    """120 tokens per prompt, drafts rejected along the way: the same tokens as dense greedy
    (the first prompt against the dense decode loop itself, all three against the dense
    argmax of every prefix)."""
    loaded, folder = smol
    model, tok = loaded.model, loaded.tokenizer
    for i, text in enumerate(PROMPTS):
        ids = tok(text).input_ids
        stats = GenerationStats()
        out = [int(t) for t in generate_lossless(model, [ids], 120, smol_draft(loaded, folder, 0.3, 0.56),
                                                 draft_tokens=3, stats=stats)]
        assert len(out) == 120
        assert 0 < stats.lossless.accepted < stats.lossless.drafted  # drafts were both kept and rejected
        with torch.no_grad():
            argmax = model(torch.tensor([ids + out[:-1]]))[0, len(ids) - 1:].argmax(-1).tolist()
        assert out == argmax
        if i == 0:
            assert out == generate_ids(model, [ids], 120)[0]


def test_lossless_on_the_command_line(smol, capsys):
    loaded, folder = smol
    argv = ["generate", "--prompt", "The capital of France is", "--max-new-tokens", "12"]
    assert main(argv) == 0
    dense = capsys.readouterr().out
    assert main(argv + ["--lossless", "--predictors", str(folder), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == dense and "lossless: dense output" in out.err and "drafts kept" in out.err
    assert main(argv + ["--lossless", "--prompt", "Hello", "--predictors", str(folder)]) == 2
    assert "one prompt at a time" in capsys.readouterr().err
    assert main(argv + ["--lossless", "--draft-tokens", "0", "--predictors", str(folder)]) == 2
    assert "--draft-tokens must be at least 1" in capsys.readouterr().err


# ---------------------------------------------------------------- a tiny random model

VOCAB = 8


def make_tiny(device="cpu"):
    """Random Llama with 8 tokens; lm_head scaled so the distributions are far from uniform, and a
    draft (gate-first MLP at 25%, half the heads by a random static ranking) that often disagrees."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=96, max_position_embeddings=64)
    model = from_hf_model(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()).to(device)
    with torch.no_grad():
        model.lm_head.mul_(20)
    heads = StaticSelector(None, [torch.rand(4, generator=torch.Generator().manual_seed(i)).to(device)
                                  for i in range(2)])
    kw = dict(mlp=GateSelector(model), heads=heads, mlp_density=0.25, attn_density=0.5)
    return model, lambda: Gathered(model, **kw), lambda: Masked(model, **kw)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


@pytest.fixture
def torch_reference(monkeypatch):  # the tiny model is faster without the fused kernel's threads
    monkeypatch.setattr(cpu_kernels, "ENABLED", False)


def dense_joint(model, prompt, temperature, top_p):
    """Exact dense probability of every (t1, t2, t3) after the prompt: [V, V, V]."""
    V = VOCAB
    pairs = torch.cartesian_prod(torch.arange(V), torch.arange(V))
    seqs = torch.cat([torch.tensor(prompt).expand(V * V, -1), pairs], dim=1).to(model.device)
    with torch.no_grad():
        p = probabilities(model(seqs)[:, -3:], temperature, top_p)  # [V*V, 3, V]
    p1, p2, p3 = p[0, 0], p[::V, 1], p[:, 2].view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def chi2_pvalue(samples: torch.Tensor, expected_p: torch.Tensor) -> float:
    """Chi-square goodness of fit of sampled (t1, t2, t3) rows; cells expected below 5 pooled."""
    n = len(samples)
    idx = (samples[:, 0] * VOCAB + samples[:, 1]) * VOCAB + samples[:, 2]
    observed = torch.bincount(idx, minlength=VOCAB ** 3).double()
    expected = expected_p.flatten().double() * n
    if observed[expected == 0].sum() > 0:  # samples outside the dense support (top-p): not dense
        return 0.0
    small = (expected < 5) & (expected > 0)
    obs = torch.cat([observed[expected >= 5], observed[small].sum()[None]])
    exp = torch.cat([expected[expected >= 5], expected[small].sum()[None]])
    if exp[-1] == 0:  # no small cells to pool
        obs, exp = obs[:-1], exp[:-1]
    exp = exp * obs.sum() / exp.sum()
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_sampled_distribution_is_dense(tiny, torch_reference, temperature, top_p):
    """3,000 lossless samples of three tokens (rounds of 2 drafts: kept drafts, rejections with a
    residual draw, bonus tokens, a second round after a rejection) fit the exact dense joint
    distribution: chi-square p-value > 0.001 (fixed seeds). The plain sparse model's samples, drawn
    the same way, fail the same test (p < 1e-6): the test can tell the two apart."""
    model, gathered, masked = tiny
    prompt, n = [1, 5, 2], 3000
    exact = dense_joint(model, prompt, temperature, top_p)
    lossless, kept, drafted = [], 0, 0
    for seed in range(n):
        stats = GenerationStats()
        steps = generate_lossless(model, [prompt], 3, gathered(), temperature=temperature, top_p=top_p, seed=seed,
                                  draft_tokens=2, stats=stats)
        lossless.append(torch.cat(list(steps)))
        kept, drafted = kept + stats.lossless.accepted, drafted + stats.lossless.drafted
    assert 0.2 < kept / drafted < 0.9  # both paths are exercised often
    assert chi2_pvalue(torch.stack(lossless), exact) > 1e-3
    sparse = torch.stack(list(generate(model, [prompt] * n, 3, temperature=temperature, top_p=top_p, seed=0,
                                       sparsity=masked())), dim=1)  # masked: every row its own units
    assert chi2_pvalue(sparse, exact) < 1e-6


def test_rejected_drafts_leave_no_trace(tiny, torch_reference):
    """After rounds with rejections, the cache holds the dense K/V of exactly the kept tokens and
    dense decoding continued from it equals dense decoding from scratch."""
    model, gathered, _ = tiny
    prompt = [7, 7, 7, 1]  # a prompt where the greedy draft is often wrong
    dec = SpeculativeDecoder(model, gathered(), prompt, 50, draft_tokens=4)
    out = [int(dec.prefill())]
    while len(out) < 30:
        out += dec.round(50 - len(out))
    assert dec.stats.rejected > 0
    dense = generate_ids(model, [prompt], 50)[0]
    assert out == dense[:len(out)]
    ref = model.new_cache(1, 60)
    with torch.no_grad():
        model(torch.tensor([prompt + out[:-1]]), ref, 0)
        n = dec.pos  # slots 0 .. pos-1 are prompt + kept tokens (the newest token is not fed yet)
        assert torch.allclose(dec.cache.k[:, :, :, :n], ref.k[:, :, :, :n], atol=1e-5)
        assert torch.allclose(dec.cache.v[:, :, :, :n], ref.v[:, :, :, :n], atol=1e-5)
        nxt, cont = out[-1], []
        for pos in range(n, n + 10):
            nxt = int(model(torch.tensor([[nxt]]), dec.cache, pos)[0, -1].argmax())
            cont.append(nxt)
    assert out + cont == dense[:len(out) + len(cont)]


def test_bad_requests_are_refused(tiny):
    model, gathered, _ = tiny
    with pytest.raises(DejavuError, match="one prompt at a time"):
        list(generate_lossless(model, [[1, 2], [3, 4]], 4, gathered()))
    with pytest.raises(DejavuError, match="needs a sparse draft"):
        list(generate_lossless(model, [[1, 2]], 4, None))
    with pytest.raises(DejavuError, match="at least 1"):
        list(generate_lossless(model, [[1, 2]], 4, gathered(), draft_tokens=0))


def test_draft_length_follows_acceptance_and_cost():
    """The adaptive k: long drafts when drafts are kept and cheap, dense decoding (k = 0) when a
    draft step costs as much as a dense step, a probe draft now and then to notice a change."""
    assert expected_tokens(0.0, 4) == 1 and expected_tokens(1.0, 4) == 5
    def settle(alpha, t_draft, rounds=40):
        sched, ks = DraftLength(k_start=4, k_max=8), []
        for r in range(rounds):
            k = sched.k
            kept = min(k, round(alpha * (r % 4 + 1)))  # about alpha of the drafts, varied
            sched.update(k, kept if alpha < 1 else k, k * t_draft, 1.0 + 0.02 * (k + 1))
            ks.append(sched.k)
        return ks
    assert settle(1.0, 0.1)[-1] >= 6                   # everything kept, drafts cheap: draft long
    assert all(k <= 1 for k in settle(0.5, 0.9)[5:])    # drafts as costly as dense: dense, probing with k=1
    assert 1 in settle(0.5, 0.9)[5:]


# ---------------------------------------------------------------- CUDA: the graph rounds

@pytest.fixture(scope="module")
def tiny_cuda():
    return make_tiny("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("k", [4, None])
def test_lossless_on_cuda_replays_graphs_and_is_dense_greedy(tiny_cuda, k, monkeypatch):
    """On CUDA the rounds replay graphs (one for the draft step, one per verification length,
    all captured before the first round) and give the dense graph decode's greedy tokens, with drafts
    both kept and rejected on the way."""
    from dejavu import engine
    model, gathered, _ = tiny_cuda
    captured = []
    real = engine.capture_graph
    monkeypatch.setattr(engine, "capture_graph", lambda step: captured.append(step) or real(step))
    stats = GenerationStats()
    out = [int(t) for t in generate_lossless(model, [[7, 7, 7, 1]], 50, gathered(), draft_tokens=k, stats=stats)]
    assert len(captured) == 1 + (k or 8) + 1 < stats.lossless.rounds  # the draft step, verify T = 1 .. k + 1
    assert out == generate_ids(model, [[7, 7, 7, 1]], 50)[0]
    assert 0 < stats.lossless.accepted < stats.lossless.drafted


@pytest.mark.gpu
@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_sampled_distribution_on_cuda_is_dense(tiny_cuda, temperature, top_p):
    """The CPU test's 3,000 three-token samples through the CUDA rounds (drafts drawn in the
    graph from q, kept with probability min(1, p/q)) fit the exact dense joint distribution;
    the plain sparse model's samples fail the same test."""
    from dejavu.speculative import GraphSpeculativeDecoder
    model, gathered, masked = tiny_cuda
    prompt, n = [1, 5, 2], 3000
    exact = dense_joint(model, prompt, temperature, top_p).cpu()
    dec = GraphSpeculativeDecoder(model, gathered(), prompt, 3, temperature, top_p, seed=0, draft_tokens=2)
    samples, kept, drafted = [], 0, 0
    for seed in range(n):
        dec.restart(seed)
        out = [int(dec.prefill())]
        while len(out) < 3:
            out += dec.round(3 - len(out))
        samples.append(out)
        kept, drafted = kept + dec.stats.accepted, drafted + dec.stats.drafted
    assert 0.2 < kept / drafted < 0.9
    assert chi2_pvalue(torch.tensor(samples), exact) > 1e-3
    sparse = torch.stack(list(generate(model, [prompt] * n, 3, temperature=temperature, top_p=top_p, seed=0,
                                       sparsity=masked())), dim=1).cpu()
    assert chi2_pvalue(sparse, exact) < 1e-6
