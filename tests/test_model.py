"""Our engine against transformers, the KV cache against no cache, batching against single prompts."""
import pytest
import torch
from transformers import (AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig, LlamaConfig, MistralConfig, OPTConfig, Phi3Config,
                          Qwen2Config, Qwen3Config)

from conftest import rel_err
from dejavu.errors import DejavuError
from dejavu.generate import generate_ids
from dejavu.sampling import sample
from dejavu.load import from_hf_model

TEXT = ("Paris is the capital and largest city of France. With an estimated population of 2.1 million "
        "residents, it is the centre of the Ile-de-France region and one of the world's major cities.")

SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=101, max_position_embeddings=128)
RANDOM_CONFIGS = {
    "llama-gqa": lambda: LlamaConfig(intermediate_size=96, num_key_value_heads=2, **SMALL),
    "llama-mha-untied": lambda: LlamaConfig(intermediate_size=96, num_key_value_heads=4, tie_word_embeddings=False,
                                            **SMALL),
    "llama3-rope-scaling": lambda: LlamaConfig(intermediate_size=96, num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=32), **SMALL),
    "qwen2-qkv-bias": lambda: Qwen2Config(intermediate_size=96, num_key_value_heads=2, **SMALL),
    "llama-biases": lambda: LlamaConfig(intermediate_size=96, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
                                        **SMALL),  # q/k/v/o and MLP biases, as Llama configs may ask
    "mistral": lambda: MistralConfig(intermediate_size=96, num_key_value_heads=2, **SMALL),
    "gemma-geglu": lambda: GemmaConfig(intermediate_size=96, num_key_value_heads=1, head_dim=16, **SMALL),
    "qwen3-qk-norm": lambda: Qwen3Config(intermediate_size=96, num_key_value_heads=2, head_dim=24, **SMALL),
    "phi3-fused": lambda: Phi3Config(intermediate_size=96, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                     eos_token_id=2, **SMALL),
    "phi3-longrope": lambda: Phi3Config(intermediate_size=96, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, original_max_position_embeddings=64, rope_parameters=dict(
                                            rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + i / 8 for i in range(8)],
                                            long_factor=[2.0 + i for i in range(8)], original_max_position_embeddings=64),
                                        **SMALL),
    "mistral-window": lambda: MistralConfig(intermediate_size=96, num_key_value_heads=2, sliding_window=16, **SMALL),
    "qwen2-window-layers": lambda: Qwen2Config(intermediate_size=96, num_key_value_heads=2, use_sliding_window=True,
                                               sliding_window=16, max_window_layers=1, **SMALL),
    "phi3-window": lambda: Phi3Config(intermediate_size=96, num_key_value_heads=2, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2, sliding_window=16, **SMALL),
    "gemma3-local-global": lambda: Gemma3TextConfig(intermediate_size=96, num_key_value_heads=2, head_dim=16,
                                                    sliding_window=16, query_pre_attn_scalar=24,
                                                    layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                                                    **SMALL),
    "gemma2-softcap": lambda: Gemma2Config(intermediate_size=96, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                           query_pre_attn_scalar=24, attn_logit_softcapping=2.0,
                                           final_logit_softcapping=3.0, **SMALL),
    "opt-relu": lambda: OPTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, ffn_dim=96,
                                  vocab_size=101, max_position_embeddings=128, word_embed_proj_dim=64),
}


def random_pair(name, seed=0):
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(RANDOM_CONFIGS[name](), dtype=torch.float32).eval()
    with torch.no_grad():  # random norm weights/biases too, so a skipped norm or bias cannot pass
        for n, p in hf.named_parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return from_hf_model(hf), hf


@pytest.mark.parametrize("name", RANDOM_CONFIGS)
def test_random_model_logits_match_transformers(name):
    ours, hf = random_pair(name)
    tokens = torch.randint(0, 101, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(tokens), hf(tokens).logits) < 1e-4


def test_smollm2_logits_match_transformers(smollm2):
    loaded, hf = smollm2
    ids = loaded.tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert rel_err(loaded.model(ids), hf(ids).logits) < 1e-4


def test_smollm2_greedy_generation_matches_transformers(smollm2):
    loaded, hf = smollm2
    ids = loaded.tokenizer("The history of the city of Paris", return_tensors="pt").input_ids
    ours = generate_ids(loaded.model, [ids[0].tolist()], 24)[0]
    ref = hf.generate(ids, max_new_tokens=24, min_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    assert ours == ref


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "gemma-geglu", "llama-biases", "qwen3-qk-norm", "phi3-fused",
                                  "mistral-window", "qwen2-window-layers", "gemma3-local-global", "gemma2-softcap"])
def test_cached_decode_equals_full_forward(name):
    """Prefill + one-token decode steps over the KV cache give the logits of one full forward."""
    model, _ = random_pair(name)
    tokens = torch.randint(0, 101, (2, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 30)
        steps = [model(tokens[:, :10], cache, 0)]
        steps += [model(tokens[:, i:i + 1], cache, i) for i in range(10, 30)]
    assert rel_err(torch.cat(steps, dim=1), full) < 1e-5


def test_generation_with_cache_equals_without(smollm2):
    loaded, _ = smollm2
    model = loaded.model
    prompt = loaded.tokenizer(TEXT).input_ids
    with_cache = generate_ids(model, [prompt], 16)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(16):  # recompute the whole sequence every step, no cache
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert with_cache == seq[len(prompt):]


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu"])
def test_batch_with_padding_equals_single_prompts(name):
    model, _ = random_pair(name)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 101, (n,), generator=g).tolist() for n in (5, 17, 11)]
    batched = generate_ids(model, prompts, 12)
    single = [generate_ids(model, [p], 12)[0] for p in prompts]
    assert batched == single


def test_eos_stops_a_row_and_later_rows_continue(smollm2):
    loaded, _ = smollm2
    tok = loaded.tokenizer
    prompts = [tok("The history of the city of Paris").input_ids, tok("One, two, three,").input_ids]
    free = generate_ids(loaded.model, prompts, 8)
    eos = free[0][2]  # pretend the third token of row 0 is the end of sequence
    cut = generate_ids(loaded.model, prompts, 8, eos_id=eos)
    assert cut[0] == free[0][:3]
    assert cut[1] == free[1][:free[1].index(eos) + 1] if eos in free[1] else cut[1] == free[1]


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    logits = torch.tensor([[4.0, 3.0, 0.0, -1.0, -2.0]] * 2000)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, 0.0), torch.zeros(2000, dtype=torch.long))
    drawn = sample(logits, 1.0, top_p=0.9, generator=g)
    assert set(drawn.tolist()) == {0, 1}  # p = 0.716, 0.263, ...: the nucleus of 0.9 is tokens 0 and 1
    frac0 = (drawn == 0).float().mean().item()
    assert abs(frac0 - 0.7311) < 0.04  # renormalised e^4 / (e^4 + e^3)
    a = sample(logits[:5], 1.0, generator=torch.Generator().manual_seed(7))
    b = sample(logits[:5], 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    all_tokens = set(sample(logits, 5.0, generator=g).tolist())
    assert all_tokens == {0, 1, 2, 3, 4}


def test_context_overflow_is_a_clear_error():
    model, _ = random_pair("llama-gqa")
    with pytest.raises(DejavuError, match="exceeds the model's context of 128"):
        generate_ids(model, [[1] * 100], 40)


@pytest.mark.parametrize("name", ["llama-gqa", "opt-relu", "gemma2-softcap", "qwen3-qk-norm"])
def test_info_counts_every_weight_once(name):
    """`dejavu info`'s parts add up to every parameter of the model (post norms and q/k norms too)."""
    from dejavu.model import param_bytes
    model, _ = random_pair(name)
    parts = param_bytes(model)
    assert parts["total"] == sum(p.numel() * p.element_size() for p in model.parameters())
