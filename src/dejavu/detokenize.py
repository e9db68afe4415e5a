"""Streaming text out of a growing list of token ids (dejavu generate and dejavu serve)."""
from __future__ import annotations


class Detokenizer:
    """Text of a growing token list, decoded a small window at a time (as vLLM and TGI do): decode
    the tokens since `prefix` with and without the newest ones and keep the new suffix; text that
    ends in U+FFFD (a character cut between tokens) waits for the next token."""

    def __init__(self, tok, skip: frozenset[int]):
        self.tok, self.skip = tok, skip
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def add(self, token: int):
        if token not in self.skip:
            self.ids.append(token)
        self.flush(final=False)

    def flush(self, final: bool = True):
        """Takes in the text the tokens since `read` make; `final`: even a cut character."""
        before, now = self.decode(self.ids[self.prefix:self.read]), self.decode(self.ids[self.prefix:])
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.text += now[len(before):]
            self.prefix, self.read = self.read, len(self.ids)
