"""Incremental detokenisation never emits a partial character, and its pieces add up to the text;
stop sequences cut the text at their first occurrence, even across tokens."""

import random

import pytest

from xatl.serving.text import REPLACEMENT_CHAR, IncrementalDetokenizer, StopMatcher

MULTI_BYTE = "Héllo wörld 日本語のテキスト 🙂🚀✨ naïve café"


def stream(tokenizer, ids, prompt_ids=()):
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    deltas = [detokenizer.add(t) for t in ids]
    return deltas, detokenizer.flush()


def test_multi_byte_characters_split_over_tokens_come_out_whole(tokenizer):
    ids = tokenizer(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    pieces = [tokenizer.decode([t]) for t in ids]
    assert any(REPLACEMENT_CHAR in p for p in pieces), "the tokenizer should split some character over tokens"
    deltas, rest = stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert rest == ""
    assert "".join(deltas) == MULTI_BYTE
    assert "" in deltas  # some tokens had to wait for the rest of their character


def test_each_delta_is_valid_utf8_and_emitted_as_soon_as_complete(tokenizer):
    ids = tokenizer(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    deltas, _ = stream(tokenizer, ids)
    emitted = ""
    for i, delta in enumerate(deltas):
        delta.encode("utf-8", errors="strict")
        emitted += delta
        # everything decodable from the tokens so far, up to the last whole character, is out
        text_so_far = tokenizer.decode(ids[: i + 1])
        assert text_so_far.rstrip(REPLACEMENT_CHAR) == emitted


def test_random_tokens_add_up_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(3, len(tokenizer)) for _ in range(rng.randrange(1, 30))]
        deltas, rest = stream(tokenizer, ids)
        assert "".join(deltas) + rest == tokenizer.decode(ids)
        # only the final flush may render bytes that never became a character
        assert all(not d.endswith(REPLACEMENT_CHAR) for d in deltas)


def test_prompt_context_does_not_leak_into_the_output(tokenizer):
    prompt = tokenizer("Once upon a time")["input_ids"]
    ids = tokenizer(" there was 日本", add_special_tokens=False)["input_ids"]
    deltas, rest = stream(tokenizer, ids, prompt_ids=prompt)
    assert "".join(deltas) + rest == " there was 日本"


def test_special_tokens_add_no_text(tokenizer):
    ids = tokenizer("café", add_special_tokens=False)["input_ids"]
    deltas, rest = stream(tokenizer, [*ids, tokenizer.eos_token_id])
    assert "".join(deltas) + rest == "café"


@pytest.mark.parametrize(
    "pieces,stop,expected,hit",
    [
        (["Hello", " wor", "ld"], ["world"], "Hello ", True),
        (["a\n", "\nb"], ["\n\n"], "a", True),
        (["ab", "c"], ["x"], "abc", False),
        (["ab", "c"], ["bcd"], "a", False),  # "bc" held back: it may still become "bcd"
        (["stop", "here"], ["here", "ph"], "sto", True),  # the earliest occurrence wins
    ],
)
def test_stop_matcher(pieces, stop, expected, hit):
    matcher = StopMatcher(stop)
    out, reached = "", False
    for piece in pieces:
        text, reached = matcher.feed(piece)
        out += text
        if reached:
            break
    assert (out, reached) == (expected, hit)


def test_stop_matcher_releases_held_text_when_it_cannot_match():
    matcher = StopMatcher(["abc"])
    assert matcher.feed("xab") == ("x", False)
    assert matcher.feed("d") == ("abd", False)
    assert matcher.feed("ab") == ("", False)
    assert matcher.flush() == "ab"


class PythonOnlyTokenizer:
    """A tokenizer without a Rust backend: only `decode`, as a slow tokenizer has it."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode


def test_tokenizers_without_a_backend_give_the_same_pieces(tokenizer):
    ids = tokenizer(MULTI_BYTE, add_special_tokens=False)["input_ids"]
    assert stream(PythonOnlyTokenizer(tokenizer), ids) == stream(tokenizer, ids)
