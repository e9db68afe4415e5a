"""Lossless mode: the sparse model drafts, the dense model verifies (self-speculative decoding).

The gathered sparse model (sparse.Gathered) is a cheap draft of the dense model it was cut
from. One round, with the dense KV cache exact up to slot P-1 and `last`, the newest token,
sampled but not yet fed (it sits at slot P):

  draft   k sparse one-token steps feed last, d1 .. d(k-1) at slots P .. P+k-1 and propose
          d1 .. dk (with their draft distributions q1 .. qk when sampling). The K/V they write
          into slots P .. P+k-1 are the sparse model's: approximate.
  verify  one dense forward over [last, d1 .. dk] at slots P .. P+k overwrites those slots
          with the dense K/V and gives the dense distributions p1 .. p(k+1).
  accept  greedy: the longest prefix with di == argmax pi, then the dense argmax after it.
          sampling (Leviathan et al. 2023; Chen et al. 2023): keep di with probability
          min(1, pi(di) / qi(di)); at the first rejection draw from norm(max(0, pi - qi));
          if all k are kept, draw the bonus token from p(k+1).

Every kept token is then distributed exactly as the dense model's next token (for greedy:
it is the dense argmax). Slots after the last kept token still hold K/V of rejected drafts;
attention reads slots < start_pos + T only, and the next round overwrites them before any
query can see them, so a rejection leaves no trace.

p and q go through the same temperature / top-p transform (sampling.probabilities).
k is fixed (draft_tokens=k) or chosen every round by DraftLength from the measured
acceptance rate and the measured cost of a draft step and of a verification.
On CUDA (GraphSpeculativeDecoder) the draft step and each verification length replay CUDA
graphs. Batch 1 only: rows of a batch accept different numbers of drafts, so their caches would
drift apart; that bookkeeping is not built.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import DejavuError
from .generate import GenerationStats, stop_list
from .model import Transformer
from .sampling import probabilities, uniform_hash


@dataclass
class LosslessStats:
    rounds: int = 0
    drafted: int = 0            # draft tokens proposed
    accepted: int = 0           # of those, kept by the dense model
    rejected: int = 0           # rounds that ended in a rejection (the drafts after it are never checked)
    draft_seconds: float = 0.0  # sparse draft steps
    verify_seconds: float = 0.0  # dense verification forwards
    draft_lengths: list[int] = field(default_factory=list)  # k of every round

    @property
    def acceptance_rate(self) -> float:
        """Share of drafted tokens kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def alpha(self) -> float:
        """Chance that a checked draft is kept (drafts after a rejection are not checked):
        the per-token acceptance of the speculative-decoding papers."""
        checked = self.accepted + self.rejected
        return self.accepted / checked if checked else 0.0

    @property
    def mean_draft_length(self) -> float:
        return sum(self.draft_lengths) / len(self.draft_lengths) if self.draft_lengths else 0.0


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one round yields with k drafts when each draft is kept with probability alpha:
    1 + alpha + ... + alpha^k (the kept prefix plus the dense model's own token)."""
    return float(sum(alpha ** i for i in range(k + 1)))


class DraftLength:
    """Adaptive k: every round, the k in 0..k_max with the most expected tokens per second,
    tokens(alpha, k) / (k * t_draft + t_verify(k + 1)), from measurements of this run:
      alpha       kept / checked drafts, exponentially forgetting (decay per drafting round), prior 1/2
      t_draft     seconds of one sparse step (moving average)
      t_verify(T) seconds of a dense forward over T tokens (moving average per T; unmeasured
                  T: interpolated, flat beyond the measured range, so longer drafts get tried)
    k = 0 is plain dense decoding (timed once early on), chosen when drafting does not pay;
    then every `probe`-th round drafts one token anyway so alpha and t_draft stay current."""

    def __init__(self, k_start: int = 4, k_max: int = 8, decay: float = 0.9, probe: int = 16):
        self.k, self.k_max, self.decay, self.probe = k_start, k_max, decay, probe
        self.kept, self.checked = 1.0, 2.0
        self.t_draft: float | None = None
        self.t_verify: dict[int, float] = {}
        self.dense_rounds = 0

    def update(self, k: int, accepted: int, draft_s: float, verify_s: float):
        if k:  # dense rounds (k = 0) say nothing about the draft
            self.kept = self.decay * self.kept + accepted
            self.checked = self.decay * self.checked + accepted + (accepted < k)
            self.t_draft = _average(self.t_draft, draft_s / k)
        self.t_verify[k + 1] = _average(self.t_verify.get(k + 1), verify_s)
        self.k = self.best()
        self.dense_rounds = self.dense_rounds + 1 if self.k == 0 else 0
        if self.k == 0 and self.dense_rounds % self.probe == 0:
            self.k = 1

    @property
    def alpha(self) -> float:
        return self.kept / self.checked

    def verify_seconds(self, T: int) -> float:
        known = sorted(self.t_verify)
        return _interp(T, known, [self.t_verify[t] for t in known])

    def best(self) -> int:
        if self.t_draft is None:  # no draft measured yet
            return self.k
        if 1 not in self.t_verify:  # time one dense step once: the cost drafting has to beat
            return 0
        rate = {k: expected_tokens(self.alpha, k) / (k * self.t_draft + self.verify_seconds(k + 1))
                for k in range(self.k_max + 1)}
        return max(rate, key=rate.get)


def _average(old: float | None, new: float, weight: float = 0.3) -> float:
    return new if old is None else (1 - weight) * old + weight * new


def _interp(x: float, xs: list[int], ys: list[float]) -> float:
    """Piecewise-linear through (xs, ys), flat outside."""
    if x <= xs[0]:
        return ys[0]
    for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:]):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]


class SpeculativeDecoder:
    """Batch-1 lossless decoding over one dense KV cache. `draft` is the sparsity that makes the
    model its own draft (sparse.Gathered); draft_tokens: a fixed k, or None for DraftLength."""

    def __init__(self, model: Transformer, draft, prompt: list[int], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 draft_tokens: int | None = None, k_max: int = 8):
        if draft is None:
            raise DejavuError("lossless mode needs a sparse draft: pass sparsity= (e.g. sparse.Gathered), "
                              "or on the command line --predictors DIR")
        if draft_tokens is not None and draft_tokens < 1:
            raise DejavuError(f"draft_tokens must be at least 1 (or None to adapt), got {draft_tokens}")
        if len(prompt) + max_new_tokens > model.cfg.max_seq_len:
            raise DejavuError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                              f"model's context of {model.cfg.max_seq_len} tokens: shorten the prompt or ask for "
                              "fewer tokens")
        self.model, self.draft = model, draft
        self.temperature, self.top_p = temperature, top_p
        self.gen = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
        self.fixed_k = draft_tokens
        self.schedule = DraftLength(k_max=k_max) if draft_tokens is None else None
        self.cache = model.new_cache(1, len(prompt) + max_new_tokens)
        self.prompt = torch.tensor([prompt], device=model.device)
        self.pos = len(prompt)  # slot of `last`
        self.stats = LosslessStats()

    def restart(self, seed: int | None = None):
        """Back to the prompt (prefill next; the cache is rewritten as decoding goes), a fresh seed:
        many samples of one prompt without building the decoder again."""
        self.pos, self.stats = self.prompt.shape[1], LosslessStats()
        if seed is not None:
            self.gen = torch.Generator(device=self.model.device).manual_seed(seed)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return probabilities(logits, self.temperature, self.top_p)

    def pick(self, p: torch.Tensor) -> torch.Tensor:
        """One token from probabilities [V] (greedy: p is the logits, take the argmax)."""
        if self.temperature <= 0:
            return p.argmax(-1)
        return torch.multinomial(p, 1, generator=self.gen)[0]

    def prefill(self) -> torch.Tensor:
        logits = self.model(self.prompt, self.cache, 0)[0, -1]
        self.last = self.pick(self.dist(logits))
        return self.last

    def dist(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.temperature <= 0 else self.probs(logits)

    def round(self, budget: int) -> list[int]:
        """Draft, verify, accept: 1 .. k+1 new tokens (at most `budget`)."""
        k = min(self.fixed_k or self.schedule.k, budget - 1)
        kept, draft_s, verify_s = self.draft_and_verify(k)
        s = self.stats
        n = len(kept) - 1
        s.rounds, s.drafted, s.accepted, s.rejected = s.rounds + 1, s.drafted + k, s.accepted + n, s.rejected + (n < k)
        s.draft_seconds, s.verify_seconds = s.draft_seconds + draft_s, s.verify_seconds + verify_s
        s.draft_lengths.append(k)
        if self.schedule is not None:
            self.schedule.update(k, n, draft_s, verify_s)
        self.pos += len(kept)
        self.last = kept[-1]
        return [int(t) for t in kept]

    def draft_and_verify(self, k: int):
        """k sparse steps, one dense forward over k + 1 tokens -> (kept tokens, draft s, verify s)."""
        model, P = self.model, self.pos
        t0 = _clock(model)
        drafts, qs, tok = [], [], self.last
        for i in range(k):
            q = self.dist(model(tok.view(1, 1), self.cache, P + i, sparsity=self.draft)[0, -1])
            tok = self.pick(q)
            drafts.append(tok)
            qs.append(q)
        t1 = _clock(model)
        ps = self.dist(model(torch.stack([self.last, *drafts])[None], self.cache, P)[0])  # [k+1, V]
        t2 = _clock(model)
        return self.accept(drafts, qs, ps), t1 - t0, t2 - t1

    def accept(self, drafts, qs, ps) -> list[torch.Tensor]:
        """The kept drafts plus one token from the dense model (see the module docstring)."""
        kept = []
        for i, d in enumerate(drafts):
            if self.temperature <= 0:
                if d != ps[i].argmax():
                    return kept + [ps[i].argmax()]
            else:
                u = torch.rand((), generator=self.gen, device=d.device)
                if u * qs[i][d] > ps[i][d]:  # rejected with probability 1 - min(1, p/q)
                    residual = (ps[i] - qs[i]).clamp(min=0)
                    if residual.sum() <= 0:  # p == q to rounding: the draft could not be rejected
                        residual = ps[i]
                    return kept + [torch.multinomial(residual, 1, generator=self.gen)[0]]
            kept.append(d)
        return kept + [self.pick(ps[len(drafts)])]


class GraphSpeculativeDecoder(SpeculativeDecoder):
    """The same rounds on CUDA with graphs: a draft step is one replay of the sparse step (its pick
    on the device: the argmax, or a draw from q keyed by seed, round and position, with q kept
    for the acceptance), and the verification over k + 1 tokens is one replay of a dense graph
    per k, all captured up front. Between replays the host does nothing; it
    waits once per round, for the verification's answer."""

    def __init__(self, model: Transformer, draft, prompt: list[int], max_new_tokens: int,
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                 draft_tokens: int | None = None, k_max: int = 8):
        super().__init__(model, draft, prompt, max_new_tokens, temperature, top_p, seed, draft_tokens, k_max)
        from .engine import capture_graph, side_stream  # late: tests count captures through engine
        k_max = self.fixed_k or self.schedule.k_max
        dev, V = model.device, model.cfg.vocab_size
        self.tokens = torch.zeros(1, k_max + 1, dtype=torch.long, device=dev)  # last, d1 .. dk
        self.at = torch.zeros((), dtype=torch.long, device=dev)   # the draft step's slot
        self.i = torch.zeros((), dtype=torch.long, device=dev)    # the draft step's index in the round
        self.start = torch.zeros((), dtype=torch.long, device=dev)  # the round's first slot (of last)
        self.salt = torch.zeros(1, dtype=torch.long, device=dev)  # the draws' key: seed and round
        self.q = torch.zeros(k_max, V, device=dev)                # draft distributions (sampling)
        self.p = torch.zeros(k_max + 1, V, device=dev)            # dense distributions (sampling)
        self.argmax = torch.zeros(k_max + 1, dtype=torch.long, device=dev)  # dense picks (greedy)
        self.base_seed = seed if seed is not None else int(torch.randint(0, 2 ** 62, ()))
        side_stream(draft)
        # every graph a round can replay, before the prefill (which rewrites the slots their warm-ups
        # wrote) and off the clock: the draft step, and the verification of T = 1 .. k_max + 1 tokens
        self.draft_graph = capture_graph(self.draft_step)
        self.verify_graphs = {T: capture_graph(lambda T=T: self.verify(T)) for T in range(1, k_max + 2)}

    def restart(self, seed: int | None = None):
        super().restart(seed)
        if seed is not None:
            self.base_seed = seed

    def draft_step(self):
        tok = self.tokens.gather(1, self.i.view(1, 1))
        logits = self.model(tok, self.cache, self.at, sparsity=self.draft)[:, -1]
        if self.temperature > 0:
            q = probabilities(logits, self.temperature, self.top_p)
            self.q.index_copy_(0, self.i.view(1), q)
            nxt = (q / -torch.log(uniform_hash(self.salt, self.at.view(1), q.shape[-1]))).argmax(-1)
        else:
            nxt = logits.argmax(-1)
        self.i += 1
        self.at += 1
        self.tokens.index_copy_(1, self.i.view(1), nxt.view(1, 1))

    def verify(self, T: int):
        logits = self.model(self.tokens[:, :T], self.cache, self.start)[0]
        if self.temperature > 0:
            self.p[:T] = probabilities(logits, self.temperature, self.top_p)
        else:
            self.argmax[:T] = logits.argmax(-1)

    def prefill(self) -> torch.Tensor:
        super().prefill()
        self.tokens[0, 0] = self.last
        return self.last

    def draft_and_verify(self, k: int):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        self.start.fill_(self.pos)
        self.at.fill_(self.pos)
        self.i.zero_()
        self.salt.fill_((self.base_seed * 1_000_003 + self.stats.rounds) % 2 ** 62)
        events[0].record()
        for _ in range(k):
            self.draft_graph.replay()
        events[1].record()
        self.verify_graphs[k + 1].replay()
        events[2].record()
        if self.temperature > 0:
            kept = torch.stack(self.accept(list(self.tokens[0, 1:k + 1]), list(self.q[:k]), self.p[:k + 1])).tolist()
        else:  # the one wait of the round
            both = torch.cat((self.tokens[0, 1:k + 1], self.argmax[:k + 1])).tolist()
            drafts, dense = both[:k], both[k:]
            n = next((i for i, (d, a) in enumerate(zip(drafts, dense)) if d != a), k)
            kept = drafts[:n] + [dense[n]]
        self.tokens[0, 0] = kept[-1]  # the next round's `last`
        return kept, events[0].elapsed_time(events[1]) / 1e3, events[1].elapsed_time(events[2]) / 1e3


def _clock(model) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter()


@torch.inference_mode()
def generate_lossless(model: Transformer, prompts: list[list[int]], max_new_tokens: int, draft,
                      temperature: float = 0.0, top_p: float = 1.0, eos_id: int | list[int] | None = None,
                      seed: int | None = None, stats: GenerationStats | None = None,
                      draft_tokens: int | None = None):
    """generate()'s lossless mode: yields the next token [1] per step, as generate() does.
    stats.lossless gets the acceptance counts."""
    if len(prompts) != 1:
        raise DejavuError(f"lossless mode decodes one prompt at a time (batch 1), got {len(prompts)} prompts: "
                          "run them one after another, or drop --lossless")
    if not prompts[0]:
        raise DejavuError("every prompt needs at least one token: give some text")
    cls = GraphSpeculativeDecoder if model.device.type == "cuda" else SpeculativeDecoder
    dec = cls(model, draft, prompts[0], max_new_tokens, temperature, top_p, seed, draft_tokens)
    stops = set(stop_list(eos_id))
    stats = stats if stats is not None else GenerationStats()
    stats.batch, stats.prompt_tokens, stats.lossless = 1, len(prompts[0]), dec.stats
    t = time.perf_counter()
    tokens = [int(dec.prefill())]
    stats.prefill_seconds = time.perf_counter() - t
    while True:
        for tok in tokens:
            stats.new_tokens += 1
            yield torch.tensor([tok], device=model.device)
            if tok in stops or stats.new_tokens == max_new_tokens:
                return
        t = time.perf_counter()
        tokens = dec.round(max_new_tokens - stats.new_tokens)
        stats.decode_seconds += time.perf_counter() - t
        stats.decode_steps += len(tokens)
