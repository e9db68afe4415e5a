"""Tensor parallelism (tp.py): N ranks give the logits of one rank, dense and sparse.

Runs N = 2 processes on the CPU with gloo (the same code runs with NCCL on GPUs). Each rank
builds the same random model, keeps a whole copy as the 1-rank reference, shards the other
and decodes both side by side: prefill, then greedy steps over the KV cache. Sparse: the
sharded engine's gathered decode (each rank its own top-k/N) against masked execution of the
whole model with the same rule (Selection shards=N)."""
import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dejavu import tp
from dejavu.errors import DejavuError
from dejavu.predictor import random_predictors
from dejavu.selectors import PredictorSelector
from dejavu.sparse import Gathered, Masked

WORLD = 2


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def side_by_side(ref, sharded, ref_sparsity, tp_sparsity, steps=6):
    prompt = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(3)).to(ref.device)
    caches = ref.new_cache(2, 32), sharded.new_cache(2, 32)
    with torch.no_grad():
        want, got = ref(prompt, caches[0], 0), sharded(prompt, caches[1], 0)
        errs = [rel_err(got, want)]
        pos = prompt.shape[1]
        for _ in range(steps):
            token = want[:, -1:].argmax(-1)
            want = ref(token, caches[0], pos, ref_sparsity)
            got = sharded(token, caches[1], pos, tp_sparsity)
            errs.append(rel_err(got, want))
            pos += 1
    return max(errs)


def worker(rank, port, name, device, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=WORLD)
    try:
        from test_model import random_pair
        ref, _ = random_pair(name)
        ref = ref.to(device)
        sharded = tp.shard(copy.deepcopy(ref), rank, WORLD)
        dense = side_by_side(ref, sharded, None, None)
        preds = random_predictors(ref, seed=1)
        own = tp.shard_predictors(preds, rank, WORLD)
        masked = Masked(ref, PredictorSelector(preds), PredictorSelector(preds), 0.5, 0.5, union=True, shards=WORLD)
        gathered = Gathered(sharded, PredictorSelector(own), PredictorSelector(own), 0.5, 0.5)
        sparse = side_by_side(ref, sharded, masked, gathered)
        graph_equal = True
        if device == "cuda":  # the CUDA-graph step, all-reduces captured: the same tokens as one rank
            from dejavu.engine import greedy
            prompt = torch.randint(0, 101, (1, 7), generator=torch.Generator().manual_seed(4)).to(device)
            graph_equal = torch.equal(greedy(sharded, prompt, 8)[0], greedy(ref, prompt, 8)[0])
        results[rank] = (dense, sparse, graph_equal)
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "llama-biases"])
def test_two_ranks_match_one(name, device):
    """CPU: gloo. GPU (2 cards): NCCL, the Triton kernels on each rank's shard."""
    if device == "cuda" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), name, device, results), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        dense, sparse, graph_equal = results[rank]
        assert graph_equal, f"rank {rank}: the CUDA-graph decode's tokens differ from one rank's"
        assert dense < 1e-5, f"rank {rank}: dense logits differ by {dense}"
        assert sparse < 1e-5, f"rank {rank}: sparse logits differ by {sparse}"


def test_masked_shards_rule_differs_from_global_top_k():
    """The shards rule is its own rule (else the sparse check above could not tell them apart)."""
    from test_model import random_pair
    model, _ = random_pair("opt-relu")
    preds = random_predictors(model, seed=1)
    x = torch.randn(1, 5, model.cfg.d_model)
    scores = PredictorSelector(preds).neuron_scores(0, [x], x)
    one = Masked(model, PredictorSelector(preds), None, 0.25).select("mlp", scores, 24)
    two = Masked(model, PredictorSelector(preds), None, 0.25, shards=2).select("mlp", scores, 12)
    assert (two.view(1, 5, 2, -1).sum(-1) == 12).all()
    assert not torch.equal(one, two)


def test_indivisible_shapes_are_refused():
    from test_model import random_pair
    model, _ = random_pair("opt-relu")  # 4 heads
    with pytest.raises(DejavuError, match="divide evenly"):
        tp.shard(model, 0, 3)
    with pytest.raises(DejavuError, match="torchrun --nproc-per-node 2"):
        tp.init(2)


def test_gate_first_candidates_are_per_shard():
    """Gate-first selection under the shards rule: every shard gets its own refine * k candidates,
    so each shard's k kept neurons are all candidates (exact scores, never the -1 of a non-candidate)."""
    from dejavu.selectors import GateSelector
    from test_model import random_pair
    model, _ = random_pair("llama-gqa")
    x = torch.randn(1, 5, model.cfg.d_model)
    n, shards = model.cfg.d_ff, 2
    k = n // shards // 4
    scores = GateSelector(model, refine=1.5).neuron_scores(0, [x], x, k=k, shards=shards)
    per_shard_candidates = (scores.unflatten(-1, (shards, -1)) >= 0).sum(-1)
    assert (per_shard_candidates >= k).all(), per_shard_candidates
