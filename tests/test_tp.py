"""Tensor parallelism (tp.py): N ranks give the logits of one rank, dense and sparse.

Runs N = 2 processes on the CPU with gloo (the same code runs with NCCL on GPUs). Each rank
builds the same random model, keeps a whole copy as the 1-rank reference, shards the other
and decodes both side by side: prefill, then greedy steps over the KV cache. Sparse: the
sharded engine's gathered decode (each rank its own top-k/N) against masked execution of the
whole model with the same rule (Selection shards=N)."""
import copy
import faulthandler
import os
import socket
import time

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


def join_group(rank, port, device):
    """This spawned process joins the WORLD-rank group: NCCL on GPUs (multicast off), gloo on the CPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD),
                      TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NCCL_NVLS_ENABLE="0")
    faulthandler.dump_traceback_later(600, exit=True)  # a hung collective fails the test, with its stack
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=rank, world_size=WORLD)


def worker(rank, port, name, device, results):
    join_group(rank, port, device)
    try:
        from test_model import random_pair
        ref, _ = random_pair(name)
        ref = ref.to(device)
        sharded = tp.shard(copy.deepcopy(ref), rank, WORLD)
        dense = side_by_side(ref, sharded, None, None)
        preds = random_predictors(ref, seed=1)
        own = preds.shard(rank, WORLD)
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


def all_reduce_worker(rank, port, results):
    join_group(rank, port, "cuda")
    try:
        gen = torch.Generator(device="cuda").manual_seed(rank)
        cases = [((1, 9216), torch.bfloat16), ((3, 7168), torch.float16), ((5, 333), torch.float32),
                 ((64, 12288), torch.bfloat16)]  # the last is past the one-shot buffer: NCCL
        wrong = []
        for shape, dtype in cases:
            xs = [torch.randn(shape, device="cuda", generator=gen).to(dtype) for _ in range(3)]
            want = [x.clone() for x in xs]
            for w in want:
                dist.all_reduce(w)
            eager = [tp.all_reduce(x.clone()) for x in xs]
            buf = xs[0].clone()  # three calls in one graph, replayed on each input in turn
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(3):
                    tp.all_reduce(buf)
            graphed = []
            for x in xs:
                buf.copy_(x)
                g.replay()
                graphed.append(buf.clone())
            nccl_thrice = [x.clone() for x in xs]
            for x in nccl_thrice:
                for _ in range(3):
                    dist.all_reduce(x)
            for i in range(3):
                if not torch.equal(eager[i], want[i]) or not torch.equal(graphed[i], nccl_thrice[i]):
                    wrong.append((shape, str(dtype), i))
        results[rank] = (wrong, tp._one_shot is not None)
        del g  # a live graph holding a captured NCCL call can hang destroy_process_group
        torch.cuda.synchronize()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
def test_one_shot_all_reduce_equals_nccl():
    """Our decode all-reduce (eager and replayed in a graph, several calls in flight one after
    another) gives NCCL's bits; a tensor past its buffer goes to NCCL."""
    if torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    results = mp.Manager().dict()
    mp.spawn(all_reduce_worker, args=(free_port(), results), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        wrong, built = results[rank]
        assert built, f"rank {rank}: the one-shot all-reduce was never built"
        assert not wrong, f"rank {rank}: differs from NCCL at {wrong}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "llama-biases", "qwen3-qk-norm", "gemma3-local-global"])
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


def serve_worker(rank, port, device, results):
    """`serve --tp 2`'s scheduler on each rank (rank 0 takes the jobs, rank 1 follows its ticks):
    each rank records the tokens of every job it ran; rank 0 also what each job gets from the
    whole model alone."""
    import threading

    from dejavu.generate import generate_ids
    from dejavu.serve.metrics import Metrics
    from dejavu.serve.scheduler import GraphScheduler, Job, Mirror, Scheduler

    class Recording(Mirror):
        def tick(self, s):
            super().tick(s)
            self.seen.update(self.jobs)

    join_group(rank, port, device)
    try:
        from test_model import random_pair
        ref, _ = random_pair("llama-gqa")
        ref = ref.to(device)
        torch.manual_seed(rank)  # the ranks' own random states differ: only rank 0's seeds may count
        mirror = Recording()
        mirror.seen = {}
        sharded = tp.shard(copy.deepcopy(ref), rank, WORLD)
        if device == "cuda":  # the CUDA-graph scheduler: steps captured with their all-reduces
            scheduler = GraphScheduler(sharded, batch_size=3, mirror=mirror)
            scheduler.warm()
        else:
            scheduler = Scheduler(sharded, batch_size=3, mirror=mirror)
        scheduler.metrics = Metrics(scheduler)
        if rank:
            scheduler.run()  # until rank 0 stops
            results[rank] = {uid: job.out for uid, job in mirror.seen.items()}
            return
        thread = threading.Thread(target=scheduler.run, daemon=True)
        thread.start()
        g = torch.Generator().manual_seed(5)
        prompts = [torch.randint(0, 101, (int(n),), generator=g).tolist() for n in (5, 9, 3, 12, 7)]
        jobs = []
        for i, prompt in enumerate(prompts):  # 5 jobs for 3 rows, arriving while others decode
            done = threading.Event()
            job = Job(prompt=prompt, max_tokens=10, temperature=0.8 if i == 2 else 0.0, top_p=0.9,
                      stop_ids=frozenset(), deliver=lambda ev, done=done: done.set() if ev[0] != "token" else None)
            job.done = done
            scheduler.submit(job)
            jobs.append(job)
            time.sleep(0.05)
        gone = Job(prompt=prompts[0], max_tokens=40, temperature=0.0, top_p=1.0, stop_ids=frozenset(),
                   deliver=lambda ev: None)
        scheduler.submit(gone)
        scheduler.withdraw(gone)  # withdrawn before it ran: every rank drops it
        for job in jobs:
            assert job.done.wait(120), "a job never ended"
        scheduler.stopping = True
        thread.join(60)
        want = [generate_ids(ref, [job.prompt], 10)[0] for job in jobs]
        results[0] = ([job.out for job in jobs], want, {uid: job.out for uid, job in mirror.seen.items()},
                      len(gone.out), thread.is_alive())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_serve_on_two_ranks_answers_as_one_model(device):
    """`serve --tp 2` (gloo on the CPU, NCCL and CUDA graphs on 2 GPUs): jobs join and leave a running batch on rank 0 while rank 1 mirrors
    every step; the greedy answers equal the whole model's alone (a rank that missed a job or a
    step would break the all-reduces' sums), both ranks ran the same jobs to the same tokens (the
    sampled one without a seed too: rank 0 gives it one), a withdrawn job never runs, and both
    ranks stop."""
    if device == "cuda" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"needs {WORLD} GPUs")
    results = mp.Manager().dict()
    mp.spawn(serve_worker, args=(free_port(), device, results), nprocs=WORLD, join=True)
    served, want, ran, gone_tokens, alive = results[0]
    assert not alive, "rank 0's scheduler did not stop"
    greedy = [i for i in range(len(want)) if i != 2]
    assert [served[i] for i in greedy] == [want[i] for i in greedy]
    assert len(ran) == 5 and len(served[2]) == 10  # the withdrawn job left in the tick that brought it
    assert results[1] == ran, "rank 1 ran other jobs or drew other tokens than rank 0"
    assert gone_tokens == 0


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


def test_predictors_from_disk_load_as_each_ranks_slice(tmp_path):
    """Predictors saved for the whole model load onto a shard (checked against the whole model's
    fingerprint) as that rank's slice, the same as sharding them in memory; other predictors are refused."""
    from dejavu.collect import model_fingerprint
    from dejavu.predictor import PREDICTOR_VERSION, Predictors
    from test_model import random_pair
    model, _ = random_pair("llama-gqa")
    preds = random_predictors(model, seed=1)
    preds.static_neuron = [torch.rand(model.cfg.d_ff) for _ in model.layers]
    preds.static_head = [torch.rand(model.cfg.n_heads) for _ in model.layers]
    preds.meta.update(version=PREDICTOR_VERSION, fingerprint=model_fingerprint(model))
    preds.save(tmp_path / "p")
    for rank in range(WORLD):
        shard = tp.shard(copy.deepcopy(model), rank, WORLD)
        got, want = Predictors.load(tmp_path / "p", shard), preds.shard(rank, WORLD)
        for a, b in zip(got.mlp + got.heads, want.mlp + want.heads):
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert all(torch.equal(x, y) for x, y in zip(got.static_neuron, want.static_neuron))
        assert got.meta["tp"] == [rank, WORLD]
    other, _ = random_pair("opt-relu")
    with pytest.raises(DejavuError, match="made for another model"):
        Predictors.load(tmp_path / "p", tp.shard(other, 0, WORLD))


def test_generate_runs_sharded_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m dejavu generate --tp 2` (gloo on the CPU here, NCCL on GPUs)
    prints what one process prints, once; without torchrun, --tp 2 is a clear error."""
    import subprocess
    import sys
    from test_serve import tiny_llama
    folder = tiny_llama(tmp_path / "tiny")
    args = ["generate", "--model", folder, "--device", "cpu", "--prompt", "The city of Paris", "--max-new-tokens", "8"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "-m", "dejavu", *args], capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          f"--master-port={free_port()}", "-m", "dejavu", *args, "--tp", "2"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout == one.stdout
    alone = subprocess.run([sys.executable, "-m", "dejavu", *args, "--tp", "2"], capture_output=True, text=True)
    assert alone.returncode == 2 and "torchrun --nproc-per-node 2" in alone.stderr


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_a_checkpoint_loads_layer_by_layer_into_the_same_shard(tmp_path, family):
    """load(tp=(rank, N)) on a safetensors folder reads one layer at a time (load_shard) and gives
    the shard that loading the whole model and cutting it gives, with the whole model's fingerprint."""
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    from dejavu.collect import model_fingerprint
    from dejavu.load import from_hf_model, load_shard, config_from_hf
    torch.manual_seed(0)
    cfg = (LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
           if family == "llama" else
           OPTConfig(vocab_size=97, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, word_embed_proj_dim=32))
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    whole = from_hf_model(hf, torch.float32)
    for rank in range(WORLD):
        want = tp.shard(copy.deepcopy(whole), rank, WORLD)
        got = load_shard(tmp_path, config_from_hf(hf.config, None), torch.float32, "cpu", rank, WORLD)
        assert got.cfg == want.cfg and got.tp == (rank, WORLD)
        assert got.unsharded_fingerprint == model_fingerprint(whole)
        a, b = got.state_dict(), want.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
