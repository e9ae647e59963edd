"""Every input bounded (the data contract): a file that is not a regular file, too large, over a
header cap, behind a scheme that is not allowed, or too slow to read is a reject with its reason,
found before it is read or decoded; a served request over a limit is a 400 naming the limit; the
evaluation reads only the clips it scores. No test here starts Ray."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode

from lafma.config import ConfigError
from lafma.data.manifest import read_manifest, uri_schemes
from pipelines.config import load_pipeline_config
from pipelines.core import storage
from pipelines.core.limits import MAX_REQUEST_ROWS, check_request
from pipelines.stages.audio import process_file
from pipelines.stages.evaluate import load_clips
from tests.pipelines.conftest import BUCKET, tone
from tests.pipelines.dag_run import CONFIG

ROOT = Path(__file__).parents[2]
# Small caps, so the files that break them stay small: 48 KiB a file, 2 channels.
CAPS = ["data.max_file_mb=0.046875", "data.max_channels=2"]


def cfg(*extra: str):
    return load_pipeline_config(CONFIG, [*CAPS, *extra])


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO's open blocks until a writer comes)."""
    def expired(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def wav(path: Path, seconds: float = 0.25, sr: int = 16000, channels: int = 1) -> str:
    sf.write(path, tone(440, seconds, sr, channels), sr, subtype="PCM_16")
    return str(path)


def row(rid: str, uri: str) -> dict:
    return {"id": rid, "audio_uri": uri, "caption": f"a caption for {rid}", "captions": [f"a caption for {rid}"],
            "split": "train", "attributes": "{}"}


def bad_inputs(tmp: Path) -> dict[str, tuple[str, str]]:
    """id -> (audio_uri, the reason it must be rejected with); each is cheap to refuse."""
    os.mkdir(tmp / "folder.wav")
    os.mkfifo(tmp / "pipe.wav")
    big = tmp / "big.wav"
    sf.write(big, tone(440, 2.0), 16000, subtype="PCM_16")  # 64 KB > 48 KiB, and valid audio
    return {
        "directory": (str(tmp / "folder.wav"), "not_a_file"),
        "fifo": (str(tmp / "pipe.wav"), "not_a_file"),
        "too_large": (str(big), "too_large"),
        "eight_channels": (wav(tmp / "8ch.wav", 0.1, 16000, channels=8), "too_many_channels"),
        "rate_over_cap": (wav(tmp / "384k.wav", 0.02, 384000), "rate_too_high"),
        "http": ("http://169.254.169.254/latest/meta-data/clip.wav", "scheme_not_allowed"),
        "chained": ("simplecache::http://example.com/clip.wav", "scheme_not_allowed"),
    }


@pytest.mark.parametrize("rid", ["directory", "fifo", "too_large", "eight_channels", "rate_over_cap", "http",
                                 "chained"])
def test_each_bad_input_is_a_reject_with_its_reason(rid, tmp_path):
    c = cfg()
    uri, reason = bad_inputs(tmp_path)[rid]
    with deadline(20):
        clips, reject = process_file(row(rid, uri), c.mel, c.data, c.clip_samples)
    assert clips == []
    assert reject["reason"] == reason, reject
    assert reject["id"] == rid and reject["audio_uri"] == uri and reject["detail"]


def test_good_files_beside_them_still_come_out(tmp_path):
    c = cfg()
    for uri in (wav(tmp_path / "good.wav"), "file://" + wav(tmp_path / "also.wav", sr=44100)):
        clips, reject = process_file(row("good", uri), c.mel, c.data, c.clip_samples)
        assert reject is None and len(clips) == 1 and clips[0]["valid_samples"] == 4000


SHARD = """
import json, os, resource, sys
import torch
from pipelines.config import load_pipeline_config
from pipelines.stages.audio import process_shard
torch.set_num_threads(1)
cfg = load_pipeline_config(sys.argv[1], json.loads(sys.argv[2]))
# A read or a filter that would allocate gigabytes fails here instead of exhausting the machine.
vm = int(next(line for line in open("/proc/self/status") if line.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
print(json.dumps(process_shard({"shard": 0, "rows": json.loads(sys.argv[3])}, out_dir=sys.argv[4], mel=cfg.mel,
                               data=cfg.data, clip_samples=cfg.clip_samples)))
"""


def test_a_shard_of_hostile_inputs_writes_every_good_clip_and_one_reject_each(tmp_path):
    """The inputs that could hang a worker or fill its memory, in one shard beside good files,
    in a child process with a memory limit and a deadline: /dev/zero (and a link to it) would
    be read forever, a FIFO opened forever, a 44101 Hz file would need a 5.6 GB resampling filter."""
    bad = bad_inputs(tmp_path)
    os.symlink("/dev/zero", tmp_path / "zero.wav")
    bad |= {"dev_zero": ("/dev/zero", "not_a_file"), "link_to_dev_zero": (str(tmp_path / "zero.wav"), "not_a_file"),
            "coprime_rate": (wav(tmp_path / "odd.wav", 0.1, 44101), "bad_rate")}
    good = {"good_16k": wav(tmp_path / "good.wav"), "good_48k_stereo": wav(tmp_path / "st.wav", 0.25, 48000, 2)}
    rows = [row(rid, uri) for rid, uri in good.items()] + [row(rid, uri) for rid, (uri, _) in bad.items()]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", SHARD, str(CONFIG), json.dumps(CAPS), json.dumps(rows), str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == {"shard": 0, "rows_out": 2, "rejected": len(bad)}
    table = pq.read_table(out / "shard-00000.parquet")
    assert sorted(table.column("id").to_pylist()) == sorted(good)
    rejects = pq.read_table(out / "rejects" / "shard-00000.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == {rid: reason for rid, (_, reason) in bad.items()}


def test_only_the_audio_the_clips_keep_is_decoded_and_the_clips_are_unchanged(tmp_path, monkeypatch):
    """A 30 s 44.1 kHz file cut into 2 segments: the clips equal those of decoding it whole."""
    import lafma.audio.io as audio_io
    from lafma.audio import load_audio
    from lafma.data.clips import cut_clips

    c = cfg("data.max_segments=2", "data.max_file_mb=8")
    x = (0.2 * np.random.default_rng(0).standard_normal((30 * 44100, 2))).astype(np.float32)
    sf.write(path := tmp_path / "long.flac", x, 44100)
    decoded = []
    real_read = audio_io.sf.read

    def read(*args, **kwargs):
        decoded.append(out := real_read(*args, **kwargs))
        return out

    monkeypatch.setattr(audio_io.sf, "read", read)
    clips, reject = process_file(row("long", str(path)), c.mel, c.data, c.clip_samples)
    assert reject is None and [cl["segment"] for cl in clips] == [0, 1]
    frames = decoded[-1][0].shape[0]
    assert frames < 5 * 44100  # 2 x 1.28 s and a margin, not 30 s
    whole = cut_clips(load_audio(str(path), c.mel.sample_rate), sample_rate=c.mel.sample_rate,
                      clip_samples=c.clip_samples, min_samples=c.mel.n_fft, mode="segment", max_segments=2)
    for got, want in zip(clips, whole, strict=True):
        np.testing.assert_array_equal(got["waveform"], want.wav.numpy())


# -- storage ------------------------------------------------------------------------------------


@pytest.mark.parametrize("uri, schemes", [
    ("/data/a.wav", ("file",)), ("audio/a.wav", ("file",)), ("file:///data/a.wav", ("file",)),
    ("s3://b/a.wav", ("s3",)), ("HTTP://x/a.wav", ("http",)), ("simplecache::s3://b/a.wav", ("simplecache", "s3")),
    ("zip://a.wav::s3://b/a.zip", ("zip", "s3")),
])
def test_uri_schemes(uri, schemes):
    assert uri_schemes(uri) == schemes


@pytest.mark.parametrize("uri", ["http://169.254.169.254/x.wav", "https://x/a.wav", "gs://b/a.wav",
                                 "memory://a.wav", "simplecache::s3://b/a.wav", "zip://a.wav::file:///a.zip"])
def test_storage_refuses_a_scheme_that_is_not_allowed_before_making_any_filesystem(uri, monkeypatch):
    monkeypatch.setattr(storage, "fs_and_path", lambda u: pytest.fail(f"{u} reached fsspec"))
    with pytest.raises(storage.InputRefused) as e:
        storage.read_bounded(uri, max_bytes=100)
    assert e.value.reason == "scheme_not_allowed"
    assert "not allowed" in e.value.detail and "file, s3" in e.value.detail


def test_read_bounded_reads_up_to_the_cap_and_refuses_one_byte_more(tmp_path):
    (f := tmp_path / "f.bin").write_bytes(b"x" * 100)
    assert storage.read_bounded(str(f), max_bytes=100) == b"x" * 100
    with pytest.raises(storage.InputRefused) as e:
        storage.read_bounded(str(f), max_bytes=99)
    assert e.value.reason == "too_large"
    again = pickle.loads(pickle.dumps(e.value))  # as a Ray task would hand it back
    assert (again.reason, again.detail, str(again)) == (e.value.reason, e.value.detail, str(e.value))
    with pytest.raises(FileNotFoundError):
        storage.read_bounded(str(tmp_path / "nope.wav"), max_bytes=100)
    with pytest.raises(storage.InputRefused, match="file:// is not allowed"):
        storage.read_bounded(str(f), max_bytes=100, allowed_schemes=("s3",))


def test_s3_objects_are_bounded_like_files(s3_endpoint):
    fs, _ = storage.fs_and_path(f"s3://{BUCKET}/bounds/")
    fs.pipe_file(f"{BUCKET}/bounds/small.wav", b"s" * 10)
    fs.pipe_file(f"{BUCKET}/bounds/big.wav", b"b" * 1000)
    fs.pipe_file(f"{BUCKET}/bounds/folder.wav/inside.wav", b"i")
    base = f"s3://{BUCKET}/bounds"
    assert storage.read_bounded(f"{base}/small.wav", max_bytes=100) == b"s" * 10
    # An empty object reads as empty (the audio stage's "empty" reject), not as unreadable: S3
    # refuses a range request on it.
    fs.pipe_file(f"{BUCKET}/bounds/empty.wav", b"")
    assert storage.read_bounded(f"{base}/empty.wav", max_bytes=100) == b""
    assert storage.read_bounded(f"{base}/small.wav", max_bytes=10) == b"s" * 10  # exactly the cap
    for name, reason in (("big.wav", "too_large"), ("folder.wav", "not_a_file")):
        with pytest.raises(storage.InputRefused) as e:
            storage.read_bounded(f"{base}/{name}", max_bytes=100)
        assert e.value.reason == reason
    with pytest.raises(FileNotFoundError):
        storage.read_bounded(f"{base}/nope.wav", max_bytes=100)


def test_a_stalled_s3_endpoint_is_a_timeout_reject_within_the_deadline(tmp_path, monkeypatch):
    """An endpoint that accepts the connection and never answers: the read gives up at the
    per-file deadline, and the row is a reject, not a task held for minutes."""
    import time

    from s3fs import S3FileSystem

    server = socket.create_server(("127.0.0.1", 0))  # accepts (the kernel's backlog), never replies
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "x",
                 "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    S3FileSystem.clear_instance_cache()  # a cached client would still point at another endpoint
    try:
        c = cfg("data.read_timeout=1.5")
        t0 = time.monotonic()
        with deadline(30):
            clips, reject = process_file(row("slow", "s3://stalled/clip.wav"), c.mel, c.data, c.clip_samples)
        assert clips == [] and reject["reason"] == "timeout", reject
        assert time.monotonic() - t0 < 10
    finally:
        S3FileSystem.clear_instance_cache()
        server.close()


# A shard whose files hang, in a child process (a hang must fail the test, not hold it): one
# file's read blocks in a real system call (a pipe whose writer never writes), another's decode
# loops in Python; each is a timeout reject, and the good files on either side still come out.
HANGING_SHARD = """
import json, os, sys, time
import pipelines.stages.audio as audio
from pipelines.config import load_pipeline_config
cfg = load_pipeline_config(sys.argv[1], json.loads(sys.argv[2]))
real_read, real_load = audio.storage.read_bounded, audio.load_audio
reader, writer = os.pipe()  # the write end stays open: a read waits forever

def read_bounded(uri, **kw):
    return os.read(reader, 1) if "stalled" in uri else real_read(uri, **kw)

def load_audio(raw, sr, *, name, **kw):
    while "endless" in name:
        time.sleep(0.01)
    return real_load(raw, sr, name=name, **kw)

audio.storage.read_bounded, audio.load_audio = read_bounded, load_audio
t0 = time.monotonic()
out = audio.process_shard({"shard": 0, "rows": json.loads(sys.argv[3])}, out_dir=sys.argv[4], mel=cfg.mel,
                          data=cfg.data, clip_samples=cfg.clip_samples)
print(json.dumps({**out, "seconds": time.monotonic() - t0}))
"""


def test_a_read_or_decode_that_never_ends_is_a_timeout_reject_and_the_shard_still_comes_out(tmp_path):
    good = {"first": wav(tmp_path / "a.wav"), "last": wav(tmp_path / "b.wav")}
    hanging = {"stalled_read": wav(tmp_path / "stalled.wav"), "endless_decode": wav(tmp_path / "endless.wav")}
    rows = [row("first", good["first"]), *(row(rid, uri) for rid, uri in hanging.items()), row("last", good["last"])]
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-c", HANGING_SHARD, str(CONFIG), json.dumps([*CAPS, "data.file_timeout=1"]),
                           json.dumps(rows), str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert (result["rows_out"], result["rejected"]) == (2, 2), result
    assert result["seconds"] < 30  # two limits of 1 s, not a wait for the test's own timeout
    assert sorted(pq.read_table(out / "shard-00000.parquet").column("id").to_pylist()) == sorted(good)
    rejects = pq.read_table(out / "rejects" / "shard-00000.parquet").to_pylist()
    assert {r["id"]: r["reason"] for r in rejects} == dict.fromkeys(hanging, "timeout")
    assert all("data.file_timeout=1" in r["detail"] for r in rejects)


def test_the_time_limit_says_why_it_is_not_armed_off_the_main_thread_and_restores_the_handler():
    import threading

    from pipelines.core.deadline import TimeLimitExceeded, time_limit

    before = signal.getsignal(signal.SIGALRM)
    with pytest.raises(TimeLimitExceeded, match="the loop did not finish within 0.2 s"):
        with time_limit(0.2, "the loop") as why:
            assert why is None
            while True:
                pass
    assert signal.getsignal(signal.SIGALRM) is before and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    reasons = []
    thread = threading.Thread(target=lambda: reasons.append(time_limit(1).__enter__()))
    thread.start()
    thread.join()
    assert "main thread" in reasons[0]
    with deadline(30), time_limit(1) as why:  # an enclosing timer is left alone
        assert "already armed" in why


# -- manifests and configs ----------------------------------------------------------------------


def test_manifest_rows_with_other_schemes_are_rejects_at_ingest(tmp_path):
    (tmp_path / "m.csv").write_text(
        "id,audio,caption\nlocal,a.wav,one\nremote,s3://b/a.wav,two\nmeta,http://169.254.169.254/x.wav,three\n"
        "web,https://example.com/a.wav,four\nchain,simplecache::s3://b/a.wav,five\n")
    m = read_manifest(str(tmp_path / "m.csv"), allowed_schemes=("file", "s3"))
    assert [r["id"] for r in m.rows] == ["local", "remote"]
    assert {r["id"]: r["reason"] for r in m.rejects} == {"meta": "scheme_not_allowed", "web": "scheme_not_allowed",
                                                         "chain": "scheme_not_allowed"}
    allowed = read_manifest(str(tmp_path / "m.csv"), allowed_schemes=("file", "s3", "https", "simplecache"))
    assert [r["id"] for r in allowed.rows] == ["local", "remote", "web", "chain"]


@pytest.mark.parametrize("override, key", [
    ("data.manifest=http://169.254.169.254/m.csv", "data.manifest"),
    ("data.audio_dir=https://example.com/audio", "data.audio_dir"),
    ("data.allowed_schemes=[]", "data.allowed_schemes"),
    ("data.max_file_mb=0", "data.max_file_mb"),
    ("data.max_sample_rate=0", "data.max_sample_rate"),
    ("data.max_channels=0", "data.max_channels"),
    ("data.read_timeout=0", "data.read_timeout"),
    ("data.file_timeout=-1", "data.file_timeout"),
])
def test_a_config_outside_the_bounds_names_its_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_pipeline_config(CONFIG, [override])
    assert e.value.key == key


def test_a_scheme_added_to_allowed_schemes_is_accepted():
    c = load_pipeline_config(CONFIG, ["data.allowed_schemes=[file,s3,https]", "data.manifest=https://x/m.csv"])
    assert c.data.allowed_schemes == ("file", "s3", "https")


# -- served requests ----------------------------------------------------------------------------


def request(n: int = 1, **columns) -> pd.DataFrame:
    return pd.DataFrame({"caption": [f"a dog barks {i}" for i in range(n)], **columns})


@pytest.mark.parametrize("frame, words", [
    (request(MAX_REQUEST_ROWS + 1), ["rows", f"{MAX_REQUEST_ROWS + 1} rows", f"at most {MAX_REQUEST_ROWS}"]),
    (request(2, steps=[10, 5000]), ["steps", "row 1", "5000", "[1, 1000]"]),
    (request(1, steps=[0]), ["steps", "[1, 1000]"]),
    (request(2, duration=[1.0, 3600.0]), ["duration", "row 1", "3600", "(0, 600]"]),
    (request(1, duration=[float("inf")]), ["duration", "inf"]),
    (request(1, duration=[-1.0]), ["duration", "(0, 600]"]),
    (request(1, steps=["many"]), ["steps", "'many'", "not a number"]),
    (pd.DataFrame({"text": ["a dog"]}), ["caption"]),
])
def test_a_request_over_a_limit_is_a_400_naming_the_column_and_the_limit(frame, words):
    with pytest.raises(MlflowException) as e:
        check_request(frame)
    assert e.value.error_code == ErrorCode.Name(INVALID_PARAMETER_VALUE)
    assert e.value.get_http_status_code() == 400
    for w in words:
        assert w in e.value.message


def test_a_request_within_the_limits_passes():
    check_request(request(MAX_REQUEST_ROWS, steps=[None, *[1000] * (MAX_REQUEST_ROWS - 1)],
                          duration=[float("nan"), *[600.0] * (MAX_REQUEST_ROWS - 1)]))
    check_request({"caption": ["one"], "steps": [10]})  # what pandas.DataFrame takes
    with pytest.raises(MlflowException, match="steps"):
        check_request(request(1, steps=[20]), max_steps=10)


# -- evaluation ---------------------------------------------------------------------------------


def write_audio_table(folder: Path, files: int, rows: int, samples: int) -> None:
    rng = np.random.default_rng(0)
    splits = ["train", "test", "validation"]
    for f in range(files):
        recs = [{"id": f"clip-{(f * 7 + r * 3) % 40:03d}", "caption": f"caption {f}.{r}", "split": splits[(f + r) % 3],
                 "attributes": json.dumps({"k": r % 2}), "waveform": rng.standard_normal(samples).astype(np.float32),
                 "valid_samples": samples, "mel": rng.standard_normal(8 * 4).astype(np.float32), "n_mels": 8,
                 "frames": 4} for r in range(rows)]
        storage.write_parquet(str(folder / f"shard-{f:05d}.parquet"), pa.Table.from_pylist(recs))


def load_clips_whole_table(audio_dir: str, splits: tuple[str, ...], limit: int) -> list[dict]:
    """The stage's loader as it was: every row of every file, then the first ``limit`` by id."""
    rows = []
    cols = ["id", "caption", "split", "attributes", "waveform", "valid_samples", "mel", "n_mels", "frames"]
    for uri in storage.list_files(audio_dir, ".parquet"):
        rows += [r for r in storage.read_parquet_file(uri, cols).to_pylist() if r["split"] in splits]
    rows.sort(key=lambda r: r["id"])
    return [{"id": r["id"], "caption": r["caption"], "split": r["split"], "attributes": json.loads(r["attributes"]),
             "waveform": np.asarray(r["waveform"], np.float32),
             "mel": np.asarray(r["mel"], np.float32).reshape(r["n_mels"], r["frames"])} for r in rows[:limit]]


@pytest.mark.parametrize("splits, limit", [(("test", "validation"), 7), (("train",), 100), (("test",), 0)])
def test_evaluation_loads_the_same_clips_in_the_same_order(tmp_path, splits, limit):
    write_audio_table(tmp_path, files=4, rows=10, samples=50)  # ids repeat across files: ties keep file order
    got, want = load_clips(str(tmp_path), splits, limit), load_clips_whole_table(str(tmp_path), splits, limit)
    assert [c["id"] for c in got] == [c["id"] for c in want] and [c["caption"] for c in got] == [c["caption"] for c in want]
    for a, b in zip(got, want, strict=True):
        assert a["split"] == b["split"] and a["attributes"] == b["attributes"]
        np.testing.assert_array_equal(a["waveform"], b["waveform"])
        np.testing.assert_array_equal(a["mel"], b["mel"])


def test_evaluation_holds_the_clips_it_scores_not_the_audio_table(tmp_path):
    write_audio_table(tmp_path, files=4, rows=32, samples=8000)  # 128 clips, ~33 MB as Python floats
    tracemalloc.start()
    try:
        held = load_clips(str(tmp_path), ("test", "validation"), 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(held) == 2
    assert peak < 4 * 2**20, f"{peak / 2**20:.1f} MiB to load 2 clips"
