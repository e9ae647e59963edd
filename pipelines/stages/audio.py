"""Stage 1, audio: decode → mono → 16 kHz → crop / pad / segment → log-mel, as Ray Data tasks.

Output rows: ``id`` (``<source_id>#<k>`` for the k-th segment of a long file), ``source_id``,
``segment``, ``audio_uri``, ``caption``, ``captions``, ``split``, ``attributes``,
``valid_samples``, ``waveform`` (clip_samples float32), ``mel`` (n_mels × frames float32,
row-major, flattened), ``n_mels``, ``frames``. Every unusable file becomes a reject with its
reason; one bad file never fails a shard.
"""

from __future__ import annotations

import functools
import time

import pyarrow as pa

from lafma.audio import AudioError, MelSpectrogram, load_audio
from lafma.config import MelConfig
from lafma.data.clips import ClipRejected, cut_clips
from pipelines.config import DataConfig
from pipelines.core import deadline, storage
from pipelines.core.stage import (
    Stage,
    StageContext,
    arrow_table,
    chunk,
    read_marker,
    rejects_summary,
    rejects_table,
    run_shards,
    write_shard,
)

SCHEMA = pa.schema([
    ("id", pa.string()), ("source_id", pa.string()), ("segment", pa.int32()), ("audio_uri", pa.string()),
    ("caption", pa.string()), ("captions", pa.list_(pa.string())), ("split", pa.string()),
    ("attributes", pa.string()), ("valid_samples", pa.int32()), ("waveform", pa.list_(pa.float32())),
    ("mel", pa.list_(pa.float32())), ("n_mels", pa.int32()), ("frames", pa.int32()),
])


BOUND_KEYS = ("max_file_mb", "max_sample_rate", "max_channels", "allowed_schemes")
DEFAULT_DATA = DataConfig()


@functools.lru_cache(maxsize=4)
def _mel_fn(mel: MelConfig) -> MelSpectrogram:
    return MelSpectrogram.from_config(mel)


def process_file(row: dict, mel: MelConfig, data: DataConfig, clip_samples: int) -> tuple[list[dict], dict | None]:
    """One manifest row → (clip rows, None) or ([], reject).

    Every bound comes before the work it protects: the scheme, the file's type and size before
    a byte is read (:func:`pipelines.core.storage.read_bounded`), the header's rate, channels
    and length before a sample is decoded, and only the audio the clips keep is decoded.
    """
    uri = row["audio_uri"]
    reject = {"id": row["id"], "audio_uri": uri}
    try:
        raw = storage.read_bounded(uri, max_bytes=int(data.max_file_mb * 2**20), allowed_schemes=data.allowed_schemes,
                                   timeout=data.read_timeout)
    except storage.InputRefused as e:
        return [], {**reject, "reason": e.reason, "detail": e.detail[:200]}
    except FileNotFoundError:
        return [], {**reject, "reason": "missing", "detail": "no such file"}
    except (OSError, ValueError) as e:
        return [], {**reject, "reason": "unreadable", "detail": str(e)[:200]}
    # cut_clips keeps the start of a file: one clip (crop) or up to max_segments of them.
    kept_samples = clip_samples * (1 if data.long_clips == "crop" else data.max_segments)
    try:
        wav = load_audio(raw, mel.sample_rate, name=uri, max_seconds=data.max_seconds,
                         max_sample_rate=data.max_sample_rate, max_channels=data.max_channels,
                         decode_seconds=kept_samples / mel.sample_rate)
        clips = cut_clips(wav, sample_rate=mel.sample_rate, clip_samples=clip_samples, min_samples=mel.n_fft,
                          mode=data.long_clips, max_segments=data.max_segments, max_seconds=data.max_seconds,
                          silence_db=data.silence_db)
    except AudioError as e:
        return [], {**reject, "reason": e.reason, "detail": e.detail}
    except ClipRejected as e:
        return [], {**reject, "reason": e.reason, "detail": e.detail}
    segmented = len(clips) > 1 or clips[0].index > 0
    out = []
    for clip in clips:
        m = _mel_fn(mel)(clip.wav)  # (n_mels, frames)
        out.append({**{k: row[k] for k in ("audio_uri", "caption", "captions", "split", "attributes")},
                    "id": f"{row['id']}#{clip.index}" if segmented else row["id"], "source_id": row["id"],
                    "segment": clip.index, "valid_samples": clip.valid_samples,
                    "waveform": clip.wav.numpy(), "mel": m.flatten().numpy(), "n_mels": m.shape[0],
                    "frames": m.shape[1]})
    return out, None


def process_shard(item: dict, *, out_dir: str, mel: MelConfig, data: DataConfig, clip_samples: int) -> dict:
    """One shard of manifest rows → its clips and rejects, written; every file under
    ``data.file_timeout`` (:func:`pipelines.core.deadline.time_limit`)."""
    rows, rejects = [], []
    if (why := deadline.unavailable()) is not None:
        print(f"[audio] shard {item['shard']}: no per-file time limit here ({why})", flush=True)
    for row in item["rows"]:
        reject_row = {"id": row["id"], "audio_uri": row["audio_uri"]}
        try:
            with deadline.time_limit(data.file_timeout, f"reading and decoding {row['audio_uri']}"):
                clips, reject = process_file(row, mel, data, clip_samples)
        except deadline.TimeLimitExceeded:
            clips, reject = [], {**reject_row, "reason": "timeout",
                                 "detail": f"not read and decoded within data.file_timeout={data.file_timeout:g} s"}
        except Exception as e:  # noqa: BLE001 — one bad file never fails a shard (the data contract)
            clips, reject = [], {**reject_row, "reason": "error", "detail": f"{type(e).__name__}: {e}"[:300]}
        rows += clips
        if reject:
            rejects.append(reject)
    table = arrow_table(rows, SCHEMA)
    write_shard(out_dir, int(item["shard"]), table, rejects_table(rejects))
    return {"shard": item["shard"], "rows_out": len(rows), "rejected": len(rejects)}


def padded_clips(ctx: StageContext) -> int:
    """Clips of the finished audio stage shorter than the clip length (0 if it has not run):
    its marker's count, or for a stage written before it recorded one, counted from the table."""
    marker = read_marker(out := ctx.outputs["audio"])
    if marker is None:
        return 0
    if "padded_clips" in marker:
        return int(marker["padded_clips"])
    valid = storage.read_parquet_dir(out, columns=["valid_samples"]).column("valid_samples").to_pylist()
    return sum(v < ctx.cfg.clip_samples for v in valid)


class AudioStage(Stage):
    name = "audio"
    needs = ("ingest",)

    def key(self, ctx: StageContext) -> dict:
        d = ctx.cfg.data
        return {"ingest": ctx.hashes["ingest"], "mel": ctx.cfg.mel, "clip_seconds": ctx.cfg.audio.clip_seconds,
                "long_clips": d.long_clips, "max_segments": d.max_segments, "max_seconds": d.max_seconds,
                "silence_db": d.silence_db, "shard_size": d.shard_size,
                # The input bounds decide what is rejected; at their defaults they keep the key an
                # audio stage had before they existed, so its output is not computed again.
                **{k: getattr(d, k) for k in BOUND_KEYS if getattr(d, k) != getattr(DEFAULT_DATA, k)}}

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        manifest = storage.read_parquet_dir(ctx.outputs["ingest"]).to_pylist()
        shards = chunk(manifest, ctx.cfg.data.shard_size)
        start = time.time()
        run_shards(out_dir, shards, process_shard, label="audio", num_cpus=ctx.cfg.compute.audio_task_cpus,
                   fn_kwargs={"out_dir": out_dir, "mel": ctx.cfg.mel, "data": ctx.cfg.data,
                              "clip_samples": ctx.cfg.clip_samples})
        seconds = time.time() - start
        table = storage.read_parquet_dir(out_dir, columns=["valid_samples", "split"])
        rejected, reasons = rejects_summary(out_dir)
        audio_hours = sum(table.column("valid_samples").to_pylist()) / ctx.cfg.mel.sample_rate / 3600
        padded = sum(v < ctx.cfg.clip_samples for v in table.column("valid_samples").to_pylist())
        return {"rows_in": len(manifest), "rows": table.num_rows, "rejected": rejected, "reasons": reasons,
                "padded_clips": padded, "audio_hours": round(audio_hours, 4), "seconds": round(seconds, 2),
                "audio_seconds_per_second": round(audio_hours * 3600 / max(seconds, 1e-9), 1)}

    def resources(self, ctx: StageContext) -> list:
        from pipelines.core.preflight import Request

        return [Request("audio tasks", 1, ctx.cfg.compute.audio_task_cpus, 0.0, "", "compute.audio_task_cpus", "",
                        together=False)]

    def summary(self, info: dict) -> list[str]:
        if "audio_hours" not in info:
            return []
        return [f"{info['audio_hours']:.3f} h of audio, {info.get('audio_seconds_per_second', 0)}x real time"]
