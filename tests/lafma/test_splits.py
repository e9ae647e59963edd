"""Held-out splits drawn by a hash of each clip (lafma.data.splits)."""

from __future__ import annotations

from lafma.data.splits import assign_splits


def _rows(n: int, captions: int = 1, prefix: str = "clip") -> list[dict]:
    return [{"id": f"{prefix}{i}-{c}", "audio_uri": f"/data/{prefix}{i}.wav", "split": ""}
            for i in range(n) for c in range(captions)]


def test_the_draw_is_fixed_by_the_clips_not_by_their_order():
    a, b = _rows(200), list(reversed(_rows(200)))
    ra, rb = assign_splits(a, fraction=0.05, min_clips=4), assign_splits(b, fraction=0.05, min_clips=4)
    assert ra.counts == rb.counts and 4 <= ra.counts["validation"] <= 20 and 4 <= ra.counts["test"] <= 20
    assert {r["id"]: r["split"] for r in a} == {r["id"]: r["split"] for r in b}
    assert ra.drawn == 200 and "hash of each clip" in ra.reason
    big = _rows(20000)
    counts = assign_splits(big, fraction=0.05, min_clips=4).counts
    assert all(900 < counts[s] < 1100 for s in ("validation", "test"))  # 5 % each, give or take


def test_every_caption_of_a_clip_is_on_the_same_side():
    rows = _rows(60, captions=5)  # AudioCaps' layout: one row per caption
    report = assign_splits(rows, fraction=0.1, min_clips=2)
    sides: dict[str, set[str]] = {}
    for r in rows:
        sides.setdefault(r["audio_uri"], set()).add(r["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert sum(report.counts.values()) == 60  # counts are clips, not rows
    assert report.counts["validation"] >= 2 and report.counts["test"] >= 2


def test_adding_clips_moves_none_of_the_old_ones_into_training():
    old = _rows(100)
    assign_splits(old, fraction=0.05, min_clips=0)
    new = _rows(100) + _rows(100, prefix="more")
    assign_splits(new, fraction=0.05, min_clips=0)
    before = {r["id"]: r["split"] for r in old}
    after = {r["id"]: r["split"] for r in new if r["id"] in before}
    assert after == before  # each clip's side is its own: new clips move none of the old
    topped = _rows(20)
    assign_splits(topped, fraction=0.05, min_clips=3)  # the minimum tops up from training
    grown = _rows(20) + _rows(400, prefix="more")
    assign_splits(grown, fraction=0.05, min_clips=3)
    old_sides = {r["id"]: r["split"] for r in topped}
    # A topped-up clip may return to training once there are enough; no training clip leaves it.
    assert all(old_sides[r["id"]] != "train" for r in grown if r["id"] in old_sides and r["split"] != "train")


def test_the_minimum_applies_but_never_takes_more_than_half():
    small = _rows(40)
    assert assign_splits(small, fraction=0.05, min_clips=8).counts == {"train": 24, "validation": 8, "test": 8}
    tiny = _rows(6)
    assert assign_splits(tiny, fraction=0.0, min_clips=8).counts == {"train": 4, "validation": 1, "test": 1}


def test_given_splits_are_kept_and_only_the_rest_drawn():
    rows = _rows(40)
    for r in rows[:10]:
        r["split"] = "test"
    report = assign_splits(rows, fraction=0.1, min_clips=3)
    assert all(r["split"] == "test" for r in rows[:10])
    assert report.drawn == 30 and report.counts["validation"] >= 3 and report.counts["test"] >= 13
    assert "30 clips without a split" in report.reason
    given = _rows(5)
    for r in given:
        r["split"] = "train"
    assert assign_splits(given, fraction=0.1, min_clips=2).drawn == 0
