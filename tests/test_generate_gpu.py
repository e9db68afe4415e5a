"""generate() on CUDA replays the CUDA-graph step (engine.GraphDecoder): the same greedy tokens
as the eager engine, seeded sampling on the device, stop tokens, and a clear error instead of
a step past the cache."""
import pytest
import torch

from dejavu import generate as gen_module
from dejavu.errors import DejavuError
from dejavu.generate import GenerationStats, generate_ids
from dejavu.sampling import probabilities

pytestmark = pytest.mark.gpu


@pytest.fixture(params=["llama-gqa", "opt-relu", "llama-biases"])
def model_and_preds(request, tmp_path):
    from test_model import random_pair
    from test_sparse import quick_predictors
    model, _ = random_pair(request.param)
    preds = quick_predictors(model, tmp_path)
    model = model.cuda()
    for p in preds.mlp + preds.heads:
        p.cuda()
    return model, preds


def gathered(model, preds):
    from dejavu.selectors import PredictorSelector
    from dejavu.sparse import Gathered
    return Gathered(model, PredictorSelector(preds), PredictorSelector(preds), 0.4, 0.5)


def eager(monkeypatch):
    monkeypatch.setattr(gen_module, "graph_step_applies", lambda *a: False)


@pytest.mark.parametrize("sparse", [False, True])
def test_generate_on_cuda_gives_the_eager_tokens(model_and_preds, sparse, monkeypatch):
    model, preds = model_and_preds
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4]] if not sparse else [[5, 9, 2, 7, 1, 3]]
    make = (lambda: gathered(model, preds)) if sparse else (lambda: None)
    assert gen_module.graph_step_applies(model, len(prompts), make(), None)
    stats = GenerationStats()
    got = generate_ids(model, prompts, 30, sparsity=make(), stats=stats)
    assert stats.decode_steps == 29 and stats.new_tokens == 30
    with monkeypatch.context() as m:
        eager(m)
        want = generate_ids(model, prompts, 30, sparsity=make())
    assert got == want


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_with_input_side_sparsity_on_cuda_gives_the_eager_tokens(batch, monkeypatch):
    """Input-side sparsity in generate: the graph step (Triton input_gather at batch 1, the rule's
    union at batch 2) gives the eager engine's tokens on an input-major model."""
    from dejavu.selectors import InputSelector
    from dejavu.sparse import InputSparsity, calibrate_thresholds
    from test_model import random_pair
    model = random_pair("llama-biases")[0].cuda().to_input_major()
    sel = InputSelector(model, "teal")
    thresholds = calibrate_thresholds(model, sel, torch.randint(0, 101, (2, 64), generator=torch.Generator()
                                                                .manual_seed(5)).cuda(), 0.5)
    make = lambda: InputSparsity(model, sel, thresholds, gathered=True)  # noqa: E731
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4]][:batch]
    assert gen_module.graph_step_applies(model, batch, make(), None)
    got = generate_ids(model, prompts, 30, sparsity=make())
    with monkeypatch.context() as m:
        eager(m)
        want = generate_ids(model, prompts, 30, sparsity=make())
    assert got == want
    x = torch.tensor([prompts[0]], device="cuda")
    with torch.no_grad():  # the thresholds really cut (the tiny model's greedy tokens may not show it)
        assert not torch.allclose(model(x, sparsity=InputSparsity(model, sel, thresholds)), model(x))


def test_stop_tokens_end_rows_on_cuda(model_and_preds, monkeypatch):
    model, _ = model_and_preds
    prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8]]
    free = generate_ids(model, prompts, 20)
    stop = free[0][11]  # a token the first row produces mid-chunk
    other = next(t for t in range(model.cfg.vocab_size) if t not in free[0] + free[1])  # never produced
    got = generate_ids(model, prompts, 20, eos_id=[other, stop])
    with monkeypatch.context() as m:
        eager(m)
        want = generate_ids(model, prompts, 20, eos_id=[other, stop])
    assert got == want and got[0][-1] == stop and len(got[0]) <= 12


def fit_pvalue(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Chi-square of drawn tokens against probabilities p [V]; cells expected below 5 pooled."""
    from scipy.stats import chisquare
    p = p.cpu().double() / p.double().sum().item()
    observed = torch.bincount(tokens.cpu(), minlength=len(p)).double()
    if observed[p == 0].sum() > 0:  # draws outside the support (top-p): another distribution
        return 0.0
    keep = p * len(tokens) >= 5
    obs, exp = observed[keep], p[keep] * len(tokens)
    if p[~keep].sum() > 0:  # the small cells, pooled
        obs, exp = torch.cat([obs, observed[~keep].sum()[None]]), torch.cat([exp, p[~keep].sum()[None] * len(tokens)])
    return float(chisquare(obs.numpy(), (exp * obs.sum() / exp.sum()).numpy()).pvalue)


def test_seeded_sampling_on_cuda_is_reproducible_and_draws_the_model_distribution(model_and_preds):
    """20,000 rows of one batch, each its own seeded stream: the first tokens (drawn after the
    prefill) and the second (drawn inside the graph) fit the model's distributions at
    temperature 0.9; the first tokens fail against temperature 1.8 (the negative control).
    The same seed gives the same text, another seed another. (Top-p is checked on the CPU: a
    batch of 20,000 rows computes logits a hair off the batch-1 reference, enough to move the
    nucleus' edge on this near-uniform random model.)"""
    model, _ = model_and_preds
    prompt, n, temp, top_p = [5, 9, 2, 7], 20000, 0.9, 0.95
    a = generate_ids(model, [prompt], 12, temperature=temp, top_p=top_p, seed=3)
    assert a == generate_ids(model, [prompt], 12, temperature=temp, top_p=top_p, seed=3)
    assert a != generate_ids(model, [prompt], 12, temperature=temp, top_p=top_p, seed=4)
    top_p = 1.0
    pairs = torch.tensor(generate_ids(model, [prompt] * n, 2, temperature=temp, seed=0))
    with torch.no_grad():
        logits = model(torch.tensor([prompt], device="cuda"))[0, -1]
    assert fit_pvalue(pairs[:, 0], probabilities(logits, temp, top_p)) > 1e-3
    assert fit_pvalue(pairs[:, 0], probabilities(logits, 1.8, 1.0)) < 1e-6
    # the second tokens' law: sum over the first token f of p(f) p(second | f), exactly
    V = logits.shape[-1]
    with torch.no_grad():
        after = model(torch.tensor([prompt + [f] for f in range(V)], device="cuda"))[:, -1]
    second = probabilities(logits, temp, top_p) @ probabilities(after, temp, top_p)
    assert fit_pvalue(pairs[:, 1], second) > 1e-3


def test_no_step_runs_past_the_cache(model_and_preds):
    from dejavu.engine import GraphDecoder
    model, _ = model_and_preds
    with pytest.raises(DejavuError, match="exceeds the model's context"):
        generate_ids(model, [[1] * 100], model.cfg.max_seq_len)
    dec = GraphDecoder(model, 1, 16)
    dec.prefill(torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]], device="cuda"))
    dec.decode(6)                      # slots 10..15: the cache is full
    with pytest.raises(DejavuError, match="run past the cache of 16"):
        dec.decode(1)


@pytest.mark.parametrize("on_trip", ["dense", "raise"])
def test_guarded_generate_on_cuda_replays_graphs_and_gives_the_eager_tokens(model_and_preds, on_trip, monkeypatch):
    """The guard at batch 1 on the graphs (chunks of unchecked sparse replays, each checked step
    a sparse and a dense replay at the same slot, a trip switching to the dense graph or to a
    new sparse one): the eager guard's tokens and counters."""
    from dejavu import guard as guard_module
    from dejavu.guard import Guard, GuardSettings
    model, preds = model_and_preds
    settings = GuardSettings(check_every=4, warmup=1, window=2, min_agreement=0.75, on_trip=on_trip)
    real = guard_module.kl_and_agreement
    checks = []

    def every_third_check_disagrees(dense, sparse):  # the tiny models' top-1 never flips: make it
        kl, agree = real(dense, sparse)
        checks.append(None)
        return kl, agree * (len(checks) % 3 != 0)
    monkeypatch.setattr(guard_module, "kl_and_agreement", every_third_check_disagrees)

    def run():
        checks.clear()
        guard = Guard.from_predictors(model, preds, 0.1, 0.25, settings)
        out = generate_ids(model, [[5, 9, 2, 7, 1, 3]], 40, guard=guard)
        m = guard.metrics
        return out, (m.steps, m.checked, m.sparse_steps, m.trips, m.fallbacks, m.raises), m.agreement_mean
    assert gen_module.graph_step_applies(model, 1, None, Guard.from_predictors(model, preds))
    got, counts, agreement = run()
    with monkeypatch.context() as m:
        eager(m)
        want, want_counts, want_agreement = run()
    assert got == want and counts == want_counts and agreement == pytest.approx(want_agreement)
    assert counts[0] == 39 and counts[1] >= 1 and counts[3] >= 1  # steps, checks, trips
