"""The fused CPU sparse-MLP kernel against its torch reference."""
import pytest
import torch

from conftest import rel_err
from dejavu import kernels
from dejavu.kernels import cpu
from test_model import random_pair

pytestmark = pytest.mark.skipif(not cpu.available(), reason="no C++ toolchain for the CPU kernel")


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "gemma-geglu", "llama-biases"])
@pytest.mark.parametrize("batch", [1, 3])
def test_fused_sparse_mlp_matches_reference(name, batch):
    model, _ = random_pair(name)
    mlp = model.layers[1].mlp
    g = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 1, model.cfg.d_model, generator=g)
    for k in (1, 17, model.cfg.d_ff):
        idx = torch.randperm(model.cfg.d_ff, generator=g)[:k]
        with torch.inference_mode():
            got = kernels.sparse_mlp(mlp, x, idx)
            want = kernels.sparse_mlp_reference(mlp, x, idx)
        assert rel_err(got, want) < 1e-5, k


def test_fused_full_set_equals_dense_mlp(smollm2):
    loaded, _ = smollm2
    mlp = loaded.model.layers[3].mlp
    x = torch.randn(1, 1, 576)
    with torch.inference_mode():
        got = kernels.sparse_mlp(mlp, x, torch.arange(1536))
        want = mlp(x)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("batch", [1, 4])
def test_gather_matvec_and_axpy_match_torch_on_strided_rows(batch):
    g = torch.Generator().manual_seed(batch)
    w_in = torch.randn(300, 2, 70, generator=g)          # gate/up interleaved: strided rows
    x = torch.randn(batch, 1, 70, generator=g)
    idx = torch.randperm(300, generator=g)[:37]
    with torch.inference_mode():
        for part in (0, 1):
            got = cpu.gather_matvec(x, w_in[:, part], idx)
            assert rel_err(got, x @ w_in[idx, part].T) < 1e-5
        a = torch.randn(batch, 1, 37, generator=g)
        w = torch.randn(300, 70, generator=g)
        assert rel_err(cpu.gather_axpy(a, w, idx), a @ w[idx]) < 1e-5


@pytest.mark.parametrize("name", ["llama-gqa", "gemma-geglu", "llama-biases"])
def test_fused_gate_first_mlp_keeping_every_neuron_is_the_mlp(name):
    """The one-call gate-first kernel with every neuron a candidate and kept: the dense MLP, gate and
    up biases (mlp_bias) included."""
    model, _ = random_pair(name)
    mlp = model.layers[1].mlp
    x = torch.randn(1, 1, model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    n = model.cfg.d_ff
    with torch.inference_mode():
        out, kept = cpu.gate_first_mlp(mlp, x, mlp.w_out_t.norm(dim=1), n, n)
        want = mlp(x) - (mlp.b_out if mlp.b_out is not None else 0)
    assert sorted(kept.tolist()) == list(range(n))
    assert rel_err(out.view_as(want), want) < 1e-5
