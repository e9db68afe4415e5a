"""sampling.py: the host sampler and the graph-capturable one draw from one distribution."""
import pytest
import torch
from scipy.stats import chisquare

from dejavu.sampling import probabilities, sample, sample_rows

V = 12


def counts_pvalue(tokens: torch.Tensor, p: torch.Tensor) -> float:
    observed = torch.bincount(tokens, minlength=V).double()
    if observed[p == 0].sum() > 0:  # a draw outside the support (top-p): another distribution
        return 0.0
    keep = p > 0
    expected = p[keep].double() / p[keep].double().sum() * len(tokens)
    return float(chisquare(observed[keep].numpy(), expected.numpy()).pvalue)


def draw_rows(logits, n, temperature, top_p, seed0=0, pos=0):
    t = lambda v, dt=torch.float32: torch.full((n,), v, dtype=dt)
    return sample_rows(logits.expand(n, -1), t(temperature), t(top_p), torch.arange(seed0, seed0 + n),
                       t(pos, torch.long))


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9), (1.5, 0.5)])
def test_graph_sampler_draws_the_host_distribution(temperature, top_p):
    """20,000 draws (one per seed) fit probabilities(); the host sampler's draws fit the same
    distribution; draws at another temperature (the negative control) do not."""
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(1)) * 2
    p = probabilities(logits, temperature, top_p)[0]
    n = 20000
    assert counts_pvalue(draw_rows(logits, n, temperature, top_p), p) > 1e-3
    host = sample(logits.expand(n, -1), temperature, top_p, torch.Generator().manual_seed(0))
    assert counts_pvalue(host, p) > 1e-3
    assert counts_pvalue(draw_rows(logits, n, temperature * 1.6, min(1.0, top_p + 0.3)), p) < 1e-6


def test_graph_sampler_is_reproducible_and_rows_are_independent():
    logits = torch.randn(8, V, generator=torch.Generator().manual_seed(2))
    t, p = torch.full((8,), 0.9), torch.full((8,), 0.95)
    seed, pos = torch.arange(100, 108), torch.arange(8) * 3
    a = sample_rows(logits, t, p, seed, pos)
    assert torch.equal(a, sample_rows(logits, t, p, seed, pos))         # same request, same draw
    assert torch.equal(a[2:3], sample_rows(logits[2:3], t[2:3], p[2:3], seed[2:3], pos[2:3]))  # alone = in a batch
    later = torch.stack([sample_rows(logits, t, p, seed, pos + k) for k in range(1, 40)])
    assert (later != a).any(dim=0).all()                               # the next position draws afresh


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.0, 1.0, 0.0, 1.0])
    out = sample_rows(logits, t, torch.ones(4), torch.arange(4), torch.zeros(4, dtype=torch.long))
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
