"""server/tokenizer.py: chat template, incremental detokenizing of multi-byte text, stop-string holding back."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
from tiny_tokenizer import tiny_tokenizer

from server.schema import Message
from server.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, StopStringMatcher, Tokenizer

MIXED_TEXT = "héllo wörld 你好 🎉 the end, 🇫🇷 ok"
SMOLLM2_DIR = (
    Path(os.environ.get("KAIROS_CACHE_DIR", Path.home() / ".cache" / "kairos")) / "smollm2-135m-instruct"
)


def detokenize(tokenizer: Tokenizer, prompt: str, output_ids: list[int], piece_sizes: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer.decode, tokenizer.encode(prompt))
    pieces, i = [], 0
    for size in piece_sizes:
        pieces.append(detok.add(output_ids[i : i + size]))
        i += size
    pieces.append(detok.add(output_ids[i:]))
    pieces.append(detok.flush())
    return pieces


# ---- chat template and encoding ----------------------------------------------------------------------


def test_encode_chat_applies_template_with_generation_prompt():
    tok = tiny_tokenizer()
    ids = tok.encode_chat((Message("system", "be brief"), Message("user", "hi")))
    assert isinstance(ids, list) and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == "<system>be brief<user>hi<assistant>"  # <eos> is special: skipped


def test_encode_and_vocab():
    tok = tiny_tokenizer()
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.eos_token_id == 0
    assert tok.vocab_size >= 257


# ---- incremental detokenizer -------------------------------------------------------------------------


def test_multibyte_text_one_token_at_a_time_matches_full_decode():
    tok = tiny_tokenizer()
    ids = tok.encode(MIXED_TEXT)
    assert len(ids) > len(MIXED_TEXT.split())  # really split into byte tokens
    pieces = detokenize(tok, "hello", ids, [1] * len(ids))
    assert "".join(pieces) == MIXED_TEXT
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


@pytest.mark.parametrize("seed", range(5))
def test_random_piece_sizes_give_the_same_text(seed):
    tok = tiny_tokenizer()
    ids = tok.encode(MIXED_TEXT)
    rng = random.Random(seed)
    sizes = [rng.randint(0, 3) for _ in range(len(ids))]
    pieces = detokenize(tok, "the", ids, sizes)
    assert "".join(pieces) == MIXED_TEXT
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


def test_emoji_bytes_wait_until_the_character_is_whole():
    tok = tiny_tokenizer()
    ids = tok.encode("🎉")
    assert len(ids) == 4
    detok = IncrementalDetokenizer(tok.decode, [])
    assert [detok.add([i]) for i in ids] == ["", "", "", "🎉"]


def test_leading_space_after_prompt_is_kept():
    tok = tiny_tokenizer()
    pieces = detokenize(tok, "hello", tok.encode(" world"), [])
    assert "".join(pieces) == " world"


def test_special_tokens_are_skipped():
    tok = tiny_tokenizer()
    ids = tok.encode("the end") + [tok.eos_token_id]
    assert "".join(detokenize(tok, "x", ids, [1] * len(ids))) == "the end"


def test_flush_emits_an_incomplete_character_at_the_end():
    tok = tiny_tokenizer()
    ids = tok.encode("ok🎉")[:-1]  # cut inside the emoji
    pieces = detokenize(tok, "", ids, [1] * len(ids))
    assert "".join(pieces[:-1]) == "ok"
    assert pieces[-1].startswith(REPLACEMENT_CHAR)


@pytest.mark.skipif(not (SMOLLM2_DIR / "tokenizer.json").exists(), reason="SmolLM2 not prepared")
def test_smollm2_tokenizer_multibyte_round_trip():
    tok = Tokenizer.load(SMOLLM2_DIR)
    prompt_ids = tok.encode_chat((Message("user", "Say hi"),))
    ids = tok.encode(MIXED_TEXT)
    detok = IncrementalDetokenizer(tok.decode, prompt_ids)
    pieces = [detok.add([i]) for i in ids] + [detok.flush()]
    assert "".join(pieces) == MIXED_TEXT
    assert not any(REPLACEMENT_CHAR in p for p in pieces)


# ---- stop strings ------------------------------------------------------------------------------------


def feed_all(matcher: StopStringMatcher, pieces: list[str]) -> list[str]:
    return [matcher.feed(p) for p in pieces]


def test_no_stop_strings_pass_text_through():
    matcher = StopStringMatcher([])
    assert feed_all(matcher, ["a", "b"]) == ["a", "b"]
    assert matcher.flush() == "" and not matcher.is_stopped


def test_stop_string_is_cut_and_not_emitted():
    matcher = StopStringMatcher(["END"])
    out = feed_all(matcher, list("Hello END world"))
    assert "".join(out) == "Hello "
    assert matcher.matched == "END"
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_a_possible_stop_prefix_is_held_back_then_released():
    matcher = StopStringMatcher(["END"])
    assert matcher.feed("foo E") == "foo "  # "E" might start "END"
    assert matcher.feed("N") == ""  # "EN" still might
    assert matcher.feed("D!") == ""  # it was: nothing of it is emitted
    assert matcher.is_stopped
    other = StopStringMatcher(["END"])
    assert other.feed("foo EN") == "foo "
    assert other.feed("d") == "ENd"  # not a stop after all
    assert other.feed("xE") == "x"
    assert other.flush() == "E"  # generation ended: the held tail is plain text


def test_stop_spanning_pieces_and_the_first_completed_wins():
    matcher = StopStringMatcher(["world", "lo w"])
    assert "".join(feed_all(matcher, ["hel", "lo", " wor", "ld"])) == "hel"
    assert matcher.matched == "lo w"
    matcher = StopStringMatcher(["hello world", "lo"])
    assert "".join(feed_all(matcher, ["hel", "lo world"])) == "hel"  # "lo" completes before "hello world"
    assert matcher.matched == "lo"


def test_stop_at_the_very_start():
    matcher = StopStringMatcher(["\n\n"])
    assert feed_all(matcher, ["\n", "\nabc"]) == ["", ""]
    assert matcher.is_stopped


@pytest.mark.parametrize("seed", range(200))
def test_stop_matching_equals_cutting_the_full_text(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
    stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
    # Generation stops as soon as a stop string is complete: the one that ends first decides the cut.
    cut = min(((i + len(s), i) for s in stops if (i := text.find(s)) >= 0), default=(0, len(text)))[1]
    matcher = StopStringMatcher(stops)
    emitted, i = "", 0
    while i < len(text):
        size = rng.randint(1, 4)
        emitted += matcher.feed(text[i : i + size])
        i += size
        assert text[:cut].startswith(emitted)  # never more than the answer, never part of a stop string
    emitted += matcher.flush()
    assert emitted == text[:cut]
    assert matcher.is_stopped == (cut < len(text))


# ---- OutputText: both together -----------------------------------------------------------------------


def test_output_text_stops_on_a_stop_string_across_tokens():
    tok = tiny_tokenizer()
    ids = tok.encode("hello world stop here and more")
    output = tok.output_text(tok.encode("x"), ["stop here"])
    pieces = []
    for i in ids:
        pieces.append(output.add([i]))
        if output.is_stopped:
            break
    assert "".join(pieces) == "hello world "
    assert output.stop_string == "stop here"
    assert output.num_tokens < len(ids)
    assert output.finish() == ""


def test_output_text_finish_releases_held_text():
    tok = tiny_tokenizer()
    output = tok.output_text([], ["the end"])
    text = "".join(output.add([i]) for i in tok.encode("to the"))
    assert text == "to "
    assert output.finish() == "the"
    assert output.num_tokens == len(tok.encode("to the"))
