"""Next-token choice from logits: greedy, temperature and top-p. One transform, shared by
generate, lossless mode (whose exactness needs the draft and the verifier to see the same
distribution) and the server."""
from __future__ import annotations

import torch


def probabilities(logits: torch.Tensor, temperature, top_p=1.0) -> torch.Tensor:
    """logits [..., V] -> the sampling distribution [..., V] (temperature > 0), normalized.
    temperature and top_p are numbers, or tensors of one value per row (logits[..., 0]'s shape):
    then nothing branches on their values, so a CUDA graph can capture the call, and rows at
    temperature 0 get temperature 1 (their pick is the argmax anyway)."""
    per_row = isinstance(temperature, torch.Tensor)
    if per_row:
        temperature = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[..., None]
        top_p = top_p[..., None]
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if per_row or top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(outside & (top_p < 1), 0.0)  # top_p 1: keep all (sums may round past 1)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B]. temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------- sampling inside a CUDA graph
# A captured step cannot call back to the host, and a torch.Generator's state does not advance
# across graph replays. So the random numbers come from a counter-based hash of (the row's
# seed, its position, the token id): the same draw every time for the same request, whatever
# else shares the batch, and no state to carry. The token is the exponential race
# argmax_i p_i / E_i with E_i = -log(u_i), which picks i with probability p_i exactly as
# torch.multinomial does; p is `probabilities`, the same transform as the host path.

def _signed(c: int) -> int:  # a 64-bit constant as the int64 torch stores
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def uniform_hash(seed: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """seed, pos [B] int64 -> [B, n] float32 uniform in (0, 1): splitmix64 of the counter
    (seed, pos, i). int64 products wrap around as the hash wants."""
    i = torch.arange(n, device=seed.device, dtype=torch.long)
    x = seed[:, None] * _signed(0x9E3779B97F4A7C15) + pos[:, None] * _signed(0xD1B54A32D192ED03) + i
    x = (x ^ _shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _shr(x, 27)) * _signed(0x94D049BB133111EB)
    x = x ^ _shr(x, 31)
    return (_shr(x, 40).float() + 0.5) * (1.0 / (1 << 24))  # the top 24 bits, never 0 or 1


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, seed: torch.Tensor,
                pos: torch.Tensor, greedy: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] -> next tokens [B], every argument a tensor on the logits' device, so the
    call can be captured in a CUDA graph and replayed with new values. Row b is greedy where
    temperature[b] == 0, else a draw from probabilities(logits[b], temperature[b], top_p[b])
    keyed by (seed[b], pos[b]): reproducible, and independent of the other rows. `greedy`: the rows'
    argmax where the caller has it already."""
    greedy = logits.argmax(dim=-1) if greedy is None else greedy
    probs = probabilities(logits, temperature, top_p)
    race = probs / -torch.log(uniform_hash(seed, pos, logits.shape[-1]))
    return torch.where(temperature > 0, race.argmax(dim=-1), greedy)
