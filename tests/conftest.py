import pytest
import torch

from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model: our engine and transformers' reference on the same weights."""
    from transformers import AutoModelForCausalLM

    from dejavu.load import load, smollm2_folder
    loaded = load("smollm2-135m")
    hf = AutoModelForCausalLM.from_pretrained(smollm2_folder(), dtype=torch.float32).eval()
    return loaded, hf


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
