import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lafma.data.clips import ClipRejected, cut_clips
from lafma.data.manifest import detect_layout, read_manifest, stable_id

AUDIOCAPS = """audiocap_id,youtube_id,start_time,caption
91139,r1nicOVtvkQ,130,A woman talks nearby as water pours
58146,UDGBjjwyaqE,20,Multiple clanging and clanking sounds
11542,O8Oe6ZSPfM0,0,"A man speaks, then a dog barks, twice"
"""

CLOTHO = """file_name,caption_1,caption_2,caption_3,caption_4,caption_5
Distorted AM Radio noise.wav,A radio dispatcher and an officer talk.,Radio static hisses.,A man talks on a radio.,Static crackles.,Noise from a radio.
rain_on_tin.wav,Rain falls on a tin roof.,,Heavy rain patters.,Water drums on metal.,Rain.
"""


def test_audiocaps_csv_reads_as_published(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(AUDIOCAPS)
    m = read_manifest(str(path), audio_dir="s3://bucket/audiocaps/wav")
    assert m.layout == "audiocaps" and not m.rejects
    assert [r["id"] for r in m.rows] == ["91139", "58146", "11542"]
    assert m.rows[0]["audio_uri"] == "s3://bucket/audiocaps/wav/r1nicOVtvkQ.wav"
    assert m.rows[2]["caption"] == "A man speaks, then a dog barks, twice"
    assert {r["split"] for r in m.rows} == {"train"}  # from the file name
    m = read_manifest(str(path), audiocaps_pattern="{youtube_id}_{start_time}.flac")
    assert m.rows[1]["audio_uri"] == f"{tmp_path}/UDGBjjwyaqE_20.flac"


def test_clotho_csv_keeps_all_captions_per_file(tmp_path):
    path = tmp_path / "clotho_captions_evaluation.csv"
    path.write_text(CLOTHO)
    m = read_manifest(str(path))
    assert m.layout == "clotho" and len(m.rows) == 2
    assert m.rows[0]["captions"][1] == "Radio static hisses." and len(m.rows[0]["captions"]) == 5
    assert len(m.rows[1]["captions"]) == 4  # the empty caption_2 is dropped, not the file
    assert m.rows[0]["audio_uri"] == f"{tmp_path}/Distorted AM Radio noise.wav"
    assert {r["split"] for r in m.rows} == {"test"}
    assert read_manifest(str(path)).rows[0]["id"] == m.rows[0]["id"]  # stable across runs


def test_generic_jsonl_and_parquet_with_ids_splits_and_attributes(tmp_path):
    recs = [{"audio": "a.wav", "caption": "a dog barks", "split": "val", "family": "animal"},
            {"audio": "/abs/b.wav", "caption": "rain", "id": "b1"}]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    m = read_manifest(str(jsonl))
    assert [r["audio_uri"] for r in m.rows] == [f"{tmp_path}/a.wav", "/abs/b.wav"]
    assert m.rows[0]["id"] == stable_id("a.wav", "a dog barks") and m.rows[1]["id"] == "b1"
    assert m.rows[0]["split"] == "validation" and m.rows[1]["split"] == "train"
    assert json.loads(m.rows[0]["attributes"]) == {"family": "animal"}
    assert [r["reason"] for r in m.rejects] == ["bad_manifest_row"]
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in ("audio", "caption", "id")} for r in recs]),
                   tmp_path / "m.parquet")
    assert [r["audio_uri"] for r in read_manifest(str(tmp_path / "m.parquet")).rows] == \
        [f"{tmp_path}/a.wav", "/abs/b.wav"]


def test_unknown_layout_names_the_columns():
    with pytest.raises(ValueError, match="wav_path"):
        detect_layout(["wav_path", "text"])


def test_cut_clips_crop_pad_segment_and_reject():
    sr, clip = 1000, 1000
    x = torch.sin(torch.arange(3600) / 5.0)
    segs = cut_clips(x, sample_rate=sr, clip_samples=clip, min_samples=100)
    assert [c.index for c in segs] == [0, 1, 2, 3] and segs[-1].valid_samples == 600
    assert len(cut_clips(x, sample_rate=sr, clip_samples=clip, min_samples=100, mode="crop")) == 1
    assert len(cut_clips(x, sample_rate=sr, clip_samples=clip, min_samples=100, max_segments=2)) == 2
    short = cut_clips(x[:300], sample_rate=sr, clip_samples=clip, min_samples=100)
    assert short[0].wav.shape == (1000,) and short[0].valid_samples == 300 and short[0].wav[300:].abs().sum() == 0
    for wav, reason in [(x[:50], "too_short"), (torch.zeros(2000), "silent"), (torch.ones(10_000), "too_long")]:
        with pytest.raises(ClipRejected) as e:
            cut_clips(wav, sample_rate=sr, clip_samples=clip, min_samples=100, max_seconds=5)
        assert e.value.reason == reason
    # A silent segment inside a loud file is dropped; the file is kept.
    mixed = torch.cat([x[:1000], torch.zeros(1000), x[:1000]])
    assert [c.index for c in cut_clips(mixed, sample_rate=sr, clip_samples=clip, min_samples=100)] == [0, 2]


def test_a_row_with_surplus_fields_is_rejected_alone(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("audio,caption\na.wav,a dog barks\nb.wav,rain, then thunder\nc.wav,wind\n")
    m = read_manifest(str(path))
    assert [r["caption"] for r in m.rows] == ["a dog barks", "wind"]
    assert [(r["id"], r["reason"]) for r in m.rejects] == [("row-2", "bad_manifest_row")]
