"""Stop strings on detokenized text: never emitted, found across chunk boundaries, earliest match wins."""

from __future__ import annotations

import random

from common.stops import StopMatcher


def run(chunks: list[str], stops: list[str]) -> tuple[list[str], bool]:
    matcher = StopMatcher(stops)
    out = []
    for chunk in chunks:
        out.append(matcher.feed(chunk))
        if matcher.stopped:
            break
    out.append(matcher.flush())
    return out, matcher.stopped


def test_a_stop_string_spanning_chunks_is_held_back_and_cut():
    out, stopped = run(["Hello wo", "rl", "d and more"], ["world"])
    assert stopped and "".join(out) == "Hello "
    assert all("w" not in piece for piece in out[1:])  # the held tail never leaked a stop prefix


def test_without_stops_text_passes_at_once():
    matcher = StopMatcher([])
    assert [matcher.feed(c) for c in ["a", "bc", ""]] == ["a", "bc", ""]
    assert matcher.flush() == "" and not matcher.stopped


def test_the_earliest_match_wins_and_a_held_tail_is_flushed_at_the_end():
    out, stopped = run(["xxbbb", "aaa"], ["aaa", "bb"])
    assert stopped and "".join(out) == "xx"
    out, stopped = run(["abc", "de"], ["ef"])
    assert not stopped and "".join(out) == "abcde"


def test_random_chunkings_equal_cutting_the_whole_text():
    rng = random.Random(3)
    for _ in range(500):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        chunks = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        want = text[: min(hits)] if hits else text
        out, stopped = run(chunks, stops)
        assert ("".join(out), stopped) == (want, bool(hits)), (text, stops, chunks)
