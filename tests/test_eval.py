"""Zero-shot accuracy through lm-eval on the real default model (offline task data)."""
import json

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from dejavu.cli import main
from dejavu.lm_eval_adapter import DejavuLM, run_eval
from dejavu.errors import DejavuError


def request(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def hf_logprob(hf, ids: list[int], n_ctx: int) -> float:
    """Sum of log p(ids[i] | ids[:i]) for i >= n_ctx, straight from transformers."""
    with torch.no_grad():
        logp = F.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)
    return sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids)))


def test_loglikelihood_matches_transformers(smollm2):
    loaded, hf = smollm2
    tok = loaded.tokenizer
    pairs = [("The capital of France is", " Paris"), ("Question: How do I boil water?\nAnswer:",
                                                      " Put it in a pot on the stove and heat it."),
             ("A", " b c d e f g")]
    lm = DejavuLM(loaded.model, tok, batch_size=2, progress=False)  # two batches, one with padding
    got = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs], disable_tqdm=True)
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        ctx_ids, ids = tok.encode(ctx), tok.encode(ctx + cont)
        assert ll == pytest.approx(hf_logprob(hf, ids, len(ctx_ids)), abs=1e-4)
        assert isinstance(greedy, bool)
    assert got[0][1] and got[0][0] > got[2][0]  # " Paris" is the greedy continuation

    # whole-document scoring: the first token is predicted from EOS
    text = "The history of the city of Paris"
    (rolling,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)], disable_tqdm=True)
    assert rolling == pytest.approx(hf_logprob(hf, [tok.eos_token_id] + tok.encode(text), 1), abs=1e-4)

    # contexts longer than the model's window are cut from the left
    short = DejavuLM(loaded.model, tok, max_length=8, progress=False)
    ctx, cont = "one two three four five six seven eight nine ten", " eleven"
    (ll, _), = short.loglikelihood([request("loglikelihood", ctx, cont)], disable_tqdm=True)
    ids = tok.encode(ctx + cont)
    n_cont = len(ids) - len(tok.encode(ctx))
    assert ll == pytest.approx(hf_logprob(hf, ids[-9:], 9 - n_cont), abs=1e-4)  # 8 tokens in, the last predicted


def test_sparsity_factory_is_used_per_forward(smollm2):
    from dejavu.selectors import GateSelector
    from dejavu.sparse import Masked
    loaded, _ = smollm2
    made = []

    def factory():
        made.append(Masked(loaded.model, mlp=GateSelector(loaded.model), mlp_density=0.3))
        return made[-1]
    reqs = [request("loglikelihood", "The capital of France is", x) for x in (" Paris", " London", " Rome")]
    dense = DejavuLM(loaded.model, loaded.tokenizer, progress=False).loglikelihood(reqs, disable_tqdm=True)
    sparse = DejavuLM(loaded.model, loaded.tokenizer, factory, batch_size=2, progress=False).loglikelihood(
        reqs, disable_tqdm=True)
    assert len(made) == 2 and made[0].density("mlp") == pytest.approx(0.3, abs=0.01)
    assert all(a[0] != b[0] for a, b in zip(dense, sparse))


def test_run_eval_small(smollm2):
    loaded, _ = smollm2
    r = run_eval(loaded.model, loaded.tokenizer, ["piqa", "copa", "winogrande"], limit=8, progress=False)
    assert set(r) == {"piqa", "copa", "winogrande"}
    for s in r.values():
        assert s["n"] == 8 and 0 <= s["acc"] <= 1 and 0 <= s["acc_stderr"] < 0.5
        assert len(s["per_example"]) == 8 and sum(s["per_example"]) / 8 == pytest.approx(s["acc"])


def test_paired_difference_by_hand():
    from dejavu.lm_eval_adapter import paired_difference
    mean, se = paired_difference([1, 0, 1, 1], [1, 1, 0, 0])  # differences 0, -1, 1, 1
    assert mean == pytest.approx(0.25) and se == pytest.approx((0.9166666 / 4) ** 0.5, rel=1e-5)
    assert paired_difference([1, 0, 1], [1, 0, 1]) == (0.0, 0.0)


def test_unknown_task_is_a_clear_error(smollm2):
    loaded, _ = smollm2
    with pytest.raises(DejavuError, match="unknown task 'mmlu'.*available: cb, copa, hellaswag"):
        run_eval(loaded.model, loaded.tokenizer, ["piqa", "mmlu"], limit=2)


def test_eval_command(tmp_path, capsys):
    out = tmp_path / "eval.md"
    assert main(["eval", "--tasks", "rte", "--limit", "4", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| variant | rte (n=4) | held-out ppl |" in text and "| dense | " in text
    assert out.read_text().startswith("| variant") and out.with_suffix(".json").exists()


def test_eval_command_with_input_side_sparsity(tmp_path, capsys):
    out = tmp_path / "eval.md"
    assert main(["eval", "--tasks", "rte,copa", "--limit", "6", "--sparse", "--input-density", "0.7",
                 "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| input-side teal (0.7) | " in text and "Paired differences against dense" in text
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["input_density"] == 0.7 and result["predictors"] is None
    assert [r["variant"] for r in result["rows"]] == ["dense", "input-side teal (0.7)"]


@pytest.mark.parametrize("argv,msg", [(["eval", "--tasks", "piqa,nope"], "unknown task 'nope'"),
                                      (["eval", "--mlp-density", "0"], "(0, 1]"),
                                      (["eval", "--limit", "0"], "--limit must be at least 1")])
def test_eval_bad_input(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and "Traceback" not in err
