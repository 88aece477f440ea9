"""Splitting a shard's text into chunks that fit an embedding model's input.

Token limits: there is no tokenizer dependency, so tokens are estimated from the text, on the
high side. A run of ASCII letters counts one token per 3 letters (English averages about 4), a
run of digits one per 2, any other visible character as many tokens as its UTF-8 bytes (the most
a byte-level tokenizer can make of it), whitespace holding a line break one token, other
whitespace none. Ordinary text is overestimated by a third to a half, so a chunk of `max_tokens`
estimated tokens fits a model that accepts `max_tokens` real ones. The worker keeps it within
the model's limit by itself: each embedder declares `max_input_tokens` (8191 for OpenAI's
embedding models, 254 for all-MiniLM-L6-v2) and the consumer lowers its chunk budget to it
(`Consumer.chunk_budget`). Should an odd
text still be too long, the OpenAI embedder turns the server's 400 into a PermanentError: the job
fails at once instead of retrying.

Splitting is greedy: each chunk takes as many whole pieces as fit, where a piece too large for a
chunk is cut at blank lines first, then at sentence ends and line breaks, then at spaces, then
between runs of characters; a run larger than the whole budget (a long word, an encoded blob) is
cut every so many characters. Chunks are slices of the text, in order, without whitespace at
their edges, never empty. With `overlap_tokens`, a chunk after the first starts with up to that
many tokens of the previous chunk's tail, from a word start, to keep context across the cut.

This runs once per shard on the worker's hot path, so a span's estimate is counted with a few
whole-string operations (UTF-8 bytes mapped to character classes, then counted) rather than run
by run in Python, and a span is only cut finer when it does not fit: ordinary text costs a few
passes over its characters and a handful of Python steps per paragraph.
"""

from __future__ import annotations

import re
import string
from bisect import bisect_left
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 512
# Large enough for any single character (at most 4 UTF-8 bytes), so a chunk can always progress.
MIN_MAX_TOKENS = 4

_LETTERS_PER_TOKEN = 3
_DIGITS_PER_TOKEN = 2
# The runs of a word (which holds no whitespace).
_RUN = re.compile(r"(?P<letters>[A-Za-z]+)|(?P<digits>[0-9]+)|(?P<other>.)", re.DOTALL)

# Ideographic full stop and fullwidth ! and ?: scripts without spaces end sentences with these,
# and no whitespace follows to cut at.
_UNSPACED_SENTENCE_ENDS = frozenset("\u3002\uff01\uff1f")
_SENTENCE_ENDS = frozenset(".!?\u2026") | _UNSPACED_SENTENCE_ENDS
# Closing quotes and brackets that may stand between a sentence end and the space after it.
_CLOSERS = frozenset("\"')]}\u201d\u2019\u00bb")

# Where a cut may fall, coarsest first; splitting tries each level in turn, then cuts between
# runs of characters.
_PARAGRAPH, _SENTENCE, _WORD = 0, 1, 2


def _escaped(chars: frozenset[str]) -> str:
    return "".join(re.escape(char) for char in sorted(chars))


def _one_of(chars: frozenset[str]) -> str:
    return f"[{_escaped(chars)}]"


# Where to cut a span at each level, as matches over its text: the cut falls at a match's end and
# the parts between cuts are trimmed, so a cut anywhere in a whitespace run stands for the run.
# A match starts with one of a few characters, which the search skips to without trying the
# rest of the pattern at every position; no quantifier gives back, which keeps searches linear.
_CUTS = {
    # Two line breaks of one kind with only whitespace between ("\n\n", "\r\n\r\n", "\r\r"), and
    # the rest of the run, however many blank lines follow.
    _PARAGRAPH: re.compile(r"\n[^\S\n]*+\n\s*+|\r[^\S\r]*+\r\s*+"),
    # A sentence end, or a sentence end and a closer, before whitespace; an unspaced sentence end
    # before more text; a line break. Each match is one character, so none hides the next.
    _SENTENCE: re.compile(
        rf"[{_escaped(_SENTENCE_ENDS | _CLOSERS)}\n\r]"
        rf"(?:(?<={_one_of(_SENTENCE_ENDS)})(?=\s)"
        rf"|(?<={_one_of(_SENTENCE_ENDS)}{_one_of(_CLOSERS)})(?=\s)"
        rf"|(?<={_one_of(_UNSPACED_SENTENCE_ENDS)})(?=\S)"
        r"|(?<=[\n\r]))"
    ),
}
# Characters without which a span has no cut at a level.
_CUT_NEEDS = {_PARAGRAPH: "\n\r", _SENTENCE: "".join(sorted(_SENTENCE_ENDS)) + "\n\r"}
_SPACE_RUN = re.compile(r"\s+")

# Character classes, one byte per UTF-8 byte: ASCII letters a, digits d, other characters x (each
# byte of a non-ASCII character counts a token), line breaks a newline, other whitespace a space.
_LETTER, _DIGIT, _OTHER, _BREAK, _SPACE = b"a", b"d", b"x", b"\n", b" "
_RUNS_OF_CLASSES = re.compile(rb"a+|d+|x")
# Whitespace outside ASCII, in UTF-8 (all of it lies below U+3001). It becomes a space before
# the bytes are classed: it costs nothing, and it keeps a whitespace run together.
_WIDE_SPACE = re.compile(
    b"|".join(re.escape(chr(code).encode()) for code in range(0x80, 0x3001) if chr(code).isspace())
)


def _class_table() -> bytes:
    table = bytearray(_OTHER * 256)
    for letter in string.ascii_letters:
        table[ord(letter)] = _LETTER[0]
    for digit in string.digits:
        table[ord(digit)] = _DIGIT[0]
    for byte in range(128):
        if chr(byte).isspace():
            table[byte] = _BREAK[0] if chr(byte) in "\n\r" else _SPACE[0]
    return bytes(table)


_CLASS_TABLE = _class_table()
# With spaces deleted, a whitespace run that breaks a line is a run of newlines: made the only
# non-whitespace bytes, such runs are what bytes.split() returns.
_BREAK_RUNS_TABLE = bytes(ord("n") if byte == _BREAK[0] else _SPACE[0] for byte in range(256))
_LETTER_TOKEN = _LETTER * _LETTERS_PER_TOKEN
_DIGIT_TOKEN = _DIGIT * _DIGITS_PER_TOKEN


@dataclass(frozen=True, slots=True)
class Chunk:
    """A chunk of text: `text == source[start:end]`, with its estimated token count."""

    text: str
    start: int
    end: int
    tokens: int


def estimate_tokens(text: str) -> int:
    """A conservative token count for `text` (see the module docstring for the rules)."""
    classes = _classes(text)
    return _tokens(classes, classes.count(_SPACE) + classes.count(_BREAK))


def _classes(text: str) -> bytes:
    """The class bytes of `text`; for ASCII text, one per character, at the same offsets."""
    if text.isascii():
        return text.encode().translate(_CLASS_TABLE)
    return _WIDE_SPACE.sub(_SPACE, text.encode()).translate(_CLASS_TABLE)


def _tokens(classes: bytes, whitespace: int) -> int:
    """The estimate of a text from its class bytes, `whitespace` of which are whitespace."""
    tokens = classes.count(_OTHER)
    if _BREAK in classes:
        tokens += len(classes.translate(_BREAK_RUNS_TABLE, _SPACE).split())
    if 2 * whitespace > len(classes):
        # Mostly whitespace: a single space for each run keeps the runs apart, in fewer bytes.
        classes = _SPACE.join(classes.split())
    # A run of n letters becomes n // 3 A's and n % 3 a's, so its tokens (n / 3 rounded up) are
    # its A's plus one if any a is left; a left-over "aa" is one group, not two. The same for
    # digits, whose left-over is at most one d. (So this holds for up to 3 characters a token.)
    if _LETTER in classes:
        letters = classes.replace(_LETTER_TOKEN, b"A")
        tokens += letters.count(b"A") + letters.count(_LETTER) - letters.count(_LETTER * 2)
    if _DIGIT in classes:
        digits = classes.replace(_DIGIT_TOKEN, b"D")
        tokens += digits.count(b"D") + digits.count(_DIGIT)
    return tokens


def chunk_text(text: str, *, max_tokens: int = DEFAULT_MAX_TOKENS, overlap_tokens: int = 0) -> list[Chunk]:
    """Split `text` into chunks of at most `max_tokens` estimated tokens; blank text gives none."""
    if max_tokens < MIN_MAX_TOKENS:
        raise ValueError(f"max_tokens must be at least {MIN_MAX_TOKENS}, got {max_tokens}")
    if not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"overlap_tokens must be in [0, max_tokens), got {overlap_tokens}")
    chunker = _Chunker(text, max_tokens, overlap_tokens)
    body = text.strip()
    if body:
        chunker.split(body, len(text) - len(text.lstrip()), _PARAGRAPH)
    return chunker.finish()


class _Chunker:
    """Packs the text's spans into chunks in order, each span cut only as finely as it must be."""

    def __init__(self, text: str, budget: int, overlap: int) -> None:
        self.text = text
        self.budget = budget
        self.overlap = overlap
        self.chunks: list[Chunk] = []
        # The chunk being filled: text[begin:end] costs `tokens`; begin < 0 before the first span.
        self.begin = -1
        self.end = 0
        self.tokens = 0
        # With overlap, for each span added: where it starts, and the tokens of the text before it
        # (from the first span); `reached` is that count at `end`. A tail's tokens are a difference.
        self.starts: list[int] = []
        self.before: list[int] = []
        self.reached = 0
        # Words recur: the estimates of those that fit, for this text.
        self.word_tokens: dict[str, int] = {}

    def split(self, span: str, start: int, level: int, classes: bytes | None = None) -> None:
        """Add `span`, trimmed text at `start`, whole if it fits, else cut at `level` or finer."""
        if classes is None:
            classes = _classes(span)
        whitespace = classes.count(_SPACE) + classes.count(_BREAK)
        # Every byte but whitespace costs at least a third of a token: a span with more than three
        # per token of budget cannot fit, and need not be counted.
        if len(classes) - whitespace <= _LETTERS_PER_TOKEN * self.budget:
            tokens = _tokens(classes, whitespace)
            if tokens <= self.budget:
                self.add(start, start + len(span), tokens)
                return
        for cut_level in range(level, _WORD):
            # A search for the characters a level's cuts need is quicker than its pattern's scan
            # through a long span that has none.
            if any(char in span for char in _CUT_NEEDS[cut_level]) and self.split_at(span, start, cut_level):
                return
        if whitespace:
            self.add_words(span, start)
        else:
            self.add_runs(span, start, classes)

    def split_at(self, span: str, start: int, level: int) -> bool:
        """Split `span` at `level`'s cuts, and each trimmed part at the next level; False if none."""
        ends = [match.end() for match in _CUTS[level].finditer(span)]
        if not ends:
            return False
        begin = 0
        for cut in [*ends, len(span)]:
            part = span[begin:cut]
            left = part.lstrip()
            body = left.rstrip()
            if body:
                self.split(body, start + cut - len(left), level + 1)
            begin = cut
        return True

    def add_words(self, span: str, start: int) -> None:
        """Add the words of `span`, text at `start`, each word that does not fit run by run."""
        text, budget, known = self.text, self.budget, self.word_tokens
        # str.split skips whitespace faster than a pattern's search, and a word's offset is where
        # it next occurs: only whitespace lies between the previous word and it.
        for word in span.split():
            start = text.find(word, start)
            stop = start + len(word)
            tokens = known.get(word)
            if tokens is None:
                classes = _classes(word)
                tokens = _tokens(classes, 0) if len(classes) <= _LETTERS_PER_TOKEN * budget else budget + 1
                if tokens > budget:
                    self.add_runs(word, start, classes)
                    start = stop
                    continue
                known[word] = tokens
            self.add(start, stop, tokens)
            start = stop

    def add_runs(self, word: str, start: int, classes: bytes) -> None:
        """Add a word (no whitespace) run by run, cutting a run larger than the budget."""
        if word.isascii():
            # One class byte per character: runs are found in the class bytes, where a run of
            # letters is a run of one byte value and so quicker to scan than the text.
            for match in _RUNS_OF_CLASSES.finditer(classes):
                first, last = match.span()
                if classes[first] == _OTHER[0]:
                    self.add(start + first, start + last, 1)
                else:
                    self.add_run(start + first, start + last, classes[first] == _LETTER[0])
            return
        for run in _RUN.finditer(word):
            first, last = run.span()
            if run.lastgroup == "other":
                self.add(start + first, start + last, len(run.group().encode()))
            else:
                self.add_run(start + first, start + last, run.lastgroup == "letters")

    def add_run(self, start: int, stop: int, letters: bool) -> None:
        """Add a run of letters or digits, cut every so many characters if it exceeds the budget."""
        per_token = _LETTERS_PER_TOKEN if letters else _DIGITS_PER_TOKEN
        step = self.budget * per_token
        for cut in range(start, stop, step):
            end = min(cut + step, stop)
            self.add(cut, end, -(-(end - cut) // per_token))

    def add(self, start: int, stop: int, tokens: int) -> None:
        """Append a span within budget to the chunk being filled, or start the next chunk with it."""
        if self.begin < 0:
            self.begin, self.end, self.tokens = start, stop, tokens
            if self.overlap:
                self._mark(start, 0, tokens)
            return
        # Between two spans lies nothing or one whitespace run: one token if it breaks a line.
        end = self.end
        gap = end < start and (self.text.find("\n", end, start) >= 0 or self.text.find("\r", end, start) >= 0)
        extra = tokens + gap
        if self.tokens + extra <= self.budget:
            self.tokens += extra
        else:
            self.chunks.append(Chunk(self.text[self.begin : end], self.begin, end, self.tokens))
            tail = self._overlap_start(extra) if self.overlap else None
            if tail is None:
                self.begin, self.tokens = start, tokens
            else:
                self.begin, tail_tokens = tail
                self.tokens = tail_tokens + extra
        self.end = stop
        if self.overlap:
            self._mark(start, self.reached + gap, tokens)

    def _mark(self, start: int, before: int, tokens: int) -> None:
        self.starts.append(start)
        self.before.append(before)
        self.reached = before + tokens

    def _overlap_start(self, extra: int) -> tuple[int, int] | None:
        """The earliest word start in the chunk just emitted whose tail fits the overlap and leaves
        room for `extra` more tokens, with the tail's tokens; None if there is none."""
        limit = min(self.overlap, self.budget - extra)
        if limit <= 0:
            return None
        text, begin, end = self.text, self.begin, self.end
        # A tail costs more the earlier it starts. Spans before `index` have tails over the limit,
        # the others not: the answer is a word start within the last of the former, else the
        # first word start after it.
        starts, index = self.starts, bisect_left(self.before, self.reached - limit)
        low = max(begin, starts[index - 1]) if index else begin
        # A tail from a span's start is known; from within a span it is counted.
        tails: dict[int, int] = {}
        if index == len(starts):
            high = end
        elif starts[index] < low:
            high = low  # the chunk began inside that span, and its whole text fits the limit
        else:
            high = starts[index]
            tails[high] = self.reached - self.before[index]
        words = [match.end() for match in _SPACE_RUN.finditer(text, low, high)]

        def fits(start: int) -> bool:
            if start not in tails:
                tails[start] = estimate_tokens(text[start:end])
            return tails[start] <= limit

        found = bisect_left(words, True, key=fits)
        if found < len(words):
            start = words[found]
        else:
            after = _SPACE_RUN.search(text, high, end)
            if after is None:
                return None
            start = after.end()
        return start, tails[start] if start in tails else estimate_tokens(text[start:end])

    def finish(self) -> list[Chunk]:
        """The chunks, the one being filled included."""
        if self.begin >= 0:
            self.chunks.append(Chunk(self.text[self.begin : self.end], self.begin, self.end, self.tokens))
        return self.chunks
