"""Manifests: CSV / JSONL / Parquet tables of (audio, caption) → clean rows plus rejects.

Three layouts are read as they are published:

* generic: ``audio`` (path or URI) and ``caption``, optional ``id`` and ``split``;
* AudioCaps: ``audiocap_id, youtube_id, start_time, caption``;
* Clotho: ``file_name, caption_1 … caption_5`` (one row per file, all captions kept).

Every row that cannot be used becomes a reject with a reason; every other row comes out. A
caption that is not valid UTF-8 rejects its row, not the file: CSV and JSONL are decoded
with ``surrogateescape`` so the bad bytes are found per field.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import fsspec

SPLITS = ("train", "validation", "test")
# Columns with a meaning; any other column is kept as an attribute of the clip.
_KNOWN = {"id", "audio", "caption", "split", "audiocap_id", "youtube_id", "start_time", "file_name",
          *(f"caption_{i}" for i in range(1, 6))}
_SPLIT_ALIASES = {"train": "train", "training": "train", "development": "train", "dev": "train",
                  "val": "validation", "valid": "validation", "validation": "validation",
                  "test": "test", "eval": "test", "evaluation": "test"}


@dataclass
class Manifest:
    """Parsed manifest: ``rows`` (id, audio_uri, caption, captions, split) and ``rejects``."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    layout: str = "generic"


def stable_id(*parts: str) -> str:
    """A 16-hex id derived from the input, so a re-run gives the same ids."""
    return hashlib.sha1("\x1f".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def resolve(path: str, base: str) -> str:
    """A manifest's audio path: absolute paths and URIs as they are, others under ``base``."""
    if "://" in path or path.startswith("/") or not base:
        return path
    if is_remote(base):
        return posixpath.join(base.rstrip("/"), path)
    return posixpath.normpath(posixpath.join(base, path))


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if "/" in uri else "."


def _valid_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # surrogate-escaped bytes: not UTF-8 in the file
        return False


def clean_caption(text: Any, max_chars: int) -> tuple[str | None, str | None]:
    """(caption, None) or (None, reason). Whitespace is normalised; overlong text is cut at a word."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption_not_utf8"
    if text is None or (isinstance(text, float) and text != text):  # None or NaN from pandas/pyarrow
        return None, "missing_caption"
    text = str(text)
    if not _valid_utf8(text):
        return None, "caption_not_utf8"
    text = re.sub(r"\s+", " ", text).strip()
    if not text:
        return None, "missing_caption"
    if len(text) > max_chars:
        cut = text[:max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
    return text, None


def _split_from_name(uri: str) -> str:
    stem = posixpath.basename(uri).lower()
    for token in re.split(r"[^a-z]+", stem):
        if token in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[token]
    return "train"


def read_records(uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Raw records of a CSV / JSONL / Parquet file, and rows that could not even be parsed."""
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    lower = uri.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist(), []
    text = data.decode("utf-8", "surrogateescape").lstrip("\ufeff")
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        records, bad = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                records.append(rec)
            except ValueError as e:
                bad.append({"id": f"line-{n}", "audio_uri": "", "reason": "bad_manifest_row",
                            "detail": str(e)[:200]})
        return records, bad
    return list(csv.DictReader(io.StringIO(text))), []


def detect_layout(columns: Iterable[str]) -> str:
    cols = set(columns)
    if {"youtube_id", "caption"} <= cols and ("audiocap_id" in cols or "start_time" in cols):
        return "audiocaps"
    if "file_name" in cols and "caption_1" in cols:
        return "clotho"
    if "audio" in cols:
        return "generic"
    raise ValueError(f"cannot tell the manifest layout from its columns {sorted(cols)}: "
                     "expected audio+caption, the AudioCaps CSV or the Clotho CSV")


def read_manifest(uri: str, *, layout: str = "auto", audio_dir: str = "",
                  audiocaps_pattern: str = "{youtube_id}.wav", max_caption_chars: int = 512) -> Manifest:
    """Read a manifest into clean rows and rejects (see the module docstring)."""
    records, rejects = read_records(uri)
    if layout == "auto":
        layout = detect_layout(records[0].keys()) if records else "generic"
    base = audio_dir or _parent(uri)
    default_split = _split_from_name(uri)
    out = Manifest(rejects=rejects, layout=layout)
    seen: set[str] = set()
    for n, rec in enumerate(records, 1):
        if None in rec:  # csv.DictReader puts a row's surplus fields (an unquoted comma) under None
            out.rejects.append({"id": f"row-{n}", "audio_uri": "", "reason": "bad_manifest_row",
                                "detail": f"{len(rec) - 1 + len(rec[None])} fields, header has {len(rec) - 1}"})
            continue
        if layout == "audiocaps":
            audio = audiocaps_pattern.format(**{k: str(v) for k, v in rec.items()})
            rid = str(rec.get("audiocap_id") or stable_id(audio, str(rec.get("caption"))))
            raw_captions = [rec.get("caption")]
        elif layout == "clotho":
            audio = str(rec.get("file_name") or "")
            rid = stable_id("clotho", audio)
            raw_captions = [rec[k] for k in sorted(rec) if k.startswith("caption_")]
        else:
            audio = rec.get("audio")
            audio = "" if audio is None else str(audio)
            raw_captions = [rec.get("caption")]
            rid = rec.get("id")
            rid = str(rid) if rid not in (None, "") else stable_id(audio, str(rec.get("caption")))
        audio_uri = resolve(audio, base) if audio else ""
        reject = {"id": rid, "audio_uri": audio_uri}
        if not _valid_utf8(rid) or not _valid_utf8(audio):
            out.rejects.append({**reject, "id": stable_id(rid), "reason": "bad_manifest_row",
                                "detail": "id or path is not valid UTF-8"})
            continue
        if not audio:
            out.rejects.append({**reject, "reason": "missing_audio_path", "detail": ""})
            continue
        cleaned = [clean_caption(c, max_caption_chars) for c in raw_captions]
        captions = [c for c, _ in cleaned if c is not None]
        if not captions:
            out.rejects.append({**reject, "reason": cleaned[0][1], "detail": ""})
            continue
        if rid in seen:
            out.rejects.append({**reject, "reason": "duplicate_id", "detail": "first occurrence kept"})
            continue
        seen.add(rid)
        split = _SPLIT_ALIASES.get(str(rec.get("split") or "").strip().lower(), default_split)
        extra = {k: v for k, v in rec.items() if k not in _KNOWN and v not in (None, "") and v == v}
        out.rows.append({"id": rid, "audio_uri": audio_uri, "caption": captions[0], "captions": captions,
                         "split": split, "attributes": json.dumps(extra, sort_keys=True, default=str)})
    return out
