"""Triton gather kernels against fp32 torch references, and the engine's gathered path on CUDA."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def poison():
    """Fill the caching allocator's free memory with NaN, so an unwritten output shows."""
    junk = torch.full((1 << 26,), float("nan"), device="cuda")
    del junk


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("n,d,m", [(1000, 576, 37), (4133, 1000, 1500), (300, 4096, 300)])
@pytest.mark.parametrize("batch", [1, 3, 17, 32])
def test_gather_matvec_and_axpy(dtype, n, d, m, batch):
    from dejavu.kernels import triton_gather as tg
    g = torch.Generator(device="cuda").manual_seed(n + m + batch)
    w_in = torch.randn(n, 2, d, device="cuda", generator=g).to(dtype)       # strided rows, as w_in[:, part]
    w = torch.randn(n, d, device="cuda", generator=g).to(dtype)
    x = torch.randn(batch, d, device="cuda", generator=g).to(dtype)
    a = torch.randn(batch, m, device="cuda", generator=g).to(dtype)
    idx = torch.randperm(n, device="cuda", generator=g)[:m]
    for part in (0, 1):
        poison()
        got = tg.gather_matvec(x, w_in[:, part], idx)
        assert torch.isfinite(got).all()
        assert rel(got, x.float() @ w_in[idx, part].float().T) < TOL[dtype]
    poison()
    got = tg.gather_axpy(a, w, idx)
    assert torch.isfinite(got).all()
    assert rel(got, a.float() @ w[idx].float()) < TOL[dtype]


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu"])
def test_gathered_equals_masked_on_cuda(name, tmp_path):
    from dejavu.collect import record
    from dejavu.predictor import PredictorSelector, TrainSettings, train
    from dejavu.sparse import Gathered, Masked
    from test_model import random_pair
    model, _ = random_pair(name)
    record(model, torch.randint(0, 101, (1024,)), tmp_path, window=128, shard_tokens=256, progress=False)
    preds = train(model, tmp_path, TrainSettings(epochs=1), progress=False)
    model = model.cuda()
    for p in preds.mlp + preds.heads:
        p.cuda()
    gathered = Gathered(model, PredictorSelector(preds), PredictorSelector(preds), 0.4, 0.5)
    masked = Masked(model, PredictorSelector(preds), PredictorSelector(preds), 0.4, 0.5, union=True)
    prompt = torch.randint(0, 101, (2, 9), device="cuda")
    caches = [model.new_cache(2, 30), model.new_cache(2, 30)]
    with torch.no_grad():
        nxt = model(prompt, caches[0], 0)[:, -1].argmax(-1)
        model(prompt, caches[1], 0)
        for pos in range(9, 30):
            lg = model(nxt[:, None], caches[0], pos, sparsity=gathered)
            lm = model(nxt[:, None], caches[1], pos, sparsity=masked)
            assert torch.allclose(lg, lm, atol=1e-4, rtol=1e-4), pos
            nxt = lg[:, -1].argmax(-1)
