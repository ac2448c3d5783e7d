"""Text out of tokens as they come: incremental detokenisation and stop sequences.

A token is not a piece of text. Byte-level tokenizers split one UTF-8 character over several
tokens, and SentencePiece-style decoders render a token differently at the start of a sequence
(the leading space). So text is never decoded token by token: each step decodes a short window of
recent tokens (starting at the last point where the text ended on a whole character) and emits the
characters of it not yet emitted, up to a trailing U+FFFD that may still become a character.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT_CHAR = "\ufffd"  # what a decoder writes for bytes that are not (yet) a whole character
PROMPT_CONTEXT_TOKENS = 4  # prompt tokens kept in the window so the first piece renders in context


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text deltas that are always whole characters.

    `"".join(deltas) + flush()` equals decoding the generated tokens after the prompt's context.

    Args:
        tokenizer: a transformers tokenizer (a fast one is decoded through its Rust backend).
        prompt_ids: the prompt; its last few tokens give the first generated tokens their context.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        # a fast tokenizer's Rust backend decodes without transformers' Python layers (~5x faster
        # per call, and a call runs twice per token per stream)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        # the decoding window starts at token `prefix`; tokens before `read` are fully emitted;
        # `emitted` counts the characters of the window's text already handed out
        self.prefix = 0
        self.read = len(self.ids)
        self.emitted = len(self._decode(self.prefix, self.read))

    def add(self, token_id: int) -> str:
        """Append one token; return the new whole characters (often "", never a partial one)."""
        self.ids.append(token_id)
        text = self._decode(self.prefix, len(self.ids))
        complete = text.rstrip(REPLACEMENT_CHAR)  # a trailing U+FFFD may be a character in the making
        delta = complete[self.emitted:]
        self.emitted += len(delta)
        if complete == text:  # ends on a whole character: the window moves on
            self.prefix, self.read = self.read, len(self.ids)
            self.emitted = len(self._decode(self.prefix, self.read))
        return delta

    def flush(self) -> str:
        """At the end of the stream: whatever is left, incomplete characters rendered as U+FFFD."""
        delta = self._decode(self.prefix, len(self.ids))[self.emitted:]
        self.prefix = self.read = len(self.ids)
        self.emitted = 0
        return delta

    def _decode(self, start: int, end: int) -> str:
        if start >= end:
            return ""
        if self.backend is not None:
            return self.backend.decode(self.ids[start:end], skip_special_tokens=True)
        return self.tokenizer.decode(
            self.ids[start:end], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


class StopMatcher:
    """Cuts the text at the first stop sequence, holding back any tail that might begin one.

    Args:
        stop: the stop sequences; with none, text passes through unchanged.
    """

    def __init__(self, stop: Sequence[str]):
        self.stop = tuple(stop)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop sequence was reached)."""
        if not self.stop:
            return text, False
        buffer = self.pending + text
        hits = [index for index in (buffer.find(s) for s in self.stop) if index >= 0]
        if hits:
            self.pending = ""
            return buffer[: min(hits)], True
        held = self._longest_stop_prefix_at_end(buffer)
        self.pending = buffer[len(buffer) - held:]
        return buffer[: len(buffer) - held], False

    def flush(self) -> str:
        """The held-back tail, once the stream ends for another reason."""
        text, self.pending = self.pending, ""
        return text

    def _longest_stop_prefix_at_end(self, text: str) -> int:
        longest = 0
        for stop in self.stop:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest
