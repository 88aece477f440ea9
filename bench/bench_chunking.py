"""chunk_text against the implementation it replaced, on the same texts, in the same process.

Subject: worker.chunking.chunk_text. Baseline: tests/reference_chunking.py, the chunker as it
was, which the property tests in tests/test_chunking.py hold the subject equal to (and which is
checked here too, once per case, before timing). Inputs: the sample shards `embedding-jobs up`
feeds (45 texts of about 2k characters) with the default settings (512 tokens, no overlap) and
with a 64-token overlap; then long and odd texts, where the target is only not to be slower:
the shards joined into one 87k-character document, 45k characters of words with no sentence
end, blobs of long base64-like words, Japanese with and without sentence ends, emoji, one
200k-letter run, words between wide runs of spaces, 100k blank lines, a line per sentence, and
a 16-token budget with an overlap of 15. A round times one pass over a case's texts (repeated
for the short ones) for each implementation, interleaved; figures are medians and min-max over
rounds of the per-round ratio. Run: python -m bench chunking
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources

from bench.harness import Figure, interleaved, ratios, report
from tests import reference_chunking
from worker import chunking

ROUNDS = 9
SHARD_TARGET = 0.5
ODD_TARGET = 1.0


@dataclass(frozen=True, slots=True)
class Case:
    """Texts chunked with one budget, and the ratio to the reference that is the target."""

    name: str
    texts: Sequence[str]
    max_tokens: int
    overlap: int
    target: float
    passes: int = 1


def sample_shards() -> list[str]:
    """The texts of the sample shards shipped with the package."""
    sample = resources.files("embedding_jobs") / "sample" / "shards.jsonl"
    return [json.loads(line)["text"] for line in sample.read_text(encoding="utf-8").splitlines()]


def cases() -> list[Case]:
    """The shards at the default settings and with overlap, then the long and odd texts."""
    shards = sample_shards()
    rng = random.Random(14)
    words = ["alpha", "beta", "gamma", "delta", "x", "y2k", "e.g", "ok", "stateful"]
    base64 = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/"
    blobs = " ".join("".join(rng.choice(base64) for _ in range(rng.randint(500, 3000))) for _ in range(30))
    return [
        Case("sample shards, 512 tokens, no overlap (default)", shards, 512, 0, SHARD_TARGET, passes=10),
        Case("sample shards, 512 tokens, 64 overlap", shards, 512, 64, SHARD_TARGET, passes=10),
        Case("shards joined: one 87k-char document", ["\n\n".join(shards)], 512, 0, ODD_TARGET),
        Case("45k chars of words, no sentence end", [" ".join(rng.choice(words) for _ in range(9_000))], 512, 0, 1.0),
        Case("30 base64-like words of 0.5-3k chars", [blobs], 512, 0, ODD_TARGET),
        Case("Japanese with sentence ends, 56k chars", ["今日は晴れ。明日は雨だろう。" * 4_000], 512, 0, ODD_TARGET),
        Case("Japanese without punctuation, 48k chars", ["日本語のテキスト" * 6_000], 512, 0, ODD_TARGET),
        Case("emoji and words, 80k chars", [" ".join("😀🎉 party time 🚀" for _ in range(5_000))], 512, 0, 1.0),
        Case("one 200k-letter run", ["Q" * 200_000], 512, 0, ODD_TARGET),
        Case("words between 300-space runs", [" ".join(f"w{i}{' ' * 300}" for i in range(3_000))], 512, 0, 1.0),
        Case("two words around 100k blank lines", ["word " + "\n" * 100_000 + " word"], 512, 0, ODD_TARGET),
        Case("a line per sentence, 5k lines", ["\n".join(f"line {i} of a log" for i in range(5_000))], 512, 64, 1.0),
        Case("shards, 16 tokens, 15 overlap", shards[:10], 16, 15, ODD_TARGET),
    ]


def timer(chunk_text: Callable[..., Sequence[object]], case: Case) -> Callable[[], float]:
    """Seconds for one pass of `chunk_text` over the case's texts."""

    def run() -> float:
        started = time.perf_counter()
        for _ in range(case.passes):
            for text in case.texts:
                chunk_text(text, max_tokens=case.max_tokens, overlap_tokens=case.overlap)
        return (time.perf_counter() - started) / case.passes

    return run


def main() -> None:
    """Print, per case, chunk_text's time as a ratio to the reference implementation's."""
    for case in cases():
        for text in case.texts:
            subject = chunking.chunk_text(text, max_tokens=case.max_tokens, overlap_tokens=case.overlap)
            baseline = reference_chunking.chunk_text(text, max_tokens=case.max_tokens, overlap_tokens=case.overlap)
            assert [dataclasses.astuple(c) for c in subject] == [dataclasses.astuple(c) for c in baseline], case.name
        subject_times, baseline_times = interleaved(
            ROUNDS, timer(chunking.chunk_text, case), timer(reference_chunking.chunk_text, case)
        )
        ratio = ratios(subject_times, baseline_times)
        per_text = 1e3 / len(case.texts)
        report(
            f"chunk_text: {case.name}",
            f"{Figure.of(subject_times).show('ms', per_text, 3)} per text against the reference's "
            f"{Figure.of(baseline_times).show('ms', per_text, 3)}: ratio {ratio.show('x', digits=3)}",
            f"<= {case.target}x",
            ratio.median <= case.target,
        )


if __name__ == "__main__":
    main()
