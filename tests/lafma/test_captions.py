"""Caption files for batch generation: formats, bad rows, seeds, safe names."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lafma.data.captions import (
    batches,
    derive_seed,
    plan_generation,
    read_caption_records,
    safe_name,
)

DEFAULTS = dict(job_seed=7, steps=10, guidance=3.0, solver="euler", duration=2.56)


def plan(records):
    return plan_generation(records, **DEFAULTS)


@pytest.mark.parametrize("fmt", ["txt", "csv", "jsonl", "parquet"])
def test_every_format_gives_the_same_rows(tmp_path, fmt):
    captions = ["a dog barks", "rain on a roof", "a low cello note"]
    path = tmp_path / f"c.{fmt}"
    if fmt == "txt":
        path.write_text("\n".join(captions[:2]) + "\n\n" + captions[2] + "\n")
    elif fmt == "csv":
        path.write_text("caption\n" + "\n".join(captions) + "\n")
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps({"caption": c}) + "\n" for c in captions))
    else:
        pq.write_table(pa.table({"caption": captions}), path)
    rows, rejects = plan(read_caption_records(str(path))[0])
    assert [r.caption for r in rows] == captions and not rejects
    assert len({r.seed for r in rows}) == 3 and all(r.steps == 10 and r.duration == 2.56 for r in rows)


def test_bad_rows_are_rejected_with_their_reason_and_good_ones_kept(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(b"id,caption,duration,steps,solver,seed\n"
                     b"ok,a bell,,,,\n"
                     b"empty,   ,,,,\n"
                     b"latin1,caf\xe9 noise,,,,\n"
                     b"long,a drone,100000,,,\n"
                     b"zero,a drone,0,,,\n"
                     b"nan,a drone,nan,,,\n"
                     b"steps,a drone,,0,,\n"
                     b"solver,a drone,,,magic,\n"
                     b"ok,a second row with the same id,,,,\n"
                     b"own,a whistle,1.28,4,heun,42\n")
    rows, rejects = plan(read_caption_records(str(path))[0])
    assert [r.id for r in rows] == ["ok", "own"]
    assert (rows[1].seed, rows[1].steps, rows[1].solver, rows[1].duration) == (42, 4, "heun", 1.28)
    assert {r["id"]: r["reason"] for r in rejects} == {
        "empty": "empty_caption", "latin1": "caption_not_utf8", "long": "bad_duration", "zero": "bad_duration",
        "nan": "bad_setting", "steps": "bad_steps", "solver": "bad_solver", "ok": "duplicate_id"}


def test_a_row_longer_than_a_duration_conditioned_model_learned_is_rejected():
    records = [{"id": "job", "caption": "a bell"}, {"id": "short", "caption": "a bell", "duration": 0.5},
               {"id": "edge", "caption": "a bell", "duration": 1.28}, {"id": "long", "caption": "a bell", "duration": 1.3}]
    rows, rejects = plan_generation(records, **{**DEFAULTS, "duration": 1.28}, max_duration=1.28)
    assert [(r.id, r.duration) for r in rows] == [("job", 1.28), ("short", 0.5), ("edge", 1.28)]
    assert rejects == [{"id": "long", "reason": "bad_duration",
                        "detail": "1.3 s is longer than the model's trained maximum, 1.28 s"}]
    # A model without the embedding (no maximum) plans every row, as before.
    assert [r.id for r in plan_generation(records, **{**DEFAULTS, "duration": 1.28})[0]] == ["job", "short", "edge", "long"]


def test_non_utf8_lines_of_a_text_file_are_rejected(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(b"a fine caption\n\xff\xfe broken\nanother\n")
    rows, rejects = plan(read_caption_records(str(path))[0])
    assert [r.caption for r in rows] == ["a fine caption", "another"]
    assert rejects == [{"id": "line-000002", "reason": "caption_not_utf8", "detail": ""}]


def test_missing_cells_of_a_table_take_the_job_settings():
    # What pandas gives for the cells a row leaves empty: NaN in float columns, None in others.
    nan = float("nan")
    rows, rejects = plan([{"id": nan, "caption": "a bell", "solver": nan, "steps": nan, "seed": None},
                          {"id": None, "caption": "a dog", "solver": "heun", "steps": 4.0, "seed": 3.0}])
    assert not rejects
    assert [(r.id, r.solver, r.steps) for r in rows] == [("row-000001", "euler", 10), ("row-000002", "heun", 4)]
    assert rows[0].seed == derive_seed(7, "row-000001") and rows[1].seed == 3


def test_batches_share_settings_and_are_cut_the_same_way_every_time():
    records = [{"id": f"r{i}", "caption": "c", "steps": 4 if i % 3 == 0 else None} for i in range(7)]
    rows, _ = plan(records)
    cut = batches(rows, 2)
    assert [[r.id for r in part] for part in cut] == [["r0", "r3"], ["r6"], ["r1", "r2"], ["r4", "r5"]]
    assert all(len({r.settings for r in part}) == 1 for part in cut)
    assert batches(list(reversed(rows)), 2) != cut and batches(rows, 2) == cut  # order in, order out


def test_seeds_depend_on_the_row_id_and_job_seed_only():
    a, _ = plan([{"id": "x", "caption": "c"}, {"id": "y", "caption": "c"}])
    b, _ = plan([{"id": "y", "caption": "other"}, {"id": "x", "caption": "c"}])
    assert a[0].seed == b[1].seed == derive_seed(7, "x") and a[1].seed == b[0].seed
    assert derive_seed(8, "x") != derive_seed(7, "x")


@pytest.mark.parametrize("rid", ["../../x", "/etc/passwd", "a/b\\c", "..", ".", "", "~root", "x" * 300,
                                 "sp ace", "é", "NUL\x00byte", "../x"])
def test_safe_names_stay_in_their_directory(tmp_path, rid):
    name = safe_name(rid)
    assert name and "/" not in name and "\\" not in name and not name.startswith(".") and len(name) < 100
    target = os.path.realpath(tmp_path / f"{name}.wav")
    assert os.path.dirname(target) == os.path.realpath(tmp_path)


def test_ids_that_clean_to_the_same_text_get_different_files():
    assert len({safe_name("../x"), safe_name("x"), safe_name("./x"), safe_name("..x")}) == 4
    assert safe_name("plain-id_1.0") == "plain-id_1.0"  # clean ids keep their name


def test_rows_from_a_clip_are_checked_before_any_audio_is_read():
    clip = {"audio": "in.wav"}
    rows, rejects = plan([
        {"id": "inpaint", "caption": "a bell", **clip, "start": 0.5, "end": 1.0},
        {"id": "continue", "caption": "a bell", **clip, "start": 2.0, "end": 4.0, "duration": 4.0},
        {"id": "a2a", "caption": "a bell", **clip, "strength": 0.4},
        {"id": "plain", "caption": "a bell", "audio": float("nan"), "start": None, "strength": float("nan")},
        {"id": "no_clip", "caption": "a bell", "start": 0.5, "end": 1.0},
        {"id": "no_clip_a2a", "caption": "a bell", "strength": 0.5},
        {"id": "unused", "caption": "a bell", **clip},
        {"id": "half", "caption": "a bell", **clip, "start": 0.5},
        {"id": "backwards", "caption": "a bell", **clip, "start": 1.0, "end": 0.5},
        {"id": "negative", "caption": "a bell", **clip, "start": -1.0, "end": 0.5},
        {"id": "past_end", "caption": "a bell", **clip, "start": 3.0, "end": 4.0, "duration": 2.0},
        {"id": "dopri", "caption": "a bell", **clip, "start": 0.5, "end": 1.0, "solver": "dopri5"},
        {"id": "both", "caption": "a bell", **clip, "start": 0.5, "end": 1.0, "strength": 0.5},
        {"id": "strong", "caption": "a bell", **clip, "strength": 1.5},
        {"id": "not_a_path", "caption": "a bell", "audio": 3, "strength": 0.5},
        {"id": "word", "caption": "a bell", **clip, "start": "soon", "end": 1.0},
        {"id": "many", "caption": "a bell", "candidates": 17},
        {"id": "none", "caption": "a bell", "candidates": 0},
    ])
    got = {r.id: r for r in rows}
    assert sorted(got) == ["a2a", "continue", "inpaint", "plain"]
    # A row from a clip lasts as long as the clip unless it says otherwise: known once it is read.
    assert got["inpaint"].duration is None and got["inpaint"].region == (0.5, 1.0)
    assert got["continue"].duration == 4.0 and got["a2a"].strength == 0.4 and got["a2a"].region is None
    assert got["plain"].audio is None and got["plain"].duration == DEFAULTS["duration"]
    assert {r["id"]: r["reason"] for r in rejects} == {
        "no_clip": "no_audio", "no_clip_a2a": "no_audio", "unused": "audio_unused", "half": "bad_region",
        "backwards": "bad_region", "negative": "bad_region", "past_end": "bad_region", "dopri": "bad_region",
        "both": "bad_region", "strong": "bad_strength", "not_a_path": "bad_audio", "word": "bad_setting",
        "many": "bad_candidates", "none": "bad_candidates"}
    assert "fixed-step" in next(r["detail"] for r in rejects if r["id"] == "dopri")


def test_a_row_without_the_optional_fields_is_the_row_older_jobs_planned():
    from lafma.data.captions import GenerationRow

    rows, _ = plan([{"id": "old", "caption": "a bell", "seed": 3},
                    {"id": "new", "caption": "a bell", "seed": 3, "audio": "in.wav", "strength": 0.5, "candidates": 4}])
    old, new = rows
    assert old.to_dict() == {"id": "old", "name": "old", "caption": "a bell", "seed": 3, "steps": 10, "guidance": 3.0,
                             "solver": "euler", "duration": 2.56}
    assert new.to_dict()["candidates"] == 4 and new.extras() == {"audio": "in.wav", "strength": 0.5, "candidates": 4}
    # Read back from a table whose other rows set more fields (their cells null here).
    padded = {**old.to_dict(), "audio": None, "start": None, "end": None, "strength": None, "candidates": None}
    assert GenerationRow.from_dict(padded) == old and GenerationRow.from_dict(new.to_dict()) == new
    # Plain rows still batch as they did: by steps, guidance, solver, duration; clips apart from them
    # (a duration still to be read from the clip sorts first).
    cut = batches(rows + [GenerationRow("x", "x", "c", 1, 4, 3.0, "euler", 2.56)], 8)
    assert [[r.id for r in part] for part in cut] == [["x"], ["new"], ["old"]]
