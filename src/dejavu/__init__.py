"""dejavu: contextual sparsity (Deja Vu, Liu et al., ICML 2023) for LLM inference."""
from .errors import DejavuError
from .load import DEFAULT_MODEL, PRESETS, load
from .model import ModelConfig, Transformer

__all__ = ["DEFAULT_MODEL", "PRESETS", "DejavuError", "ModelConfig", "Transformer", "load"]
__version__ = "0.1.0"
