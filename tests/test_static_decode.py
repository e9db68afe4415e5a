"""The static-shape decode step (device positions, what engine.py captures in a CUDA graph),
on the CPU: it computes what the eager step computes, and the lazy K/V fill keeps the cache
right for every head attention reads."""
import pytest
import torch

from dejavu.predictor import PredictorSelector
from dejavu.sparse import Gathered
from test_model import random_pair
from test_sparse import quick_predictors, tokens


def decode(model, prompt, n, sparsity=None, static=False, lazy_window=0):
    """Greedy decode; returns every step's logits."""
    cache = model.new_cache(1, prompt.shape[1] + n, lazy_window=lazy_window)
    out = []
    with torch.no_grad():
        nxt = model(prompt, cache, 0)[:, -1].argmax(-1)
        for i in range(n):
            pos = prompt.shape[1] + i
            logits = model(nxt[:, None], cache, torch.tensor(pos) if static else pos, sparsity=sparsity)[:, -1]
            out.append(logits)
            nxt = logits.argmax(-1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu"])
def test_device_position_step_equals_eager_step(name):
    model, _ = random_pair(name)
    prompt = tokens(n=7, b=1, seed=2)
    torch.testing.assert_close(decode(model, prompt, 30, static=True), decode(model, prompt, 30), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("window", [2, 3, 8])
def test_lazy_kv_fill_equals_computing_every_head(window, tmp_path):
    """OPT (multi-head): K/V computed only for the selected heads plus a few in turn give the
    same logits as K/V for every head, over more steps than the window (so heads go stale and
    are refilled), at a head density where most heads are skipped each step."""
    model, _ = random_pair("opt-relu")
    preds = quick_predictors(model, tmp_path)
    make = lambda: Gathered(model, PredictorSelector(preds), PredictorSelector(preds), 0.5, 0.25)  # 1 head of 4
    prompt = tokens(n=5, b=1, seed=4)
    full = decode(model, prompt, 40, make(), static=True)
    lazy = decode(model, prompt, 40, make(), static=True, lazy_window=window)
    torch.testing.assert_close(lazy, full, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(full, decode(model, prompt, 40, static=True), atol=1e-3)  # heads really skipped


def test_lazy_kv_fill_is_refused_where_it_cannot_be_right():
    model, _ = random_pair("llama-gqa")
    with pytest.raises(ValueError, match="multi-head model without RoPE"):
        model.new_cache(1, 16, lazy_window=8)
