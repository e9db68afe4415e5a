"""`dejavu serve`'s CUDA-graph scheduler (serve/scheduler.GraphScheduler), in process, on the
device: requests join free rows of one cache while others decode, and each answer is what the
request gets alone."""
import copy
import threading
import time

import pytest
import torch

pytestmark = pytest.mark.gpu


def run_jobs(scheduler, specs, stagger=0.0):
    """Submit Jobs (prompt, max_tokens, temperature, seed, fault) `stagger` s apart while the
    scheduler runs -> each job's (tokens, end event)."""
    from dejavu.serve.metrics import Metrics
    from dejavu.serve.scheduler import Job
    scheduler.metrics = scheduler.metrics or Metrics(scheduler)
    thread = threading.Thread(target=scheduler.run, daemon=True)
    thread.start()
    results, done = [], []
    for prompt, max_tokens, temperature, seed, fault in specs:
        got, end = [], threading.Event()
        results.append((got, end))

        def deliver(ev, got=got, end=end):
            got.append(ev)
            if ev[0] != "token":
                end.set()
        scheduler.submit(Job(prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=0.9,
                             stop_ids=frozenset(), deliver=deliver, seed=seed, fault=fault))
        time.sleep(stagger)
    for _, end in results:
        assert end.wait(120), "a request never ended"
    scheduler.stopping = True
    thread.join(10)
    return [([e[1] for e in got if e[0] == "token"], got[-1]) for got, _ in results]


@pytest.fixture(scope="module")
def model_and_preds(tmp_path_factory):
    from test_model import random_pair
    from test_sparse import quick_predictors
    model, _ = random_pair("llama-gqa")
    preds = quick_predictors(model, tmp_path_factory.mktemp("preds"))
    for p in preds.mlp + preds.heads:
        p.cuda()
    return model.cuda(), preds


def mixed_specs(n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 101, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist(),
             int(torch.randint(3, 40, (1,), generator=g)), 0.0, None, None) for _ in range(n)]


def alone(model, spec, sparsity=None):
    from dejavu.generate import generate_ids
    prompt, max_tokens, *_ = spec
    return generate_ids(model, [prompt], max_tokens, sparsity=sparsity)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_requests_joining_a_running_batch_get_what_they_get_alone(model_and_preds, dtype):
    """Dense, up to 4 rows, 10 requests of mixed lengths arriving while others decode (rows are
    freed and taken again): every greedy answer equals, to the bit, the request sent alone to
    the server, in bf16 too (the dense step always runs every row, so its matmuls keep their
    shapes and rounding); in fp32 also generate()'s batch-1 answer."""
    from dejavu.serve.scheduler import GraphScheduler
    model = copy.deepcopy(model_and_preds[0]).to(dtype)
    specs = mixed_specs()
    sched = GraphScheduler(model, batch_size=4)
    out = run_jobs(sched, specs, stagger=0.01)
    assert sched.slots == [None] * 4 and all(r not in sched.dec.live_rows for r in range(4))
    for spec, (tokens, end) in zip(specs, out):
        assert end == ("end", "length")
        assert tokens == run_jobs(GraphScheduler(model, batch_size=4), [spec])[0][0]
        if dtype == torch.float32:
            assert tokens == alone(model, spec)


def sparse_scheduler(model, make):
    """A GraphScheduler decoding sparse whatever the tiny model measures (the sparse step is what is checked)."""
    from dejavu.serve.scheduler import GraphScheduler
    sched = GraphScheduler(model, make(), batch_size=4)
    sched.warm()
    assert sched.mode["sparse_ms"] is not None and sched.mode["sparse_all_ms"] is not None
    sched.mode["sparse"] = True
    return sched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selector", ["predicted", "gate"])
def test_sparse_requests_joining_a_running_batch_get_what_they_get_alone(model_and_preds, dtype, selector):
    """Sparse, up to 4 rows, each row selecting its own units (lookahead predictors, or gate-first):
    10 requests of mixed lengths arriving while others decode each get, to the bit, what the same
    request gets alone from the sparse server, in bf16 too; and sparsity acted (the answers are
    not all the dense ones)."""
    from dejavu.selectors import GateSelector, PredictorSelector
    from dejavu.serve.scheduler import GraphScheduler
    from dejavu.sparse import Gathered
    model = copy.deepcopy(model_and_preds[0]).to(dtype)
    preds = model_and_preds[1]
    mlp = lambda: GateSelector(model) if selector == "gate" else PredictorSelector(preds)
    make = lambda: Gathered(model, mlp(), PredictorSelector(preds), 0.3, 0.5)
    specs = mixed_specs(seed=7)
    sched = sparse_scheduler(model, make)
    out = run_jobs(sched, specs, stagger=0.01)
    assert sched.density("mlp") == pytest.approx(round(0.3 * model.cfg.d_ff) / model.cfg.d_ff)
    differs = 0
    for spec, (tokens, end) in zip(specs, out):
        assert end == ("end", "length")
        assert tokens == run_jobs(sparse_scheduler(model, make), [spec])[0][0]
        differs += tokens != run_jobs(GraphScheduler(model, batch_size=4), [spec])[0][0]
    assert differs > 0


def test_seeded_sampling_does_not_depend_on_the_batch(model_and_preds):
    """A seeded sampled request draws the same tokens alone and among other requests (the pick
    is keyed by seed and position on the device); another seed draws others."""
    from dejavu.serve.scheduler import GraphScheduler
    model, _ = model_and_preds
    mine = ([5, 6, 7, 8], 30, 1.0, 1234, None)
    sched = GraphScheduler(model, batch_size=4)
    first = run_jobs(sched, [mine])[0][0]
    sched = GraphScheduler(model, batch_size=4)
    crowd = run_jobs(sched, mixed_specs(3, seed=3) + [mine] + [([9, 9], 20, 1.0, 99, None)], stagger=0.003)
    assert crowd[3][0] == first
    other = run_jobs(GraphScheduler(model, batch_size=4), [(mine[0], 30, 1.0, 4321, None)])[0][0]
    assert other != first


def test_a_poisoned_row_fails_alone_and_an_oversized_request_is_refused(model_and_preds):
    """NaN in one request's cache: that request ends with the non-finite error, the others get
    their answers alone; a prompt plus max_tokens past the context gets a clear error."""
    from dejavu.serve.scheduler import FAULT_NAN, GraphScheduler
    model, _ = model_and_preds
    specs = mixed_specs(5, seed=4)
    specs[2] = (specs[2][0], 20, 0.0, None, FAULT_NAN)
    specs.append(([1] * 100, 100, 0.0, None, None))  # 200 > the 128-token context
    out = run_jobs(GraphScheduler(model, batch_size=4), specs, stagger=0.005)
    assert out[2][1][0] == "error" and "non-finite" in out[2][1][1]
    assert out[5][1][0] == "error" and "exceed the context of 128" in out[5][1][1]
    for i in (0, 1, 3, 4):
        assert out[i][0] == alone(model, specs[i])
