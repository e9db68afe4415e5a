"""The static-shape decode step (device positions, what engine.py captures in a CUDA graph),
on the CPU: it computes what the eager step computes, and the lazy K/V fill keeps the cache
right for every head attention reads."""
import pytest
import torch

from dejavu.selectors import PredictorSelector
from dejavu.sparse import Gathered
from test_model import random_pair
from test_sparse import quick_predictors, tokens


def decode(model, prompt, n, sparsity=None, static=False, lazy_window=0):
    """Greedy decode; returns every step's logits."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n, lazy_window=lazy_window)
    out = []
    with torch.no_grad():
        nxt = model(prompt, cache, 0)[:, -1].argmax(-1)
        for i in range(n):
            pos = prompt.shape[1] + i
            logits = model(nxt[:, None], cache, torch.tensor(pos) if static else pos, sparsity=sparsity)[:, -1]
            out.append(logits)
            nxt = logits.argmax(-1)
    return torch.stack(out, 1)


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "llama-biases", "mistral-window", "qwen2-window-layers",
                                  "gemma3-local-global", "gemma2-softcap"])
def test_device_position_step_equals_eager_step(name):
    model, _ = random_pair(name)
    prompt = tokens(n=7, b=1, seed=2)
    torch.testing.assert_close(decode(model, prompt, 30, static=True), decode(model, prompt, 30), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "mistral-window", "gemma3-local-global", "gemma2-softcap"])
def test_rows_on_their_own_timelines_equal_each_prompt_alone(name, tmp_path):
    """Serving's layout: each request prefilled into its own row of one cache, at slot 0, then
    steps with a slot per row (a [B] device tensor) while the rows sit at different positions:
    every row's logits equal its prompt decoded alone. Also through the gathered head path (every
    head selected, so the answer is the same), which writes each row's K/V at its own slot."""
    model, _ = random_pair(name)
    prompts = [tokens(n=n, b=1, seed=s) for n, s in ((5, 3), (11, 4), (8, 5))]
    alone = [decode(model, p, 12) for p in prompts]
    every_head = Gathered(model, None, PredictorSelector(quick_predictors(model, tmp_path)), None, 1.0)
    for sparsity in (None, every_head):
        cache = model.new_cache(3, 40)
        with torch.no_grad():
            nxt = torch.cat([model(p, cache.rows(slice(r, r + 1)), 0)[:, -1].argmax(-1) for r, p in enumerate(prompts)])
            pos = torch.tensor([p.shape[1] for p in prompts])
            for i in range(12):
                logits = model(nxt[:, None], cache, pos, sparsity)[:, -1]
                for r in range(3):
                    torch.testing.assert_close(logits[r], alone[r][0, i], rtol=1e-4, atol=1e-5)
                nxt, pos = logits.argmax(-1), pos + 1


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


def test_fixed_size_union_for_batches(tmp_path):
    """Batch > 1 with static shapes (union_cap): at a cap of every unit it is dense; for a batch
    of identical rows (union = each row's top-k) with the cap at k it is the eager union."""
    model, _ = random_pair("opt-relu")
    preds = quick_predictors(model, tmp_path)
    make = lambda cap=None: Gathered(model, PredictorSelector(preds), PredictorSelector(preds), 0.3, 0.5,
                                     union_cap=cap)
    prompt = tokens(n=6, b=2, seed=5)
    torch.testing.assert_close(decode(model, prompt, 12, make((1.0, 1.0)), static=True),
                               decode(model, prompt, 12), rtol=1e-4, atol=1e-5)
    same = tokens(n=6, b=1, seed=6).expand(2, 6)
    capped = decode(model, same, 12, make((0.3, 0.5)), static=True)
    torch.testing.assert_close(capped, decode(model, same, 12, make()), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(capped, decode(model, same, 12), atol=1e-3)  # units really skipped


def test_fixed_size_union_keeps_the_union_first():
    """Row 0 scores units 0-9 far above everything (its top-4: 0-3), row 1 prefers 20-23 mildly:
    the union {0-3, 20-23} must come before row 0's runners-up 4-9, whose scores are higher."""
    model, _ = random_pair("opt-relu")  # 96 neurons
    scores = torch.zeros(2, 1, 96)
    scores[0, 0, :10] = torch.arange(100.0, 90.0, -1)
    scores[1, 0, 20:24] = 1.0
    union = {0, 1, 2, 3, 20, 21, 22, 23}
    exact = Gathered(model, union_cap=(8 / 96, 1.0))._index("mlp", scores, 4)
    assert set(exact.tolist()) == union
    wide = Gathered(model, union_cap=(0.25, 1.0))._index("mlp", scores, 4)   # 24 units: the union and the best rest
    assert len(wide) == 24 and union | set(range(4, 10)) <= set(wide.tolist())
    narrow = Gathered(model, union_cap=(5 / 96, 1.0))._index("mlp", scores, 4)  # fewer than the union
    assert len(narrow) == 5 and set(narrow.tolist()) <= union
