import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from lafma.data.clips import ClipRejected, cut_clips
from lafma.data.manifest import detect_layout, layout_of, manifest_digest, read_manifest, stable_id

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
    assert {r["split"] for r in m.rows} == {"train"} and m.split_source == "file name"
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
    assert {r["split"] for r in m.rows} == {"test"} and m.split_source == "file name"
    assert read_manifest(str(path)).rows[0]["id"] == m.rows[0]["id"]  # stable across runs


def test_generic_jsonl_and_parquet_with_ids_splits_and_attributes(tmp_path):
    recs = [{"audio": "a.wav", "caption": "a dog barks", "split": "val", "family": "animal"},
            {"audio": "/abs/b.wav", "caption": "rain", "id": "b1"}]
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in recs) + "\n{not json\n")
    m = read_manifest(str(jsonl))
    assert [r["audio_uri"] for r in m.rows] == [f"{tmp_path}/a.wav", "/abs/b.wav"]
    assert m.rows[0]["id"] == stable_id("a.wav", "a dog barks") and m.rows[1]["id"] == "b1"
    # No split column value and no split in the file name: unknown, not a guessed "train".
    assert m.rows[0]["split"] == "validation" and m.rows[1]["split"] == ""
    assert m.split_source == "mixed"
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
    assert {r["split"] for r in m.rows} == {""} and m.split_source == "none"


# --- directory manifests -------------------------------------------------------------------


def wav(path: Path, seconds: float = 0.1, sr: int = 8000, fmt: str = "WAV") -> Path:
    """A real, tiny audio file (its size differs with its length: the digest sees sizes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format=fmt)
    return path


def caption(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def textfiles_corpus(root: Path) -> Path:
    """Nested folders, a multi-line caption, a missing and a non-UTF-8 caption, and noise to skip."""
    caption(root / "dog.txt", "a dog barks\n\n   \n a dog  barks twice \n")
    wav(root / "dog.wav")
    caption(root / "birds" / "forest" / "lark.txt", "\ufeffa lark sings\r\n")
    wav(root / "birds" / "forest" / "lark.flac", fmt="FLAC")
    wav(root / "cat.ogg", fmt="OGG")  # no cat.txt
    caption(root / "bad.txt", b"caf\xe9 noise")  # Latin-1, not UTF-8
    wav(root / "bad.wav")
    caption(root / "README.txt", "not a caption: no README audio")
    wav(root / ".cache" / "x.wav")  # hidden folder
    wav(root / "._dog.wav")  # a macOS resource fork beside dog.wav
    return root


def test_textfiles_nested_multiline_and_rejects(tmp_path):
    root = textfiles_corpus(tmp_path / "corpus")
    assert layout_of(str(root)) == "textfiles"
    m = read_manifest(str(root))
    assert m.layout == "textfiles"
    assert [r["audio_uri"] for r in m.rows] == [f"{root}/birds/forest/lark.flac", f"{root}/dog.wav"]
    assert [r["id"] for r in m.rows] == [stable_id("birds/forest/lark.flac"), stable_id("dog.wav")]
    assert m.rows[1]["captions"] == ["a dog barks", "a dog barks twice"] and m.rows[1]["caption"] == "a dog barks"
    assert m.rows[0]["captions"] == ["a lark sings"]
    assert {(r["audio_uri"], r["reason"]) for r in m.rejects} == {
        (f"{root}/cat.ogg", "missing_caption"), (f"{root}/bad.wav", "caption_not_utf8")}
    assert {r["split"] for r in m.rows} == {""} and m.split_source == "none"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_textfiles_links_are_read_and_a_fifo_caption_is_rejected_not_read(tmp_path):
    corpus = textfiles_corpus(tmp_path / "corpus")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "dog.wav").symlink_to(corpus / "dog.wav")  # corpora assembled from links
    (linked / "dog.txt").symlink_to(corpus / "dog.txt")
    wav(linked / "owl.wav")
    os.mkfifo(linked / "owl.txt")  # opening it would block until a writer came
    caption(linked / "blank.txt", "\n  \n")
    wav(linked / "blank.wav")
    m = read_manifest(str(linked))
    assert [(r["audio_uri"], r["captions"]) for r in m.rows] == [
        (f"{linked}/dog.wav", ["a dog barks", "a dog barks twice"])]
    assert [(r["audio_uri"], r["reason"]) for r in m.rejects] == [
        (f"{linked}/blank.wav", "missing_caption"), (f"{linked}/owl.wav", "caption_unreadable")]
    assert len(manifest_digest(str(linked))) == 64


def test_textfiles_split_folders(tmp_path):
    for folder in ("train", "valid", "test-clean"):
        caption(tmp_path / folder / "a.txt", f"a sound in {folder}")
        wav(tmp_path / folder / "a.wav")
    m = read_manifest(str(tmp_path))
    assert [(r["audio_uri"].rsplit("/", 2)[1], r["split"]) for r in m.rows] == [
        ("test-clean", "test"), ("train", "train"), ("valid", "validation")]
    assert m.split_source == "folders"
    caption(tmp_path / "test.txt", "no split folder above it: its own name is no split")
    wav(tmp_path / "test.wav")
    m = read_manifest(str(tmp_path))
    assert {r["audio_uri"]: r["split"] for r in m.rows}[f"{tmp_path}/test.wav"] == ""
    assert m.split_source == "mixed"


def test_audiofolder_with_top_level_metadata_csv(tmp_path):
    wav(tmp_path / "a.wav")
    wav(tmp_path / "clips" / "b.flac", fmt="FLAC")
    wav(tmp_path / "stray.wav")  # named by no metadata row
    (tmp_path / "metadata.csv").write_text(
        "file_name,caption,family\na.wav,a dog barks,animal\nclips/b.flac,rain on a roof,\n"
        "../outside.wav,escapes the folder,x\n")
    assert layout_of(str(tmp_path)) == "audiofolder"
    m = read_manifest(str(tmp_path))
    assert m.layout == "audiofolder"
    assert [(r["id"], r["audio_uri"], r["caption"]) for r in m.rows] == [
        (stable_id("a.wav"), f"{tmp_path}/a.wav", "a dog barks"),
        (stable_id("clips/b.flac"), f"{tmp_path}/clips/b.flac", "rain on a roof")]
    assert [json.loads(r["attributes"]) for r in m.rows] == [{"family": "animal"}, {}]
    assert [(r["reason"], r["audio_uri"]) for r in m.rejects] == [
        ("bad_manifest_row", ""), ("missing_caption", f"{tmp_path}/stray.wav")]
    assert {r["split"] for r in m.rows} == {""} and m.split_source == "none"


def test_audiofolder_jsonl_with_caption_lists_and_a_split_column(tmp_path):
    wav(tmp_path / "a.wav")
    wav(tmp_path / "b.wav")
    lines = [{"file_name": "a.wav", "captions": ["a dog barks", "", "a dog"], "split": "val"},
             {"file_name": "b.wav", "captions": ["rain"], "split": "eval", "id": "b-1"}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n[1, 2]\n")
    m = read_manifest(str(tmp_path))
    assert m.layout == "audiofolder"
    assert [r["captions"] for r in m.rows] == [["a dog barks", "a dog"], ["rain"]]
    assert [r["id"] for r in m.rows] == [stable_id("a.wav"), "b-1"]
    assert [r["split"] for r in m.rows] == ["validation", "test"] and m.split_source == "column"
    assert [(r["id"], r["reason"]) for r in m.rejects] == [("metadata.jsonl:line-3", "bad_manifest_row")]


def test_audiofolder_split_folders_each_with_metadata_and_a_text_column(tmp_path):
    wav(tmp_path / "train" / "a.wav")
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text,description\na.wav,a dog barks,loud\n")
    wav(tmp_path / "val" / "a.wav")
    (tmp_path / "val" / "metadata.jsonl").write_text(json.dumps({"file_name": "a.wav", "sentence": "rain"}))
    wav(tmp_path / "test" / "a.wav")
    (tmp_path / "test" / "metadata.csv").write_text("file_name,transcription,split\na.wav,wind,train\n")
    caption(tmp_path / "validation" / "metadata.csv", "file_name,caption\n")  # header only: no rows
    m = read_manifest(str(tmp_path))
    assert [(r["audio_uri"], r["caption"], r["split"]) for r in m.rows] == [
        (f"{tmp_path}/test/a.wav", "wind", "train"),  # a split column wins over its folder
        (f"{tmp_path}/train/a.wav", "a dog barks", "train"),
        (f"{tmp_path}/val/a.wav", "rain", "validation")]
    assert json.loads(m.rows[1]["attributes"]) == {"description": "loud"}  # "text" came first
    assert len({r["id"] for r in m.rows}) == 3 and not m.rejects
    assert m.split_source == "mixed"
    (tmp_path / "test" / "metadata.csv").write_text("file_name,transcription\na.wav,wind\n")
    assert read_manifest(str(tmp_path)).split_source == "folders"


def test_audiofolder_without_a_caption_column_names_what_it_looked_for(tmp_path):
    wav(tmp_path / "a.wav")
    (tmp_path / "metadata.csv").write_text("file_name,label\na.wav,dog\n")
    with pytest.raises(ValueError, match="caption, text, transcription, sentence, description, captions.*label"):
        read_manifest(str(tmp_path))


def test_a_directory_in_no_layout_says_what_was_looked_for_and_found(tmp_path):
    with pytest.raises(ValueError, match=r"metadata\.csv or metadata\.jsonl.*\.txt.*it is empty"):
        read_manifest(str(tmp_path))
    wav(tmp_path / "a.wav")
    (tmp_path / "notes.md").write_text("captions are elsewhere")
    with pytest.raises(ValueError, match=r"found 2 files \(1 \.md, 1 \.wav\); 0 of its 1 audio files have a \.txt"):
        layout_of(str(tmp_path))
    with pytest.raises(ValueError, match="is a directory"):
        read_manifest(str(tmp_path), layout="generic")
    (tmp_path / "m.csv").write_text("audio,caption\na.wav,a dog\n")
    with pytest.raises(ValueError, match="is for a directory"):
        read_manifest(str(tmp_path / "m.csv"), layout="textfiles")


def test_moved_folders_keep_their_ids_and_digest(tmp_path):
    for make in (textfiles_corpus, lambda p: (wav(p / "train" / "a.wav"),
                                              caption(p / "train" / "metadata.csv", "file_name,caption\na.wav,x\n"))):
        here, there = tmp_path / "here", tmp_path / "elsewhere" / "there"
        make(here)
        before = read_manifest(str(here))
        shutil.copytree(here, there)
        after = read_manifest(str(there))
        assert [r["id"] for r in after.rows] == [r["id"] for r in before.rows] and before.rows
        assert [r["audio_uri"] for r in after.rows] == [r["audio_uri"].replace(str(here), str(there))
                                                        for r in before.rows]
        assert manifest_digest(str(there)) == manifest_digest(str(here))
        shutil.rmtree(tmp_path / "elsewhere")
        shutil.rmtree(here)


def test_folder_digest_follows_captions_files_and_sizes_not_mtimes(tmp_path):
    root = textfiles_corpus(tmp_path / "corpus")
    digest = manifest_digest(str(root))
    os.utime(root / "dog.txt", (0, 0))
    os.utime(root / "dog.wav", (0, 0))
    assert manifest_digest(str(root)) == digest
    original = (root / "dog.txt").read_bytes()
    caption(root / "dog.txt", "a dog growls")
    assert manifest_digest(str(root)) != digest
    caption(root / "dog.txt", original)
    assert manifest_digest(str(root)) == digest
    wav(root / "dog.wav", seconds=0.2)  # re-recorded: another size
    assert manifest_digest(str(root)) != digest
    wav(root / "dog.wav")
    assert manifest_digest(str(root)) == digest
    wav(root / "owl.wav")  # a new file, even without its caption
    assert manifest_digest(str(root)) != digest
    (root / "owl.wav").unlink()
    (root / "metadata.csv").write_text("file_name,caption\ndog.wav,a dog\n")  # now an audiofolder
    assert manifest_digest(str(root)) != digest


def test_a_file_manifests_digest_is_the_sha256_of_its_bytes(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(AUDIOCAPS)
    assert manifest_digest(str(path)) == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def s3_bucket(monkeypatch):
    """A moto S3 server on 127.0.0.1 for this test only; fsspec's cached S3 clients are dropped
    before and after, so no other test reuses one that points at it."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # the OS picks, no race
    server.start()
    _, port = server.get_host_and_port()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
                 "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    fs.mkdir("manifests")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_an_s3_folder_reads_and_digests_as_its_local_copy(tmp_path, s3_bucket):
    root = textfiles_corpus(tmp_path / "corpus")
    s3_bucket.pipe({f"manifests/corpus/{p.relative_to(root).as_posix()}": p.read_bytes()
                    for p in root.rglob("*") if p.is_file()})
    s3_bucket.touch("manifests/corpus/empty/")  # a console-made "folder" object
    local, remote = read_manifest(str(root)), read_manifest("s3://manifests/corpus/")
    assert remote.layout == "textfiles"
    assert [r["audio_uri"] for r in remote.rows] == [r["audio_uri"].replace(str(root), "s3://manifests/corpus")
                                                     for r in local.rows]
    assert [(r["id"], r["captions"]) for r in remote.rows] == [(r["id"], r["captions"]) for r in local.rows]
    assert sorted(r["reason"] for r in remote.rejects) == sorted(r["reason"] for r in local.rejects)
    assert manifest_digest("s3://manifests/corpus") == manifest_digest(str(root))


def test_split_names_map_to_train_validation_test(tmp_path):
    path = tmp_path / "m.csv"
    names = ["train", "development", "dev", "val", "valid", "test", "testing", "eval"]
    path.write_text("audio,caption,split\n" + "".join(f"{n}.wav,a {n} clip,{n}\n" for n in names))
    got = [r["split"] for r in read_manifest(str(path)).rows]
    # Clotho's "development" is its training split; "dev" is validation (LibriSpeech, Hugging Face).
    assert got == ["train", "train", "validation", "validation", "validation", "test", "test", "test"]
