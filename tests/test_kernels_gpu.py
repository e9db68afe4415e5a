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
    from dejavu.predictor import PredictorSelector
    from dejavu.sparse import Gathered, Masked
    from test_model import random_pair
    from test_sparse import decode_side_by_side, quick_predictors
    model, _ = random_pair(name)
    preds = quick_predictors(model, tmp_path)
    model = model.cuda()
    for p in preds.mlp + preds.heads:
        p.cuda()
    gathered = Gathered(model, PredictorSelector(preds), PredictorSelector(preds), 0.4, 0.5)
    masked = Masked(model, PredictorSelector(preds), PredictorSelector(preds), 0.4, 0.5, union=True)
    decode_side_by_side(model, gathered, masked, torch.randint(0, 101, (2, 9), device="cuda"), 30, atol=1e-4)
