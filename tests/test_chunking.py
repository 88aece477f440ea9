"""Chunking: budgets, order, coverage of the text, overlap, cuts at the coarsest boundary, and the
same chunks as the reference implementation (tests/reference_chunking.py) on generated text."""

from __future__ import annotations

import dataclasses
import json
import string
import sys
from collections.abc import Sequence
from importlib import resources
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import reference_chunking as reference
from worker.chunking import Chunk, chunk_text, estimate_tokens


def squeeze(text: str) -> str:
    """The text without any whitespace."""
    return "".join(text.split())


def assert_well_formed(text: str, chunks: list[Chunk], max_tokens: int) -> None:
    """Each chunk is a non-empty, trimmed slice of the text within budget, in order."""
    for chunk in chunks:
        assert chunk.text
        assert chunk.text == chunk.text.strip()
        assert text[chunk.start : chunk.end] == chunk.text
        assert chunk.tokens == estimate_tokens(chunk.text) <= max_tokens
    assert all(a.start < b.start and a.end < b.end for a, b in pairwise(chunks))


def test_blank_text_gives_no_chunks() -> None:
    assert chunk_text("") == []
    assert chunk_text(" \n\t\n  ") == []


def test_short_text_is_one_trimmed_chunk() -> None:
    chunks = chunk_text("  Hello, world.\n")
    assert [(chunk.text, chunk.start, chunk.end) for chunk in chunks] == [("Hello, world.", 2, 15)]


def test_estimate_is_conservative_for_english_and_counts_bytes_elsewhere() -> None:
    # Real tokenizers give about one token per word for text like this.
    assert estimate_tokens("the cat sat on the mat") == 6
    assert estimate_tokens("internationalization") == 7
    assert estimate_tokens("1234567") == 4
    assert estimate_tokens("日本語") == 9
    assert estimate_tokens("a\n\nb") == 3
    assert estimate_tokens("   ") == 0


def test_paragraphs_that_fit_together_share_a_chunk_and_others_are_cut_at_blank_lines() -> None:
    paragraphs = ["First paragraph has words.", "Second one too.", "Third closes it."]
    text = "\n\n".join(paragraphs)
    budget = estimate_tokens(paragraphs[0]) + 1 + estimate_tokens(paragraphs[1])

    chunks = chunk_text(text, max_tokens=budget)

    assert [chunk.text for chunk in chunks] == [f"{paragraphs[0]}\n\n{paragraphs[1]}", paragraphs[2]]


def test_a_long_paragraph_is_cut_at_sentence_ends() -> None:
    sentences = ["One two three four.", "Five six seven eight!", "Nine ten eleven twelve?"]
    text = " ".join(sentences)

    chunks = chunk_text(text, max_tokens=max(estimate_tokens(sentence) for sentence in sentences))

    assert [chunk.text for chunk in chunks] == sentences


def test_a_long_sentence_is_cut_between_words() -> None:
    text = "alpha beta gamma delta epsilon zeta eta theta iota kappa"
    chunks = chunk_text(text, max_tokens=6)
    assert_well_formed(text, chunks, 6)
    assert len(chunks) > 1
    assert all(text[chunk.end : chunk.end + 1] in {"", " "} for chunk in chunks)
    assert " ".join(chunk.text for chunk in chunks) == text


def test_a_word_longer_than_the_budget_is_hard_split() -> None:
    word = "x" * 100
    chunks = chunk_text(f"start {word} end", max_tokens=5)
    assert_well_formed(f"start {word} end", chunks, 5)
    assert "".join(squeeze(chunk.text) for chunk in chunks) == f"start{word}end"
    assert max(len(chunk.text) for chunk in chunks) <= 15


def test_overlap_repeats_the_tail_of_the_previous_chunk_from_a_word_start() -> None:
    text = " ".join(f"w{number}" for number in range(40))
    chunks = chunk_text(text, max_tokens=12, overlap_tokens=4)

    assert_well_formed(text, chunks, 12)
    for previous, current in pairwise(chunks):
        assert current.start < previous.end, "chunks overlap"
        shared = text[current.start : previous.end]
        assert 0 < estimate_tokens(shared) <= 4
        assert previous.text.endswith(shared)
        assert text[current.start - 1] == " "


def test_overlap_never_makes_a_chunk_exceed_its_budget() -> None:
    text = "short words here. " + "y" * 30 + " more words after"
    chunks = chunk_text(text, max_tokens=10, overlap_tokens=8)
    assert_well_formed(text, chunks, 10)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(3, 0), (10, 10), (10, -1)])
def test_impossible_budgets_are_refused(max_tokens: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="tokens"):
        chunk_text("text", max_tokens=max_tokens, overlap_tokens=overlap)


def test_text_without_spaces_is_cut_at_ideographic_sentence_ends() -> None:
    text = "今日は晴れ。明日は雨。"
    chunks = chunk_text(text, max_tokens=estimate_tokens("今日は晴れ。"))
    assert [chunk.text for chunk in chunks] == ["今日は晴れ。", "明日は雨。"]


TEXT = st.text(
    alphabet=st.sampled_from([*"abcXYZ 019.,!?\n\t\"')", "é", "日", "😀", "\u00a0", "\r", "。"]),
    max_size=400,
)


@settings(max_examples=300, deadline=None)
@given(text=TEXT, max_tokens=st.integers(min_value=4, max_value=60))
def test_chunks_cover_the_text_in_order_within_budget(text: str, max_tokens: int) -> None:
    chunks = chunk_text(text, max_tokens=max_tokens)
    assert_well_formed(text, chunks, max_tokens)
    assert "".join(squeeze(chunk.text) for chunk in chunks) == squeeze(text)
    assert all(not text[a.end : b.start].strip() for a, b in pairwise(chunks))


@settings(max_examples=300, deadline=None)
@given(text=TEXT, max_tokens=st.integers(min_value=4, max_value=60), data=st.data())
def test_overlapping_chunks_still_cover_every_character(text: str, max_tokens: int, data: st.DataObject) -> None:
    overlap = data.draw(st.integers(min_value=0, max_value=max_tokens - 1))
    chunks = chunk_text(text, max_tokens=max_tokens, overlap_tokens=overlap)
    assert_well_formed(text, chunks, max_tokens)
    covered = [False] * len(text)
    for chunk in chunks:
        covered[chunk.start : chunk.end] = [True] * (chunk.end - chunk.start)
    assert all(covered[index] or char.isspace() for index, char in enumerate(text))
    assert all(b.start <= a.end or not text[a.end : b.start].strip() for a, b in pairwise(chunks))


# The fast chunker against the reference (the implementation it replaced): same chunks, same
# offsets, same token counts, on generated text of every shape the chunker distinguishes.

# Words of every length class (a token's three letters and more), and numbers; drawn from a list
# mostly, which keeps generating large texts quick.
WORDS = st.one_of(
    st.sampled_from(["a", "an", "the", "of", "Budget", "QA", "cat", "shard", "rollback", "organisation", "e", "xyz"]),
    st.text(alphabet=st.sampled_from(string.ascii_letters), min_size=1, max_size=12),
)
NUMBERS = st.integers(min_value=0, max_value=10**9).map(str)
PUNCTUATION = st.sampled_from(
    [*".!?\u2026,;:-\"')]}\u201d\u2019\u00bb([{/=+*#", "\u3002", "\uff01", "\uff1f", "...", '."']
)
# Runs of ASCII whitespace with and without line breaks and blank lines, and whitespace outside ASCII.
WHITESPACE = st.sampled_from(
    [" ", " ", " ", "  ", "\t", "\n", "\n\n", "\r\n", "\r\n\r\n", "\r", "\r\r", " \n \n ", "\n\n\n\n", "\n\r"]
)
WIDE_WHITESPACE = st.sampled_from(["\u00a0", "\u3000", "\u2028", "\u2029", "\x0b", "\x0c", "\x1c", "\x85", "\u202f"])
UNICODE = st.sampled_from(["\u00e9", "\u00df", "\u65e5\u672c\u8a9e", "\u4eca\u65e5\u306f\u6674\u308c", "\U0001f600"])
# Long runs: a word or number over the budget, a blob of symbols, unspaced script.
LONG = st.builds(
    lambda piece, times: piece * times,
    st.sampled_from(["x", "7", "=", "\u65e5", "ab1", "\U0001f680", " ", "\n"]),
    st.integers(min_value=10, max_value=400),
)
# Token soup: any mix of the above.
SOUP = st.lists(
    st.one_of(
        WORDS, WORDS, NUMBERS, PUNCTUATION, WHITESPACE, WHITESPACE, WIDE_WHITESPACE, UNICODE, st.text(max_size=4), LONG
    ),
    max_size=120,
).map("".join)
# Documents: sentences of words with their ends and closers, joined by spaces or line breaks into
# paragraphs, joined by blank lines; the shape whose cuts the chunker ranks.
SENTENCE = st.builds(
    lambda words, end, closer: " ".join(words) + end + closer,
    st.lists(st.one_of(WORDS, WORDS, WORDS, WORDS, NUMBERS, UNICODE, PUNCTUATION, LONG), min_size=1, max_size=8),
    st.sampled_from([".", ".", "!", "?", "\u2026", "\u3002", "\uff1f", ",", ""]),
    st.sampled_from(["", "", "", '"', "'", ")", "\u201d", "\u00bb", '")']),
)
PARAGRAPH = st.lists(
    st.tuples(SENTENCE, st.sampled_from([" ", " ", " ", "", "  ", "\n", " \n", "\r\n", "\t", "\u00a0"])),
    min_size=1,
    max_size=5,
).map(lambda parts: "".join(sentence + gap for sentence, gap in parts))
DOCUMENT = st.lists(
    st.tuples(PARAGRAPH, st.sampled_from(["\n\n", "\n\n", "\r\n\r\n", "\n \n", "\n\n\n", "\r\r", "\n\u3000\n"])),
    min_size=1,
    max_size=4,
).map(lambda parts: "".join(paragraph + gap for paragraph, gap in parts))
GENERATED = st.one_of(DOCUMENT, SOUP)
BUDGETS = st.one_of(st.integers(min_value=4, max_value=80), st.sampled_from([128, 512]))


def as_rows(chunks: Sequence[Chunk | reference.Chunk]) -> list[tuple[object, ...]]:
    """Every field of every chunk."""
    return [dataclasses.astuple(chunk) for chunk in chunks]


def assert_same_as_reference(text: str, max_tokens: int, overlap: int) -> None:
    """chunk_text gives exactly the reference's chunks for this text and budget."""
    expected = reference.chunk_text(text, max_tokens=max_tokens, overlap_tokens=overlap)
    assert as_rows(chunk_text(text, max_tokens=max_tokens, overlap_tokens=overlap)) == as_rows(expected)


def test_chunks_have_the_reference_fields() -> None:
    assert [field.name for field in dataclasses.fields(Chunk)] == [
        field.name for field in dataclasses.fields(reference.Chunk)
    ]


@settings(max_examples=400, deadline=None)
@given(text=GENERATED, max_tokens=BUDGETS, data=st.data())
def test_chunks_are_those_of_the_reference_implementation(text: str, max_tokens: int, data: st.DataObject) -> None:
    overlap = data.draw(st.one_of(st.just(0), st.integers(min_value=0, max_value=max_tokens - 1)))
    assert_same_as_reference(text, max_tokens, overlap)


@settings(max_examples=200, deadline=None)
@given(text=st.one_of(GENERATED, st.text()))
def test_estimate_is_that_of_the_reference_implementation(text: str) -> None:
    assert estimate_tokens(text) == reference.estimate_tokens(text)


def test_every_unicode_whitespace_is_estimated_and_cut_as_by_the_reference() -> None:
    spaces = [char for char in map(chr, range(sys.maxunicode + 1)) if char.isspace()]
    for space in spaces:
        text = f"One two.{space}Three{space}\n{space}four{space}{space}five. Six"
        assert estimate_tokens(text) == reference.estimate_tokens(text), repr(space)
        for max_tokens, overlap in [(4, 0), (5, 3), (9, 6)]:
            assert_same_as_reference(text, max_tokens, overlap)


@pytest.mark.parametrize(("max_tokens", "overlap"), [(512, 0), (512, 64), (512, 511), (100, 0), (100, 30), (8, 7)])
def test_sample_shards_give_the_reference_chunks(max_tokens: int, overlap: int) -> None:
    sample = resources.files("embedding_jobs") / "sample" / "shards.jsonl"
    texts = [json.loads(line)["text"] for line in sample.read_text(encoding="utf-8").splitlines()]
    assert len(texts) > 10
    for text in texts:
        assert_same_as_reference(text, max_tokens, overlap)


@pytest.mark.parametrize(
    "text",
    [
        "Q" * 20_000,
        "1234567890" * 2_000,
        "word " + "\n" * 5_000 + " word",
        " ".join(f"w{i}{' ' * 50}" for i in range(500)),
        "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8" * 1_000,
        "\u4eca\u65e5\u306f\u6674\u308c\u3002" * 1_000,
        "\n".join(f"line {i} without an end" for i in range(1_000)),
        "a. b! c? " * 1_000,
        "=+" * 5_000,
    ],
    ids=[
        "letters",
        "digits",
        "blank-lines",
        "wide-spaces",
        "unspaced",
        "unspaced-ends",
        "lines",
        "tiny-sentences",
        "symbols",
    ],
)
@pytest.mark.parametrize(("max_tokens", "overlap"), [(512, 0), (512, 256), (16, 0), (16, 15)])
def test_long_and_odd_texts_give_the_reference_chunks(text: str, max_tokens: int, overlap: int) -> None:
    assert_same_as_reference(text, max_tokens, overlap)
