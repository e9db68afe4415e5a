"""Zero-shot accuracy through lm-evaluation-harness, on our engine, dense or masked-sparse.

Scoring is loglikelihood only: a forward over context+continuation, no KV cache. With a
sparsity factory (a fresh sparse.Masked per forward) every token runs with its own
selected units, which is what the accuracy of contextual sparsity means; it says nothing
about speed (gathered decode is measured by `dejavu bench`).
"""
from __future__ import annotations

from unittest import mock

import torch
import torch.nn.functional as F
from tqdm import tqdm

import datasets.config
import lm_eval
import lm_eval.evaluator
from lm_eval.api.model import TemplateLM
from lm_eval.tasks import TaskManager
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .model import Transformer
from .tasks import check_tasks, lm_eval_name, task_dir

BATCH_TOKENS = 8192  # padded tokens per forward: bounds the [B, T, vocab] logits


class DejavuLM(TemplateLM):
    """lm-eval's LM over dejavu's Transformer. TemplateLM does the tokenization the way
    lm-eval's HF model does (trailing spaces of the context move to the continuation, an
    empty context becomes EOS); we score the token ids."""

    def __init__(self, model: Transformer, tokenizer, sparsity_factory=None, batch_size: int = 16,
                 max_length: int | None = None, progress: bool = True):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.sparsity_factory = sparsity_factory
        self.batch_size = batch_size
        self.max_length = min(max_length or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self.progress = progress

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def batches(self, order: list[int], lengths: list[int]):
        """Consecutive slices of `order` (longest first) of at most batch_size rows and BATCH_TOKENS padded tokens."""
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or (len(batch) + 1) * lengths[batch[0]] > BATCH_TOKENS):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.inference_mode()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids) ->
        (sum of the continuation's log-probabilities, whether greedy decoding gives it)."""
        # the model reads at most max_length tokens: cut the context from the left
        inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in requests]
        lengths = [len(x) for x in inputs]
        # longest first: rows of a batch have similar lengths (little padding), and a
        # batch too big for memory fails at once rather than at the end
        order = sorted(range(len(requests)), key=lambda i: -lengths[i])
        out: list[tuple[float, bool]] = [None] * len(requests)  # type: ignore[list-item]
        dev = self.model.device
        with tqdm(total=len(requests), desc="loglikelihood", unit="req",
                  disable=disable_tqdm or not self.progress) as bar:
            for batch in self.batches(order, lengths):
                x = torch.zeros(len(batch), lengths[batch[0]], dtype=torch.long)
                for j, i in enumerate(batch):  # right padding: causal attention never reads it
                    x[j, :lengths[i]] = torch.tensor(inputs[i])
                sparsity = self.sparsity_factory() if self.sparsity_factory is not None else None
                logits = self.model(x.to(dev), sparsity=sparsity)
                for j, i in enumerate(batch):
                    key, _, cont = requests[i]
                    n = lengths[i]
                    m = min(len(cont), n)
                    target = torch.tensor(cont[len(cont) - m:], device=dev)
                    logp = F.log_softmax(logits[j, n - m:n].float(), dim=-1)
                    ll = logp.gather(1, target[:, None]).sum().item()
                    out[i] = (ll, bool((logp.argmax(-1) == target).all()))
                    if key is not None:
                        self.cache_hook.add_partial("loglikelihood", key, out[i])
                bar.update(len(batch))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood in disjoint windows of max_length (lm-eval's
        convention: the first token is predicted from EOS)."""
        windows, owner = [], []
        for k, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[k] += ll
        for r, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, t)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("dejavu's lm-eval adapter scores loglikelihoods only; generation tasks are "
                                  "not supported (none of dejavu's tasks generate: use `dejavu generate`)")


def run_eval(model: Transformer, tokenizer, tasks: list[str], limit: int | None = None, sparsity_factory=None,
             batch_size: int = 16, progress: bool = True, bootstrap_iters: int = 1000) -> dict:
    """Zero-shot tasks (dejavu.tasks.TASKS names) -> {task: {acc, acc_stderr, n, metrics, per_example}}.
    `limit` takes the first N examples of each task; per_example: each example's acc, by doc id
    (what paired differences between variants need)."""
    names = check_tasks(tasks)
    lm = DejavuLM(model, tokenizer, sparsity_factory, batch_size, progress=progress)
    manager = TaskManager(include_path=str(task_dir(names)), include_defaults=False)
    # simple_evaluate also records `git describe` of the working directory and torch's
    # collect_env (seconds of subprocesses); neither says anything about this run
    # The task data are local files: datasets must not reach for the hub while it reads
    # them (patched for this call only, not for the caller's process).
    with mock.patch.object(lm_eval.evaluator, "get_git_commit_hash", lambda: None), \
            mock.patch.object(lm_eval.evaluator, "add_env_info", lambda results: None), \
            mock.patch.object(datasets.config, "HF_HUB_OFFLINE", True), \
            mock.patch.object(datasets.config, "HF_DATASETS_OFFLINE", True):
        res = lm_eval.simple_evaluate(model=lm, tasks=[lm_eval_name(t) for t in names], task_manager=manager,
                                      limit=limit, batch_size=batch_size, log_samples=True,
                                      bootstrap_iters=bootstrap_iters, verbosity="ERROR")
    out = {}
    for t in names:
        r = res["results"][lm_eval_name(t)]
        metrics = {k.split(",")[0]: v for k, v in r.items() if "," in k and isinstance(v, (int, float))}
        per_example = {int(s["doc_id"]): float(s["acc"]) for s in res["samples"][lm_eval_name(t)]}
        out[t] = dict(acc=metrics["acc"], acc_stderr=metrics.get("acc_stderr"),
                      n=int(res["n-samples"][lm_eval_name(t)]["effective"]), metrics=metrics,
                      per_example=[per_example[i] for i in sorted(per_example)])
    return out


def paired_difference(variant: list[float], dense: list[float]) -> tuple[float, float]:
    """Mean per-example accuracy difference (variant - dense) on the same examples, and its
    standard error (the paired test: the examples' own difficulty cancels)."""
    d = [a - b for a, b in zip(variant, dense, strict=True)]
    mean = sum(d) / len(d)
    var = sum((x - mean) ** 2 for x in d) / (len(d) - 1) if len(d) > 1 else 0.0
    return mean, (var / len(d)) ** 0.5


def markdown_table(rows: list[dict], tasks: list[str]) -> str:
    """rows: {variant, tasks: run_eval's dict, heldout_ppl} -> one row per variant, acc ± stderr per task."""
    head = ["variant"] + [f"{t} (n={rows[0]['tasks'][t]['n']})" for t in tasks] + ["held-out ppl"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["variant"]]
        for t in tasks:
            s = r["tasks"][t]
            cells.append(f"{s['acc']:.3f} ± {s['acc_stderr']:.3f}" if s["acc_stderr"] is not None else f"{s['acc']:.3f}")
        cells.append(f"{r['heldout_ppl']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    if dense is None or len(rows) < 2:
        return "\n".join(lines)
    lines += ["", "Paired differences against dense (accuracy points, same examples; ± one standard error):", "",
              "| variant | " + " | ".join(tasks) + " | mean of tasks |", "|" + "---|" * (len(tasks) + 2)]
    for r in rows:
        if r is dense:
            continue
        diffs = [paired_difference(r["tasks"][t]["per_example"], dense["tasks"][t]["per_example"]) for t in tasks]
        mean = sum(m for m, _ in diffs) / len(diffs)
        se = sum(s ** 2 for _, s in diffs) ** 0.5 / len(diffs)  # tasks are independent samples
        lines.append(f"| {r['variant']} | " + " | ".join(f"{100 * m:+.1f} ± {100 * s:.1f}" for m, s in diffs)
                     + f" | {100 * mean:+.1f} ± {100 * se:.1f} |")
    return "\n".join(lines)
