"""Tokenizers the engine can use, and incremental detokenization with stop strings.

``SimTokenizer`` is the sim executor's: one token per whitespace-separated word, so a trace's token counts
can be replayed exactly with prompts of that many words. Its output vocabulary is placeholder text that
says it is simulated.
"""

from __future__ import annotations

import zlib
from typing import Protocol, Sequence


class Tokenizer(Protocol):
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


_PLACEHOLDER = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut "
                "labore et dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris "
                "nisi aliquip ex ea commodo consequat duis aute irure in reprehenderit voluptate velit esse "
                "cillum fugiat nulla pariatur excepteur sint occaecat cupidatat non proident sunt culpa qui "
                "officia deserunt mollit anim id est laborum").split()


class SimTokenizer:
    EOS = 0
    MARKER = 1          # the first token of every simulated answer: "[simulated]"

    def __init__(self, vocab_size: int = 32000) -> None:
        self.vocab_size = vocab_size
        self.eos_token_id = self.EOS

    def encode(self, text: str) -> list[int]:
        return [2 + zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.split()]

    def token_text(self, token_id: int) -> str:
        if token_id == self.EOS:
            return ""
        if token_id == self.MARKER:
            return "[simulated]"
        return " " + _PLACEHOLDER[token_id % len(_PLACEHOLDER)]

    def decode(self, token_ids: Sequence[int]) -> str:
        return "".join(self.token_text(t) for t in token_ids)

    def placeholder_token(self, seed: int, position: int) -> int:
        """Deterministic output token at ``position`` of an answer seeded by ``seed``."""
        if position == 0:
            return self.MARKER
        return 2 + (seed * 1_000_003 + position * 7_919) % (self.vocab_size - 2)


class Detokenizer:
    """Turns a request's growing output ids into new text, and finds stop strings.

    Decodes only a short window: the tokens since the last clean emission (``prefix`` .. ``read``) and
    everything after. Text that ends in U+FFFD (a character split across tokens) waits for the next token;
    ``flush`` emits what is left when the request ends. A few prompt tokens seed the window so tokenizers that
    drop a leading space at the start of a decode still produce it.
    """

    CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (), prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self._context = list(prompt_ids[-self.CONTEXT:])
        self._prefix = 0                      # offsets into context + output ids
        self._read = len(self._context)

    def add(self, output_ids: Sequence[int]) -> tuple[str, bool]:
        """New text since the last call and whether a stop string ended the answer (text cut before it)."""
        n_ctx = len(self._context)
        # the window: context + output ids from absolute offset self._prefix on
        if self._prefix < n_ctx:
            ids = self._context[self._prefix:] + list(output_ids)
        else:
            ids = list(output_ids[self._prefix - n_ctx:])
        prefix = self.tokenizer.decode(ids[:self._read - self._prefix])
        full = self.tokenizer.decode(ids)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return "", False
        self._prefix, self._read = self._read, self._prefix + len(ids)
        return self._emit(full[len(prefix):])

    def flush(self, output_ids: Sequence[int]) -> str:
        """What is still held back when the answer ends (the whole decode minus what was emitted)."""
        full = self.tokenizer.decode(list(output_ids))
        if full.startswith(self.text) and len(full) > len(self.text):
            rest = full[len(self.text):]
            self.text = full
            return rest
        return ""

    def _emit(self, new: str) -> tuple[str, bool]:
        if self.stop:
            combined = self.text + new
            start = max(0, len(self.text) - max(map(len, self.stop)))
            hits = [i for i in (combined.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                new = combined[len(self.text):cut] if cut >= len(self.text) else ""
                self.text = combined[:cut]
                return new, True
        self.text += new
        return new, False
