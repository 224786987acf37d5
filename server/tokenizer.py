"""Text <-> token ids for the server: chat template, prompt encoding, incremental detokenizing, stop strings.

The engine sees token ids only. Output text is built per request by `OutputText`: an `IncrementalDetokenizer`
(vLLM's prefix/read offsets, so a character split over several tokens is emitted once it is whole) feeding a
`StopStringMatcher` (holds back any tail that could begin a stop string; never emits part of one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.schema import Message

# vLLM INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET: decode output after a few prompt tokens so that a leading
# space (SentencePiece "▁") or a merge with the prompt comes out as it would in the full text.
PROMPT_CONTEXT_TOKENS = 5
REPLACEMENT_CHAR = "\ufffd"

Decode = Callable[[list[int]], str]


class Tokenizer:
    """A Hugging Face tokenizer behind the few calls the server makes."""

    def __init__(self, hf_tokenizer: Any):
        self._hf = hf_tokenizer
        self.vocab_size = len(hf_tokenizer)  # includes added tokens, unlike .vocab_size
        self.eos_token_id: int | None = hf_tokenizer.eos_token_id
        self.max_chars_per_token = max_chars_per_token(hf_tokenizer)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer  # slow import (~1.5 s); never at module import time

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        """Raises jinja2 TemplateError (a 400 for the app) when the template rejects the conversation."""
        dicts = [m.to_template_dict() for m in messages]
        out = self._hf.apply_chat_template(dicts, add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding (a dict); older versions a plain list.
        return list(out["input_ids"] if hasattr(out, "keys") else out)

    def encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text))  # add_special_tokens as the model's tokenizer config says (vLLM)

    def decode(self, token_ids: list[int]) -> str:
        return self._hf.decode(token_ids, skip_special_tokens=True)

    def output_text(self, prompt_token_ids: Sequence[int], stop: Sequence[str]) -> OutputText:
        return OutputText(IncrementalDetokenizer(self.decode, prompt_token_ids), StopStringMatcher(stop))


def max_chars_per_token(hf_tokenizer: Any) -> int:
    """The most characters of text one token can stand for, or 0 when that is not known. A text longer than
    max_model_len × this has more tokens than the context holds, which the server can tell without tokenizing it
    (seconds for megabytes). Known for byte-level BPE with no normalizer (SmolLM2, Llama 3, Qwen2, GPT-2): every
    text character is at least one byte symbol of a token's string, so the vocabulary's longest entry bounds it.
    A normalizer or a splitting rule that removes characters breaks that, so those get 0 (no bound)."""
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return 0
    pre_tokenizer = repr(backend.pre_tokenizer)
    if "ByteLevel" not in pre_tokenizer or "Removed" in pre_tokenizer:
        return 0
    return max(map(len, hf_tokenizer.get_vocab()), default=0)


class IncrementalDetokenizer:
    """vLLM's detokenize_incrementally: text = decode(ids[prefix:]) minus decode(ids[prefix:read]).

        ids:  [ p p p p p | o o o o o o ]      p = the prompt's last tokens, o = output tokens
                ^prefix_offset      ^read_offset   (both move forward after each emitted piece)

    A piece is emitted only when the new text is longer than the prefix text and does not end in U+FFFD,
    i.e. when no multi-byte character is left half-decoded.
    """

    def __init__(self, decode: Decode, prompt_token_ids: Sequence[int]):
        self._decode = decode
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_ids: Sequence[int]) -> str:
        """New text made whole by these tokens ("" while a character is still incomplete)."""
        self._ids.extend(token_ids)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT_CHAR):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end: whatever is still unread, even an incomplete character (as U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


class StopStringMatcher:
    """Cuts the output at the first stop string (not included, as vLLM's default).

    Invariant: the emitted text never contains a stop string nor ends with a proper prefix of one; such a
    tail is held in `_pending` until the next piece decides it. So a match always starts inside `_pending`.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(s for s in stops if s)
        self.matched: str | None = None
        self._pending = ""

    @property
    def is_stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> str:
        if self.is_stopped:
            return ""
        if not self.stops:
            return text
        pending = self._pending + text
        # Generation stops when a stop string is complete, so the one that ends first wins (then the longer).
        hit = min(((i + len(s), i, s) for s in self.stops if (i := pending.find(s)) >= 0), default=None)
        if hit is not None:
            _, index, self.matched = hit
            self._pending = ""
            return pending[:index]
        hold = self._held_length(pending)
        self._pending = pending[len(pending) - hold :]
        return pending[: len(pending) - hold]

    def flush(self) -> str:
        """At the end of generation with no match: the held tail was not a stop string after all."""
        out, self._pending = self._pending, ""
        return "" if self.is_stopped else out

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best


class OutputText:
    """One request's output: token ids in, safe text pieces out."""

    def __init__(self, detokenizer: IncrementalDetokenizer, matcher: StopStringMatcher):
        self._detokenizer = detokenizer
        self._matcher = matcher
        self.num_tokens = 0

    @property
    def is_stopped(self) -> bool:
        """A stop string was found: the caller ends the request (finish_reason "stop") and aborts the engine."""
        return self._matcher.is_stopped

    @property
    def stop_string(self) -> str | None:
        return self._matcher.matched

    def add(self, token_ids: Sequence[int]) -> str:
        if self.is_stopped:
            return ""
        self.num_tokens += len(token_ids)
        return self._matcher.feed(self._detokenizer.add(token_ids))

    def finish(self) -> str:
        """The rest of the text once the engine has finished the request."""
        if self.is_stopped:
            return ""
        text = self._matcher.feed(self._detokenizer.flush())
        return text + self._matcher.flush()
