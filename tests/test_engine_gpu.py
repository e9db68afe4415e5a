"""The CUDA-graph decode engine (engine.py) against the eager engine, on the device."""
import pytest
import torch

pytestmark = pytest.mark.gpu


def eager_greedy(model, prompt, n, sparsity=None):
    """The eager engine (int positions, cache sliced to the tokens so far), greedy."""
    cache = model.new_cache(prompt.shape[0], prompt.shape[1] + n + 4)
    out = []
    with torch.no_grad():
        nxt = model(prompt, cache, 0)[:, -1].argmax(-1)
        for i in range(n):
            out.append(nxt)
            logits = model(nxt[:, None], cache, prompt.shape[1] + i, sparsity=sparsity)[:, -1]
            nxt = logits.argmax(-1)
    return torch.stack(out, 1), logits


def graph_greedy(model, prompt, n, sparsity=None):
    from dejavu.engine import GraphDecoder
    dec = GraphDecoder(model, prompt.shape[0], prompt.shape[1] + n + 4, sparsity)
    dec.prefill(prompt)
    return dec.decode(n)[0], dec.logits


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "llama-biases", "qwen3-qk-norm", "phi3-fused",
                                  "mistral-window", "gemma3-local-global", "gemma2-softcap"])
@pytest.mark.parametrize("sparse", [False, True])
def test_graph_step_gives_the_eager_tokens(name, sparse, tmp_path):
    """Same weights, same selections: the whole-step graph (device positions, whole-cache
    attention, predictors on a side stream) gives the eager engine's tokens."""
    from dejavu.selectors import PredictorSelector
    from dejavu.sparse import Gathered
    from test_model import random_pair
    from test_sparse import quick_predictors
    model, _ = random_pair(name)
    preds = quick_predictors(model, tmp_path)
    model = model.cuda()
    for p in preds.mlp + preds.heads:
        p.cuda()

    def make(side):
        if not sparse:
            return None
        return Gathered(model, PredictorSelector(preds), PredictorSelector(preds), 0.4, 0.5, side_stream=side)

    prompt = torch.randint(0, 101, (1, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(3))
    graph_sparsity = make(torch.cuda.Stream())
    got, got_logits = graph_greedy(model, prompt, 40, graph_sparsity)
    want, want_logits = eager_greedy(model, prompt, 40, make(None))
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)
    if sparse:
        assert graph_sparsity.density("mlp") == pytest.approx(round(0.4 * model.cfg.d_ff) / model.cfg.d_ff)
        assert not torch.allclose(got_logits, eager_greedy(model, prompt, 40)[1])  # sparsity really acted


@pytest.mark.parametrize("name", ["llama-biases", "qwen2-qkv-bias", "opt-relu", "qwen3-qk-norm"])
def test_input_side_graph_step_gives_the_eager_masked_tokens(name):
    """Input-side sparsity on an input-major model: the graph step (the Triton projection reading
    only the passing rows) gives the tokens and logits of the eager masked step; the dense graph of
    the input-major model gives the eager dense tokens."""
    from dejavu.selectors import InputSelector
    from dejavu.sparse import InputSparsity, calibrate_thresholds
    from test_model import random_pair
    model, _ = random_pair(name)
    model = model.cuda().to_input_major()
    sel = InputSelector(model, "wina")
    g = torch.Generator("cuda").manual_seed(3)
    thresholds = calibrate_thresholds(model, sel, torch.randint(0, 101, (2, 64), device="cuda", generator=g), 0.5)
    prompt = torch.randint(0, 101, (1, 9), device="cuda", generator=g)
    got, got_logits = graph_greedy(model, prompt, 30, InputSparsity(model, sel, thresholds, gathered=True))
    masked = InputSparsity(model, sel, thresholds)
    want, want_logits = eager_greedy(model, prompt, 30, masked)
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    assert 0.3 < masked.density("down") < 0.7
    dense, dense_logits = eager_greedy(model, prompt, 30)
    assert not torch.allclose(want_logits, dense_logits)  # sparsity really acted
    assert torch.equal(graph_greedy(model, prompt, 30)[0], dense)


def test_graph_step_batch_sparse_with_fixed_union(tmp_path):
    """Batch 3 sparse in the graph (union_cap: a fixed number of units per step) gives the
    eager engine's tokens with the same rule."""
    from dejavu.selectors import PredictorSelector
    from dejavu.sparse import Gathered
    from test_model import random_pair
    from test_sparse import quick_predictors
    model, _ = random_pair("opt-relu")
    preds = quick_predictors(model, tmp_path)
    model = model.cuda()
    for p in preds.mlp + preds.heads:
        p.cuda()
    make = lambda: Gathered(model, PredictorSelector(preds), PredictorSelector(preds), 0.3, 0.5, union_cap=(0.6, 0.75))
    prompt = torch.randint(0, 101, (3, 9), device="cuda", generator=torch.Generator("cuda").manual_seed(4))
    got, got_logits = graph_greedy(model, prompt, 30, make())
    want, want_logits = eager_greedy(model, prompt, 30, make())
    assert torch.equal(got, want)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-4, atol=1e-5)


def test_graph_step_on_smollm2_shape_dense_and_gate_first():
    """SmolLM2's shape in fp32 (synthetic weights: the device has no model package): dense and
    gate-first sparse MLP, graph == eager."""
    from dejavu.load import load
    from dejavu.selectors import GateSelector
    from dejavu.sparse import Gathered
    model = load("smollm2-135m-shape", dtype=torch.float32, device="cuda", max_seq_len=256).model
    prompt = torch.randint(0, 49152, (1, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    assert torch.equal(graph_greedy(model, prompt, 48)[0], eager_greedy(model, prompt, 48)[0])
    make = lambda: Gathered(model, GateSelector(model), None, mlp_density=0.5)
    assert torch.equal(graph_greedy(model, prompt, 48, make())[0], eager_greedy(model, prompt, 48, make())[0])


def test_graph_step_batch_with_left_padding():
    from dejavu.engine import GraphDecoder
    from dejavu.load import load
    model = load("smollm2-135m-shape", dtype=torch.float32, device="cuda", max_seq_len=256).model
    prompt = torch.randint(0, 49152, (3, 12), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    pad = torch.tensor([0, 4, 7], device="cuda")
    dec = GraphDecoder(model, 3, 12 + 30 + 4)
    dec.cache.set_padding(pad)
    dec.prefill(prompt)
    got = dec.decode(30)[0]
    cache = model.new_cache(3, 12 + 30 + 4)
    cache.set_padding(pad)
    with torch.no_grad():
        nxt = model(prompt, cache, 0)[:, -1].argmax(-1)
        want = []
        for i in range(30):
            want.append(nxt)
            nxt = model(nxt[:, None], cache, 12 + i)[:, -1].argmax(-1)
    assert torch.equal(got, torch.stack(want, 1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows,d", [(1, 7168), (3, 576), (17, 1000), (1, 12288)])
@pytest.mark.parametrize("rms", [True, False])
def test_triton_norm_matches_torch(dtype, rows, d, rms):
    from dejavu.kernels.triton_norm import norm, norm_reference
    g = torch.Generator("cuda").manual_seed(rows * d)
    x = (torch.randn(rows, d, device="cuda", generator=g) * 3 + 0.5).to(dtype)
    w = (1 + 0.1 * torch.randn(d, device="cuda", generator=g)).to(dtype)
    b = None if rms else (0.1 * torch.randn(d, device="cuda", generator=g)).to(dtype)
    got = norm(x, w, b, 1e-5, rms)
    want = norm_reference(x.double(), w.double(), None if b is None else b.double(), 1e-5, rms)
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}[dtype]


def test_triton_norm_without_weight():
    """weight None (the predictors' input norm) is a weight of ones, bitwise."""
    from dejavu.kernels.triton_norm import norm
    x = torch.randn(2, 7168, device="cuda").to(torch.bfloat16)
    assert torch.equal(norm(x, None, None, 1e-6, True), norm(x, torch.ones_like(x[0]), None, 1e-6, True))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rms", [True, False])
def test_triton_norm_adds_the_residual(dtype, rms):
    """norm(x, residual=r) returns x + r exactly as torch rounds it, and the norm of that sum."""
    from dejavu.kernels.triton_norm import norm
    g = torch.Generator("cuda").manual_seed(7)
    x, r = (torch.randn(3, 1000, device="cuda", generator=g).to(dtype) for _ in range(2))
    w = (1 + 0.1 * torch.randn(1000, device="cuda", generator=g)).to(dtype)
    b = None if rms else (0.1 * torch.randn(1000, device="cuda", generator=g)).to(dtype)
    total, out = norm(x, w, b, 1e-5, rms, residual=r)
    assert torch.equal(total, x + r)
    assert torch.equal(out, norm(x + r, w, b, 1e-5, rms))
