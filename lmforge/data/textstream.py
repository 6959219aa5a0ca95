"""Token ids -> text deltas for streaming, with stop strings.

Stop strings are matched on text, not tokens (a stop string can span tokens, a token can hold a stop
string plus more): text that could still be the start of a stop string is held back until it cannot.
"""

from __future__ import annotations

from collections.abc import Sequence

from lmforge.data.tokenizer import IncrementalDetokenizer, Tokenizer


class TextStream:
    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        *,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._detok = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=skip_special_tokens, prompt_ids=prompt_ids
        )
        self._stop = tuple(stop)
        self._pending = ""  # decoded text not yet emitted: it may be the start of a stop string
        self.text = ""  # everything emitted so far
        self.stopped = False  # a stop string was found; its text and everything after are dropped

    def add(self, token_id: int) -> str:
        """Feed one generated token; return the text that is now safe to show."""
        if self.stopped:
            return ""
        return self._emit(self._pending + self._detok.add(token_id), final=False)

    def flush(self) -> str:
        """End of generation: release what was held back."""
        if self.stopped:
            return ""
        return self._emit(self._pending + self._detok.flush(), final=True)

    def _emit(self, text: str, final: bool) -> str:
        self._pending = ""
        hits = [i for i in (text.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            out = text[: min(hits)]
        elif final:
            out = text
        else:
            hold = _partial_stop_suffix(text, self._stop)
            out, self._pending = text[: len(text) - hold], text[len(text) - hold :]
        self.text += out
        return out


def _partial_stop_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
