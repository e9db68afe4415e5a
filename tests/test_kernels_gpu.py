"""Triton kernels against fp32 torch references, as torch custom ops under torch.compile and
CUDA graphs, and the engine's gathered path on CUDA.

On a GPU: `pytest -q tests/test_kernels_gpu.py`. Without one, the file is skipped; to check the
kernels with Triton's CPU interpreter instead: `DEJAVU_TEST_DEVICE=cpu TRITON_INTERPRET=1 pytest
-q tests/test_kernels_gpu.py` (Triton 3.6's interpreter needs numpy < 2.4, and its tl.dot is
wrong for bf16 inputs, so bf16 gathers are only checked on the GPU)."""
import itertools
import os

import pytest
import torch

DEV = os.environ.get("DEJAVU_TEST_DEVICE", "cuda")
CUDA = DEV == "cuda"
pytestmark = pytest.mark.gpu if CUDA else []
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a non-CUDA device needs TRITON_INTERPRET=1", allow_module_level=True)
tg = pytest.importorskip("dejavu.kernels.triton_gather")
from dejavu.kernels import reference as ref  # noqa: E402
from dejavu.kernels import triton_attention as ta  # noqa: E402

TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
DTYPES = [pytest.param(t, id=str(t).removeprefix("torch.")) for t in (torch.bfloat16, torch.float16, torch.float32)]


def poison():
    """Fill the caching allocator's free memory with NaN, so an unwritten output shows. (On the
    CPU there is no such pool: check() compares every element instead.)"""
    if CUDA:
        junk = torch.full((1 << 26,), float("nan"), device=DEV)
        del junk


def check(got, ref, dtype):
    """Relative error, on the whole output (norm) and on every element (max error over max |ref|)."""
    assert got.shape == ref.shape and got.dtype == dtype
    assert torch.isfinite(got).all()
    err = got.double() - ref.double()
    assert (err.norm() / ref.double().norm()).item() < TOL[dtype]
    assert (err.abs().max() / ref.double().abs().max()).item() < TOL[dtype]


def randn(*shape, g, dtype=torch.float32):
    return torch.randn(*shape, device=DEV, generator=g).to(dtype)


def gen():
    return torch.Generator(device=DEV).manual_seed(int.from_bytes(os.urandom(4), "little"))  # fresh every run


def dot_ok(dtype):
    if dtype == torch.bfloat16 and not CUDA:
        pytest.skip("Triton's interpreter computes tl.dot wrong on bf16 inputs")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,m", [(1000, 576, 37), (4133, 1000, 1500), (300, 4096, 300)])
@pytest.mark.parametrize("batch", [1, 3, 17, 32])
def test_gather_matvec_and_axpy(dtype, n, d, m, batch):
    dot_ok(dtype)
    g = gen()
    w_in = randn(n, 2, d, g=g, dtype=dtype)  # strided rows, as w_in[:, part]
    w = randn(n, d, g=g, dtype=dtype)
    x, a = randn(batch, d, g=g, dtype=dtype), randn(batch, m, g=g, dtype=dtype)
    idx = torch.randperm(n, device=DEV, generator=g)[:m]
    for part in (0, 1):
        poison()
        check(tg.gather_matvec(x, w_in[:, part], idx), ref.gather_matvec_reference(x, w_in[:, part], idx), dtype)
    poison()
    check(tg.gather_axpy(a, w, idx), ref.gather_axpy_reference(a, w, idx), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,N", [(576, 1000), (4096, 300), (14336, 4133)])
@pytest.mark.parametrize("rule", ["teal", "wina", "none pass", "all pass"])
def test_input_gather(dtype, K, N, rule):
    """One token's input-side projection reads only the rows of the channels that pass (packed per
    split by a kernel first, or skipped by masked loads), for every split layout."""
    dot_ok(dtype)
    g = gen()
    w_t, x, bias = randn(K, N, g=g, dtype=dtype), randn(K, g=g, dtype=dtype), randn(N, g=g, dtype=dtype)
    if rule == "teal":
        x[K // 3] = float("nan")  # fails the rule (a NaN passes no threshold): it must count for nothing
    scale = torch.rand(K, device=DEV, generator=g) + 0.5 if rule == "wina" else None
    threshold = torch.tensor({"none pass": 1e9, "all pass": -1.0}.get(rule, 0.8), device=DEV)
    keep = (x.float().abs() * (scale if scale is not None else 1)) > threshold
    want = torch.where(keep, x.double(), 0.0) @ w_t.double()
    for (b, pps), pack in itertools.product(((None, 4), (bias, 1), (bias, 16)), ("kernel", "mask")):
        poison()
        got = tg.input_gather(x, w_t, scale, threshold, b, programs_per_sm=pps, pack=pack)
        ref_out = (want + (0 if b is None else b.double())).to(dtype).double()
        if not keep.any():  # nothing passes: the bias alone, or zeros
            assert torch.equal(got.double(), ref_out)
        else:
            check(got, ref_out, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu_tanh", True), ("relu", False)])
@pytest.mark.parametrize("batch", [1, 3])
def test_mlp_act_and_input_gather_from_the_up_side(dtype, act, gated, batch):
    """The MLP's activations from its interleaved up side in one kernel; input_gather computing them
    inside its compaction (the down projection of one token) reads only the passing neurons' rows."""
    dot_ok(dtype)
    g = gen()
    K, N = 1500, 700
    h = randn(batch, K * (2 if gated else 1), g=g, dtype=dtype)
    hh = h.double().unflatten(-1, (K, -1))
    a = ref.ACTIVATIONS[act](hh[..., 0]) * (hh[..., 1] if gated else 1)
    poison()
    check(tg.mlp_act(h, act, gated), a.to(dtype).double(), dtype)
    w_t, scale = randn(K, N, g=g, dtype=dtype), torch.rand(K, device=DEV, generator=g) + 0.5
    threshold = torch.tensor(0.3, device=DEV)
    a0 = a[0].to(dtype).float()  # the kernel scores the activations as stored (rounded to the dtype)
    keep = (a0.abs() * scale) > threshold
    assert 0.1 < keep.double().mean() < 0.9
    for pack in ("kernel", "mask"):
        poison()
        check(tg.input_gather(h[0], w_t, scale, threshold, None, act, gated, pack=pack),
              (a0.double() * keep) @ w_t.double(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("device_slot", [True, False])
@pytest.mark.parametrize("B,H,KV,hd", [(1, 32, 8, 128), (3, 4, 2, 64), (2, 12, 12, 80)])
def test_rope_cache(dtype, rope, device_slot, B, H, KV, hd):
    """RoPE on Q and K and the K/V cache write in one kernel = the torch reference (the CPU's path)."""
    g = gen()
    qkv = randn(B, (H + 2 * KV) * hd, g=g, dtype=dtype)
    angles = randn(B, 1, 1, hd // 2, g=g).repeat(1, 1, 1, 2) * 3
    cos_sin = (angles.cos().to(dtype), angles.sin().to(dtype)) if rope else None
    S, slot = 40, 17
    kv = randn(2, B, KV, S, hd, g=g, dtype=dtype)
    want_kv = kv.clone()
    pos = torch.tensor([slot], device=DEV) if device_slot else slot
    f32 = (lambda t: t.float()) if dtype != torch.float32 else (lambda t: t)
    want_q = ref.rope_cache_reference(f32(qkv), None if not rope else tuple(map(f32, cos_sin)), pos, want_kv, H)
    q = ta.rope_cache(qkv, cos_sin, pos, kv, H)
    check(q, want_q.to(dtype).double(), dtype)
    check(kv[:, :, :, slot], want_kv[:, :, :, slot].double(), dtype)
    others = torch.arange(S, device=DEV) != slot
    assert torch.equal(kv[:, :, :, others], want_kv[:, :, :, others])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rope", [True, False])
@pytest.mark.parametrize("B,H,KV,hd,S", [(1, 32, 8, 128, 300), (3, 4, 2, 64, 40), (2, 12, 12, 80, 130)])
def test_rope_cache_inside_decode_attention(dtype, rope, B, H, KV, hd, S):
    """The decode kernel doing RoPE and the cache write itself (the token's K and V taken from its
    projection, not the cache) gives bitwise what rope_cache then decode_attention give, and the
    same cache, for rows at their own slots with padding before them."""
    g = gen()
    qkv = randn(B, (H + 2 * KV) * hd, g=g, dtype=dtype)
    angles = randn(B, 1, 1, hd // 2, g=g).repeat(1, 1, 1, 2) * 3
    cos_sin = (angles.cos().to(dtype), angles.sin().to(dtype)) if rope else None
    kv = randn(2, B, KV, S, hd, g=g, dtype=dtype)
    pos = torch.randint(S // 2, S, (B,), device=DEV, generator=g)
    key_valid = torch.rand(B, S, device=DEV, generator=g) > 0.3
    heads = torch.arange(H, device=DEV)
    want_kv, got_kv = kv.clone(), kv.clone()
    q = ta.rope_cache(qkv, cos_sin, pos, want_kv, H)
    want = ta.decode_attention(q.view(B, H, hd), want_kv[0], want_kv[1], heads, H, pos + 1, key_valid, hd ** -0.5)
    poison()
    got = ta.rope_cache_attention(qkv, cos_sin, pos, got_kv, heads, pos + 1, key_valid, hd ** -0.5)
    assert torch.equal(got, want) and torch.equal(got_kv, want_kv)


@pytest.mark.parametrize("programs_per_sm", [1, 4, 16])
def test_gather_axpy_last_split_sums_deterministically(programs_per_sm):
    """Many splits, many calls back to back with no sync between: the column block's last split
    adds the partials in a fixed order, so every output is bitwise the same and right."""
    dtype = torch.float16
    g = gen()
    a, w = randn(2, 3000, g=g, dtype=dtype), randn(5000, 1000, g=g, dtype=dtype)
    bias = randn(1000, g=g, dtype=dtype)
    idx = torch.randperm(5000, device=DEV, generator=g)[:3000]
    outs = [tg.gather_axpy(a, w, idx, bias, programs_per_sm=programs_per_sm) for _ in range(20)]
    check(outs[0], ref.gather_axpy_reference(a, w, idx, bias), dtype)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


@pytest.mark.skipif(not CUDA, reason="streams need a GPU")
def test_gather_axpy_on_overlapping_streams():
    """Calls in flight at once on four streams (as graphs, streams or threads on one device) each
    pick their own last split: every output right. (With one completion counter per device, calls
    count each other's splits: a column block is summed before all its partials are in, or never.)
    The streams wait for one event, then each runs calls long enough (one program per SM, each
    reading ~0.5 MB) that the four are resident on the GPU together."""
    dtype = torch.float16
    g = gen()
    w = randn(40000, 1024, g=g, dtype=dtype)
    jobs = [(randn(2, 30000, g=g, dtype=dtype), torch.randperm(40000, device=DEV, generator=g)[:30000])
            for _ in range(8)]
    tg.gather_axpy(jobs[0][0], w, jobs[0][1], programs_per_sm=1)  # compile now: the launches below must queue up
    streams = [torch.cuda.Stream() for _ in range(4)]
    go, gate = torch.cuda.Event(), torch.cuda.Stream()
    gate.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(gate):  # ~20 ms on the GPU, while the calls queue up behind `go`
        torch.cuda._sleep(40_000_000)
        go.record()
    outs = []
    for s in streams:
        s.wait_event(go)
    for rep in range(4):
        for i, (a, idx) in enumerate(jobs):
            with torch.cuda.stream(streams[(i + rep) % len(streams)]):
                outs.append(tg.gather_axpy(a, w, idx, programs_per_sm=1))
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        a, idx = jobs[i % len(jobs)]
        check(out, ref.gather_axpy_reference(a, w, idx), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,ties", [(28672, 2867, False), (36864, 3686, False), (49152, 1, False), (56, 24, False),
                                      (1000, 1000, False), (300, 7, True), (5000, 2500, True), (3000, 1500, True)])
def test_topk_indices(dtype, n, k, ties):
    """The radix-select kernels keep exactly the k largest scores (ties at the threshold: the
    lowest indices), each index once, in ascending order; negative, zero and tied scores included."""
    from dejavu.kernels.triton_topk import topk_indices
    g = gen()
    s = randn(n, g=g) * 3
    s = (s.round() + 0.0 if ties else s).to(dtype)  # + 0.0: no -0.0, which ranks below +0.0 here
    idx = topk_indices(s, k)
    assert idx.shape == (k,) and idx.dtype == torch.int64
    assert (idx.diff() > 0).all(), "indices not ascending or repeated"
    assert torch.equal(s[idx].float().sort(descending=True).values, s.float().topk(k).values)
    t = s[idx].min()  # at the threshold value, the lowest indices are the ones taken
    assert torch.equal(idx[s[idx] == t], (s == t).nonzero().squeeze(-1)[:int((s[idx] == t).sum())])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [128256, 4096, 50, 9000])
def test_argmax_finite(dtype, n):
    """The greedy pick and the finite check of a decode step: torch.argmax's answer (the first
    largest; a NaN counts as the largest, the first NaN wins) and isfinite(...).all(), per row."""
    from dejavu.kernels.triton_topk import argmax_finite
    g = gen()
    x = (randn(6, n, g=g) * 3).round().to(dtype)  # rounded: ties, the first must win
    x[1, n // 2] = float("inf")
    x[2, n - 1] = float("-inf")
    x[3, [n // 3, n - 2]] = float("nan")
    x[4, 0] = float("nan")
    x[4, n - 1] = float("inf")
    token, finite = argmax_finite(x)
    assert token.dtype == torch.int64 and finite.dtype == torch.bool
    assert token.tolist() == x.float().argmax(-1).tolist()
    assert finite.tolist() == torch.isfinite(x).all(-1).tolist() == [True, False, False, False, False, True]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act,n_in,bias", [("silu", 2, False), ("gelu_tanh", 2, False), ("relu", 1, True),
                                           ("silu", 2, True), ("relu", 1, False)])
@pytest.mark.parametrize("n,d,m", [(1000, 576, 37), (4133, 1000, 1500), (300, 4096, 300)])
@pytest.mark.parametrize("batch", [1, 3, 17, 32])
def test_gather_act(dtype, act, n_in, bias, n, d, m, batch):
    dot_ok(dtype)
    g = gen()
    w_in = randn(n, n_in, d, g=g, dtype=dtype)
    b_in = randn(n, n_in, g=g, dtype=dtype) if bias else None
    x = randn(batch, 1, d, g=g, dtype=dtype)  # [B, T=1, d] as the model passes it
    idx = torch.randperm(n, device=DEV, generator=g)[:m]
    poison()
    check(tg.gather_act(x, w_in, b_in, idx, act), ref.gather_act_reference(x, w_in, b_in, idx, act), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,hd,d,m", [(12, 64, 576, 5), (56, 128, 1000, 24), (40, 80, 300, 40), (9, 64, 4096, 1)])
@pytest.mark.parametrize("batch", [1, 3, 32])
@pytest.mark.parametrize("bias", [False, True])
def test_head_gathers(dtype, H, hd, d, m, batch, bias):
    """Head units: idx are head indices, each owning head_dim rows (expanded inside the kernels),
    with the bias fused (wq's rows; wo's output bias)."""
    dot_ok(dtype)
    g = gen()
    wq, wo_t = randn(H * hd, d, g=g, dtype=dtype), randn(H * hd, d, g=g, dtype=dtype)
    bq, bo = (randn(H * hd, g=g, dtype=dtype), randn(d, g=g, dtype=dtype)) if bias else (None, None)
    x, y = randn(batch, d, g=g, dtype=dtype), randn(batch, m * hd, g=g, dtype=dtype)
    heads = torch.randperm(H, device=DEV, generator=g)[:m]
    poison()
    check(tg.gather_matvec(x, wq, heads, bq, unit=hd), ref.gather_matvec_reference(x, wq, heads, bq, unit=hd), dtype)
    poison()
    check(tg.gather_axpy(y, wo_t, heads, bo, unit=hd), ref.gather_axpy_reference(y, wo_t, heads, bo, unit=hd), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,hd,d,m,r,W,S", [(56, 128, 1000, 24, 2, 32, 300), (12, 64, 576, 5, 1, 8, 40),
                                           (9, 64, 300, 1, 3, 17, 17)])
@pytest.mark.parametrize("bias", [False, True])
def test_qkv_lazily(dtype, H, hd, d, m, r, W, S, bias):
    """The lazy fill's one pass: Q of the last window slot returned, K/V rows of every window slot
    written into the cache (the window repeats slot 0 early on), every other slot untouched."""
    dot_ok(dtype)
    g = gen()
    wqkv = randn(3 * H * hd, d, g=g, dtype=dtype)
    bqkv = randn(3 * H * hd, g=g, dtype=dtype) if bias else None
    x = randn(S, d, g=g, dtype=dtype)
    heads = torch.randperm(H, device=DEV, generator=g)[:m + r]
    idx, turn = heads[:m], heads[m:]
    pos = torch.randint(0, S, (), device=DEV, generator=g)
    window = (pos - W + 1 + torch.arange(W, device=DEV)).clamp(min=0)
    kv = torch.full((2, H, S, hd), float("nan"), device=DEV, dtype=dtype)
    want_kv = kv.clone()
    want_q = ref.gather_qkv_lazily_reference(x, wqkv, bqkv, idx, turn, H, window, want_kv)
    poison()
    check(tg.gather_qkv_lazily(x, wqkv, bqkv, idx, turn, H, window, kv), want_q, dtype)
    written = ~torch.isnan(want_kv)
    assert torch.equal(written, ~torch.isnan(kv)), "the kernel wrote other slots than the window's K/V heads"
    check(kv[written], want_kv[written].float(), dtype)


def attention_inputs(batch, H, Hkv, hd, S, length, m, dtype, g):
    q = randn(batch, m, hd, g=g, dtype=dtype)
    k, v = randn(batch, Hkv, S, hd, g=g, dtype=dtype), randn(batch, Hkv, S, hd, g=g, dtype=dtype)
    head_idx = torch.randperm(H, device=DEV, generator=g)[:m] if m < H else torch.arange(H, device=DEV)
    pad = torch.randint(0, length, (batch,), device=DEV, generator=g)  # left padding, per row
    pad[0] = 0
    key_valid = torch.arange(S, device=DEV)[None, :] >= pad[:, None]
    return q, k, v, head_idx, torch.tensor(length, device=DEV), key_valid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("H,Hkv,hd,S,length", [(9, 3, 64, 300, 257), (32, 8, 128, 1000, 999), (12, 12, 64, 130, 1),
                                               (12, 12, 80, 513, 200), (32, 8, 128, 4096, 3001)])
@pytest.mark.parametrize("batch", [1, 3, 17, 32])
@pytest.mark.parametrize("heads", ["some", "all"])
@pytest.mark.parametrize("n_splits", [0, 1, 7])
def test_decode_attention(dtype, H, Hkv, hd, S, length, batch, heads, n_splits):
    m = H if heads == "all" else max(1, H // 3)
    if not CUDA and batch * m * length > 30_000:
        pytest.skip("too slow for the CPU interpreter")
    g = gen()
    q, k, v, head_idx, L, key_valid = attention_inputs(batch, H, Hkv, hd, S, length, m, dtype, g)
    poison()
    got = ta.decode_attention(q, k, v, head_idx, H, L, key_valid, hd ** -0.5, n_splits=n_splits)
    check(got, ref.decode_attention_reference(q, k, v, head_idx, H, L, key_valid, hd ** -0.5), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [2, 5, 40])
def test_a_set_per_row_is_each_row_alone(dtype, batch):
    """idx [B, m] (serving): each live row gets, to the bit, what the same kernel gives that row
    alone with its own set, whatever the other rows hold; a free row (indices -1) gets zeros from
    the up-side gathers and the bias from gather_axpy, and reads nothing. Neuron units (gate/up,
    down) and head units (Q rows, W_o, attention), plus each row's own top-k."""
    dot_ok(dtype)
    from dejavu.kernels import topk_indices
    g = gen()
    n, d, m, H, hd = 4133, 1000, 300, 12, 64
    w_in, w_out = randn(n, 2, d, g=g, dtype=dtype), randn(n, d, g=g, dtype=dtype)
    wq, bq, bo = randn(H * hd, d, g=g, dtype=dtype), randn(H * hd, g=g, dtype=dtype), randn(d, g=g, dtype=dtype)
    x, a = randn(batch, d, g=g, dtype=dtype), randn(batch, m, g=g, dtype=dtype)
    y = randn(batch, 5 * hd, g=g, dtype=dtype)
    scores = randn(batch, n, g=g, dtype=dtype)
    idx = topk_indices(scores, m)
    heads = topk_indices(randn(batch, H, g=g, dtype=dtype), 5)
    for r in range(batch):
        assert torch.equal(idx[r].sort().values, topk_indices(scores[r], m).sort().values)
    free = torch.zeros(batch, dtype=torch.bool, device=DEV)
    free[1] = True
    with_live = topk_indices(scores, m, (~free).long())  # a free row's scores are not read: its set is -1
    assert torch.equal(with_live[~free], idx[~free]) and (with_live[free] == -1).all()
    idx[free], heads[free] = -1, -1
    calls = [(lambda x_, i_: tg.gather_matvec(x_, w_in[:, 1], i_), x, idx, 0.0),
             (lambda x_, i_: tg.gather_act(x_, w_in, None, i_, "silu"), x, idx, 0.0),
             (lambda a_, i_: tg.gather_axpy(a_, w_out, i_, bo), a, idx, bo),
             (lambda x_, h_: tg.gather_matvec(x_, wq, h_, bq, unit=hd), x, heads, 0.0),
             (lambda y_, h_: tg.gather_axpy(y_, wq, h_, bo, unit=hd), y, heads, bo)]
    for op, inp, sets, free_out in calls:
        poison()
        got = op(inp, sets)
        for r in range(batch):
            if free[r]:
                assert torch.equal(got[r], torch.zeros_like(got[r]) + free_out)
            else:
                assert torch.equal(got[r:r + 1], op(inp[r:r + 1], sets[r:r + 1])), r
                alone = op(inp[r:r + 1], sets[r])  # the one-set kernel, at batch 1
                check(got[r:r + 1], alone.float(), dtype)
    q, k, v, _, L, key_valid = attention_inputs(batch, H, 4, hd, 300, 257, 5, dtype, g)
    got = ta.decode_attention(q, k, v, heads, H, L, key_valid, hd ** -0.5)
    for r in range(batch):
        if not free[r]:
            check(got[r:r + 1], ref.decode_attention_reference(q[r:r + 1], k[r:r + 1], v[r:r + 1], heads[r], H, L,
                                                               key_valid[r:r + 1], hd ** -0.5), dtype)
    assert torch.isfinite(got).all()


def test_decode_attention_is_sdpa_for_all_heads():
    """All heads, no padding: the same as torch's own GQA attention over the valid keys."""
    g = gen()
    q, k, v, head_idx, L, key_valid = attention_inputs(3, 32, 8, 128, 600, 555, 32, torch.float32, g)
    key_valid.fill_(True)
    got = ta.decode_attention(q, k, v, head_idx, 32, L, key_valid, 128 ** -0.5)
    q, k, v = q.double(), k[:, :, :555].double(), v[:, :, :555].double()
    sdpa = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)[:, :, 0]
    check(got, sdpa, torch.float32)


def step(x, w_in, w_out_t, wq, wo_t, k, v, idx, heads, length, key_valid):
    """A sparse decode step's kernels, one after the other (the shapes chain: q rows, attention,
    output projection, MLP)."""
    hd, H = k.shape[-1], wq.shape[0] // k.shape[-1]
    q = tg.gather_matvec(x, wq, heads, unit=hd).view(x.shape[0], -1, hd)
    y = ta.decode_attention(q, k, v, heads, H, length, key_valid, hd ** -0.5)
    h = x + tg.gather_axpy(y.flatten(1), wo_t, heads, unit=hd)
    return h + tg.gather_axpy(tg.gather_act(h, w_in, None, idx, "silu"), w_out_t, idx)


def step_inputs(g, dtype, B=3, d=256, d_ff=700, H=8, Hkv=2, hd=32, S=300):
    return dict(x=randn(B, d, g=g, dtype=dtype), w_in=randn(d_ff, 2, d, g=g, dtype=dtype) / 16,
                w_out_t=randn(d_ff, d, g=g, dtype=dtype) / 16, wq=randn(H * hd, d, g=g, dtype=dtype) / 16,
                wo_t=randn(H * hd, d, g=g, dtype=dtype) / 16, k=randn(B, Hkv, S, hd, g=g, dtype=dtype),
                v=randn(B, Hkv, S, hd, g=g, dtype=dtype), idx=torch.randperm(d_ff, device=DEV, generator=g)[:150],
                heads=torch.randperm(H, device=DEV, generator=g)[:3],
                length=torch.randint(100, S, (), device=DEV, generator=g),
                key_valid=torch.arange(S, device=DEV)[None] >= torch.randint(0, 50, (B, 1), device=DEV, generator=g))


def test_ops_under_torch_compile():
    """fullgraph (no graph break), the four ops in the captured graph as ops, and the compiled
    result right (on the CPU interpreter: Dynamo's capture, run eagerly)."""
    from torch._inductor.compile_fx import compile_fx
    seen = set()

    def backend(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return compile_fx(gm, example_inputs) if CUDA else gm.forward

    dtype = torch.float16 if CUDA else torch.float32
    inputs = step_inputs(gen(), dtype)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend=backend)(**inputs)
    assert {f"dejavu.{op}" for op in ("gather_matvec", "gather_act", "gather_axpy", "decode_attention")} <= seen
    check(got, step(**inputs).float(), dtype)


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("op", ["gather_matvec", "gather_act", "gather_axpy", "decode_attention", "step"])
def test_ops_in_cuda_graph(op):
    """Capture once, then copy new inputs (other indices, other length, other padding) into the
    static buffers and replay: the right answer each time."""
    dtype = torch.bfloat16
    g = gen()
    static = step_inputs(g, dtype)
    x, w_in, w_out_t, k, v = (static[n] for n in ("x", "w_in", "w_out_t", "k", "v"))
    a = randn(x.shape[0], 150, g=g, dtype=dtype)
    q = randn(x.shape[0], 3, k.shape[-1], g=g, dtype=dtype)
    run, reference = {
        "gather_matvec": (lambda: tg.gather_matvec(x, w_in[:, 1], static["idx"]),
                          lambda: ref.gather_matvec_reference(x, w_in[:, 1], static["idx"])),
        "gather_act": (lambda: tg.gather_act(x, w_in, None, static["idx"], "silu"),
                       lambda: ref.gather_act_reference(x, w_in, None, static["idx"], "silu")),
        "gather_axpy": (lambda: tg.gather_axpy(a, w_out_t, static["idx"]),
                        lambda: ref.gather_axpy_reference(a, w_out_t, static["idx"])),
        "decode_attention": (lambda: ta.decode_attention(q, k, v, static["heads"], 8, static["length"],
                                                         static["key_valid"], 32 ** -0.5),
                             lambda: ref.decode_attention_reference(q, k, v, static["heads"], 8, static["length"],
                                                                   static["key_valid"], 32 ** -0.5)),
        "step": (lambda: step(**static), None),
    }[op]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compile the kernels) outside the capture
        run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for _ in range(3):
        fresh = step_inputs(g, dtype)
        for name, t in static.items():
            t.copy_(fresh[name])
        a.copy_(randn(*a.shape, g=g, dtype=dtype))
        q.copy_(randn(*q.shape, g=g, dtype=dtype))
        out.fill_(float("nan"))
        graph.replay()
        expected = reference() if reference is not None else step(**static).float()
        check(out, expected, dtype)


@pytest.mark.skipif(not CUDA, reason="the engine's CUDA path")
@pytest.mark.parametrize("name,selector,batch", [("llama-gqa", "predicted", 2), ("opt-relu", "predicted", 2),
                                                 ("llama-biases", "predicted", 2), ("llama-biases", "gate", 1),
                                                 ("llama-biases", "gate", 2)])
def test_gathered_equals_masked_on_cuda(name, selector, batch, tmp_path):
    """The Triton gathers (biases included: q/k/v/o and the MLP's) compute what masked mode evaluates."""
    from dejavu.selectors import GateSelector, PredictorSelector
    from dejavu.sparse import Gathered, Masked
    from test_model import random_pair
    from test_sparse import decode_side_by_side, quick_predictors
    model, _ = random_pair(name)
    preds = quick_predictors(model, tmp_path)
    model = model.cuda()
    for p in preds.mlp + preds.heads:
        p.cuda()
    pick = lambda: GateSelector(model) if selector == "gate" else PredictorSelector(preds)  # noqa: E731
    gathered = Gathered(model, pick(), PredictorSelector(preds), 0.4, 0.5)
    masked = Masked(model, pick(), PredictorSelector(preds), 0.4, 0.5, union=True)
    prompt = torch.randint(0, 101, (batch, 9), device="cuda")
    _, lg, dense, _ = decode_side_by_side(model, gathered, masked, prompt, 30, atol=1e-4)
    assert not torch.allclose(lg, dense, atol=1e-3)  # sparsity really acted


@pytest.mark.skipif(not CUDA, reason="times kernels on the GPU")
def test_bench_kernels_table():
    """`dejavu bench kernels` end to end on one shape: every row timed, bandwidth under the card's."""
    from dejavu.bench import kernels as bench
    res = bench.bench_kernels(["llama-3-8b"], (0.1, 1.0), (1,), log=lambda *a: None)
    assert len(res["rows"]) == 4 and {r["side"] for r in res["rows"]} == {"up", "down"}
    for r in res["rows"]:
        assert 0 < r["ms"] and 0 < r["of_copy_bw"] < 1.2 and r["speedup"] > 0
    assert "| llama-3-8b | up | 1 | 0.1 |" in bench.kernels_markdown(res)
