"""Chunking: budgets, order, coverage of the text, overlap, and cuts at the coarsest boundary."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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
