"""The chunker as it was before it was made fast: the reference worker/chunking.py must match.

This is worker/chunking.py as of 2dd6297, unchanged below this docstring. It works run by run
in Python, which makes its behaviour easy to read and check and makes it slow. The property
tests in tests/test_chunking.py require the fast chunk_text and estimate_tokens to give exactly
what these give (every chunk's text, offsets and tokens) on generated text, and
bench/bench_chunking.py measures the fast one against it. Do not change it: a change in the
chunker's behaviour is a change to both, made on purpose.

The rules, as the original docstring put them:

Token limits: there is no tokenizer dependency, so tokens are estimated from the text, on the
high side. A run of ASCII letters counts one token per 3 letters (English averages about 4), a
run of digits one per 2, any other visible character as many tokens as its UTF-8 bytes (the most
a byte-level tokenizer can make of it), whitespace holding a line break one token, other
whitespace none. Ordinary text is overestimated by a third to a half, so a chunk of `max_tokens`
estimated tokens fits a model that accepts `max_tokens` real ones: keep `max_tokens` at or below
the model's limit, less a few for its special tokens (OpenAI embedding models take 8191;
all-MiniLM-L6-v2 keeps 256 and silently drops the rest, so give it 250 or less). Should an odd
text still be too long, the OpenAI embedder turns the server's 400 into a PermanentError: the job
fails at once instead of retrying.

Splitting is greedy: each chunk takes as many whole pieces as fit, where a piece too large for a
chunk is cut at blank lines first, then at sentence ends and line breaks, then at spaces, then
between runs of characters; a run larger than the whole budget (a long word, an encoded blob) is
cut every so many characters. Chunks are slices of the text, in order, without whitespace at
their edges, never empty. With `overlap_tokens`, a chunk after the first starts with up to that
many tokens of the previous chunk's tail, from a word start, to keep context across the cut.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 512
# Large enough for any single character (at most 4 UTF-8 bytes), so a chunk can always progress.
MIN_MAX_TOKENS = 4

_LETTERS_PER_TOKEN = 3
_DIGITS_PER_TOKEN = 2
_PIECE = re.compile(r"(?P<letters>[A-Za-z]+)|(?P<digits>[0-9]+)|(?P<space>\s+)|(?P<other>.)", re.DOTALL)

# Ideographic full stop and fullwidth ! and ?: scripts without spaces end sentences with these,
# and no whitespace follows to cut at.
_UNSPACED_SENTENCE_ENDS = frozenset("\u3002\uff01\uff1f")
_SENTENCE_ENDS = frozenset(".!?\u2026") | _UNSPACED_SENTENCE_ENDS
# Closing quotes and brackets that may stand between a sentence end and the space after it.
_CLOSERS = frozenset("\"')]}\u201d\u2019\u00bb")

# Where a cut may fall, coarsest first; splitting tries each level in turn.
_PARAGRAPH, _SENTENCE, _WORD, _ANYWHERE = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk of text: `text == source[start:end]`, with its estimated token count."""

    text: str
    start: int
    end: int
    tokens: int


def estimate_tokens(text: str) -> int:
    """A conservative token count for `text` (see the module docstring for the rules)."""
    return sum(_cost(match.lastgroup, match.group()) for match in _PIECE.finditer(text))


def chunk_text(text: str, *, max_tokens: int = DEFAULT_MAX_TOKENS, overlap_tokens: int = 0) -> list[Chunk]:
    """Split `text` into chunks of at most `max_tokens` estimated tokens; blank text gives none."""
    if max_tokens < MIN_MAX_TOKENS:
        raise ValueError(f"max_tokens must be at least {MIN_MAX_TOKENS}, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens must be in [0, max_tokens), got {overlap_tokens}")
    pieces = _Pieces(text, max_tokens)
    atoms: list[tuple[int, int]] = []
    pieces.split(0, len(pieces.costs), _PARAGRAPH, atoms)

    ranges: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for start, end in atoms:
        if current is None:
            current = (start, end)
        elif pieces.cost(current[0], end) <= max_tokens:
            current = (current[0], end)
        else:
            ranges.append(current)
            if overlap_tokens:
                start = pieces.overlap_start(current, end, overlap_tokens, start)
            current = (start, end)
    if current is not None:
        ranges.append(current)

    chunks = []
    for first, last in ranges:
        begin, finish = pieces.starts[first], pieces.ends[last - 1]
        body = text[begin:finish]
        chunks.append(Chunk(text=body, start=begin, end=finish, tokens=estimate_tokens(body)))
    return chunks


def _cost(kind: str | None, piece: str) -> int:
    if kind == "letters":
        return -(-len(piece) // _LETTERS_PER_TOKEN)
    if kind == "digits":
        return -(-len(piece) // _DIGITS_PER_TOKEN)
    if kind == "space":
        return 1 if "\n" in piece or "\r" in piece else 0
    return len(piece.encode("utf-8"))


class _Pieces:
    """The text as runs (letters, digits, whitespace, single other characters), each within budget."""

    def __init__(self, text: str, budget: int) -> None:
        self.budget = budget
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.costs: list[int] = []
        self.space: list[bool] = []
        self.texts: list[str] = []
        for match in _PIECE.finditer(text):
            kind, (start, end) = match.lastgroup, match.span()
            cost = _cost(kind, match.group())
            if cost <= budget:
                self._add(text, start, end, cost, kind == "space")
                continue
            # Only letter and digit runs can exceed a budget of MIN_MAX_TOKENS or more.
            step = budget * (_LETTERS_PER_TOKEN if kind == "letters" else _DIGITS_PER_TOKEN)
            for cut in range(start, end, step):
                stop = min(cut + step, end)
                self._add(text, cut, stop, _cost(kind, text[cut:stop]), False)
        self.prefix = [0]
        for cost in self.costs:
            self.prefix.append(self.prefix[-1] + cost)
        # levels[i]: the coarsest kind of cut allowed just before piece i.
        self.levels = [self._level(i) for i in range(len(self.costs))]

    def _add(self, text: str, start: int, end: int, cost: int, space: bool) -> None:
        self.starts.append(start)
        self.ends.append(end)
        self.costs.append(cost)
        self.space.append(space)
        self.texts.append(text[start:end])

    def _level(self, i: int) -> int:
        if i == 0:
            return _ANYWHERE
        if self.space[i]:
            blank = self.texts[i]
            if max(blank.count("\n"), blank.count("\r")) >= 2:
                return _PARAGRAPH
            if "\n" in blank or "\r" in blank or self._ends_sentence(i - 1):
                return _SENTENCE
            return _WORD
        if not self.space[i - 1] and self.texts[i - 1] in _UNSPACED_SENTENCE_ENDS:
            return _SENTENCE
        return _ANYWHERE

    def _ends_sentence(self, i: int) -> bool:
        if self.texts[i] in _CLOSERS and i > 0:
            i -= 1
        return self.texts[i] in _SENTENCE_ENDS

    def cost(self, first: int, stop: int) -> int:
        """Estimated tokens of pieces [first, stop)."""
        return self.prefix[stop] - self.prefix[first]

    def split(self, first: int, stop: int, level: int, out: list[tuple[int, int]]) -> None:
        """Append trimmed, in-budget ranges covering pieces [first, stop), cut as coarsely as possible."""
        while first < stop and self.space[first]:
            first += 1
        while stop > first and self.space[stop - 1]:
            stop -= 1
        if first >= stop:
            return
        if self.cost(first, stop) <= self.budget:
            out.append((first, stop))
            return
        # Every single piece is within budget, so at _ANYWHERE each part fits and recursion ends.
        begin = first
        for cut in range(first + 1, stop):
            if self.levels[cut] <= level:
                self.split(begin, cut, level + 1, out)
                begin = cut
        self.split(begin, stop, level + 1, out)

    def overlap_start(self, previous: tuple[int, int], stop: int, overlap: int, default: int) -> int:
        """Earliest word start in `previous` whose tail fits `overlap` and leaves [it, stop) in budget."""
        first, last = previous
        best = default
        cut = last - 1
        while cut > first:
            if self.cost(cut, last) > overlap or self.cost(cut, stop) > self.budget:
                break
            if not self.space[cut] and self.space[cut - 1]:
                best = cut
            cut -= 1
        return best
