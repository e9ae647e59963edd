"""Manifests: what a data set holds, read into clean rows (id, audio_uri, caption(s), split) plus rejects.

A manifest is a file or a directory, local or remote (``s3://…``, through fsspec).

Files (CSV / JSONL / Parquet) are read in three layouts, as they are published:

* ``generic``: ``audio`` (path or URI) and ``caption``, optional ``id`` and ``split``;
* ``audiocaps``: ``audiocap_id, youtube_id, start_time, caption``;
* ``clotho``: ``file_name, caption_1 … caption_5`` (one row per file, all captions kept).

Directories are read by :mod:`lafma.data.folders` in two layouts:

* ``audiofolder``: Hugging Face's, a ``metadata.csv`` / ``metadata.jsonl`` whose ``file_name``
  names the audio beside it;
* ``textfiles``: audio files each with a same-named ``.txt`` of captions (``dog.wav``, ``dog.txt``).

A row's split comes from its ``split`` column, else its split sub-folder (``train/``, ``val/``…,
directories only), else the manifest's file name (``clotho_captions_evaluation.csv`` → test).
When none of them names one the split is ``""``: unknown, not a guessed "train", so that a later
stage can hold rows out on purpose. ``Manifest.split_source`` says which of them gave the splits.

Every row that cannot be used becomes a reject with a reason; every other row comes out. A
caption that is not valid UTF-8 rejects its row, not the file: CSV and JSONL are decoded
with ``surrogateescape`` so the bad bytes are found per field.

:func:`manifest_digest` is what a re-run compares to know whether the data changed.
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
FILE_LAYOUTS = ("generic", "audiocaps", "clotho")
FOLDER_LAYOUTS = ("audiofolder", "textfiles")
# Values of Manifest.split_source; "mixed" when rows got their splits from different places.
SPLIT_SOURCES = ("column", "folders", "file name", "none", "mixed")
# Columns with a meaning; any other column is kept as an attribute of the clip.
_KNOWN = {"id", "audio", "caption", "split", "audiocap_id", "youtube_id", "start_time", "file_name",
          *(f"caption_{i}" for i in range(1, 6))}
# Clotho calls its training split "development"; "dev" is a validation split nearly everywhere
# else (LibriSpeech's dev-clean, Hugging Face's audio data sets).
_SPLIT_ALIASES = {"train": "train", "training": "train", "development": "train", "dev": "validation",
                  "val": "validation", "valid": "validation", "validation": "validation",
                  "test": "test", "testing": "test", "eval": "test", "evaluation": "test"}


@dataclass
class Manifest:
    """Parsed manifest.

    Attributes:
        rows: dicts of ``id, audio_uri, caption, captions, split, attributes`` (JSON text);
            ``split`` is one of :data:`SPLITS` or ``""`` (unknown).
        rejects: dicts of ``id, audio_uri, reason, detail``.
        layout: one of :data:`FILE_LAYOUTS` or :data:`FOLDER_LAYOUTS`.
        split_source: where the rows' splits came from, one of :data:`SPLIT_SOURCES`.
    """

    rows: list[dict[str, Any]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    layout: str = "generic"
    split_source: str = "none"


def stable_id(*parts: str) -> str:
    """A 16-hex id derived from the input, so a re-run gives the same ids."""
    return hashlib.sha1("\x1f".join(parts).encode("utf-8", "surrogateescape")).hexdigest()[:16]


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def uri_schemes(uri: str) -> tuple[str, ...]:
    """The schemes fsspec would read ``uri`` through, outermost first: ``("file",)`` for a plain
    path, ``("s3",)`` for ``s3://b/k``, ``("simplecache", "s3")`` for a chained
    ``simplecache::s3://b/k`` (every link of a chain opens something, so every link counts)."""
    parts = uri.split("::")
    out = []
    for i, part in enumerate(parts):
        if "://" in part:
            out.append(part.split("://", 1)[0].lower())
        else:  # a bare protocol name links a chain; only the last link may be a plain path
            out.append(part.lower() if i < len(parts) - 1 else "file")
    return tuple(out)


def scheme_refusal(uri: str, allowed: Iterable[str]) -> str | None:
    """Why ``uri`` may not be read under the ``allowed`` schemes (``"http:// is not allowed
    (allowed: file, s3)"``), or None when it may."""
    allowed = tuple(allowed)
    bad = [s for s in uri_schemes(uri) if s not in allowed]
    if not bad:
        return None
    return f"{bad[0]}:// is not allowed (allowed: {', '.join(allowed)})"


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


def split_alias(value: Any) -> str:
    """The split a ``split`` cell names (``"val"`` → ``"validation"``), or ``""``."""
    return _SPLIT_ALIASES.get(str(value or "").strip().lower(), "")


def pick_split(*candidates: tuple[str, str]) -> tuple[str, str]:
    """The first ``(split, source)`` whose split is known, else ``("", "none")``."""
    return next((c for c in candidates if c[0]), ("", "none"))


def _split_from_name(uri: str) -> str:
    stem = posixpath.basename(uri).lower()
    for token in re.split(r"[^a-z]+", stem):
        if token in _SPLIT_ALIASES:
            return _SPLIT_ALIASES[token]
    return ""


def parse_records(data: bytes, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Raw records of CSV / JSONL / Parquet bytes (format from ``name``), and unparsable rows."""
    lower = name.lower()
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


def read_records(uri: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Raw records of a CSV / JSONL / Parquet file, and rows that could not even be parsed."""
    with fsspec.open(uri, "rb") as f:
        data = f.read()
    return parse_records(data, uri)


def surplus_fields(rec: dict[str, Any], rid: str) -> dict[str, Any] | None:
    """The reject of a CSV row with more fields than its header, else None."""
    if None not in rec:  # csv.DictReader puts a row's surplus fields (an unquoted comma) under None
        return None
    return {"id": rid, "audio_uri": "", "reason": "bad_manifest_row",
            "detail": f"{len(rec) - 1 + len(rec[None])} fields, header has {len(rec) - 1}"}


class ManifestBuilder:
    """Collects rows and rejects with the checks every layout shares, and where splits came from."""

    def __init__(self, layout: str, max_caption_chars: int, rejects: Iterable[dict[str, Any]] = (),
                 allowed_schemes: Iterable[str] | None = None):
        self.manifest = Manifest(rejects=list(rejects), layout=layout)
        self.max_caption_chars = max_caption_chars
        # None: any scheme (the caller checks later); else a row naming another is rejected.
        self.allowed_schemes = None if allowed_schemes is None else tuple(allowed_schemes)
        self._seen: set[str] = set()
        self._sources: set[str] = set()

    def reject(self, rid: str, audio_uri: str, reason: str, detail: str = "") -> None:
        self.manifest.rejects.append({"id": rid, "audio_uri": audio_uri, "reason": reason, "detail": detail})

    def add(self, *, rid: str, audio: str, audio_uri: str, captions: list[Any], split: tuple[str, str],
            attributes: dict[str, Any]) -> None:
        """Add one row, or its reject.

        Args:
            rid: the row's id.
            audio: its audio path as the manifest writes it ("" when it names none).
            audio_uri: where that audio is.
            captions: raw caption cells; the row keeps those :func:`clean_caption` accepts.
            split: ``(split, source)`` from :func:`pick_split`.
            attributes: other columns; empty cells are dropped.
        """
        if not _valid_utf8(rid) or not _valid_utf8(audio):
            return self.reject(stable_id(rid), audio_uri, "bad_manifest_row", "id or path is not valid UTF-8")
        if not audio:
            return self.reject(rid, audio_uri, "missing_audio_path")
        # A manifest is data, not configuration: a row naming http://169.254.169.254/... must not
        # make a worker fetch it from inside the network.
        if self.allowed_schemes is not None and (why := scheme_refusal(audio_uri, self.allowed_schemes)):
            return self.reject(rid, audio_uri, "scheme_not_allowed", why)
        cleaned = [clean_caption(c, self.max_caption_chars) for c in captions]
        kept = [c for c, _ in cleaned if c is not None]
        if not kept:
            return self.reject(rid, audio_uri, cleaned[0][1] if cleaned else "missing_caption")
        if rid in self._seen:
            return self.reject(rid, audio_uri, "duplicate_id", "first occurrence kept")
        self._seen.add(rid)
        self._sources.add(split[1])
        extra = {k: v for k, v in attributes.items() if v not in (None, "") and v == v}  # v != v: NaN
        self.manifest.rows.append({"id": rid, "audio_uri": audio_uri, "caption": kept[0], "captions": kept,
                                   "split": split[0], "attributes": json.dumps(extra, sort_keys=True, default=str)})

    def build(self) -> Manifest:
        sources = self._sources or {"none"}
        self.manifest.split_source = sources.pop() if len(sources) == 1 else "mixed"
        return self.manifest


def detect_layout(columns: Iterable[str]) -> str:
    """The file layout a table with these columns is in (see the module docstring)."""
    cols = set(columns)
    if {"youtube_id", "caption"} <= cols and ("audiocap_id" in cols or "start_time" in cols):
        return "audiocaps"
    if "file_name" in cols and "caption_1" in cols:
        return "clotho"
    if "audio" in cols:
        return "generic"
    raise ValueError(f"cannot tell the manifest layout from its columns {sorted(cols)}: "
                     "expected audio+caption, the AudioCaps CSV or the Clotho CSV")


def _is_dir(uri: str) -> bool:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs.isdir(path)


# lafma.data.folders builds on this module's pieces, so it is imported where it is used.


def layout_of(uri: str) -> str:
    """The layout ``read_manifest(uri)`` reads: a directory's from its files, a file's from its columns.

    Raises:
        ValueError: a directory in neither folder layout, or a table in no file layout.
    """
    if _is_dir(uri):
        from lafma.data.folders import folder_layout, list_folder

        return folder_layout(list_folder(uri))
    records, _ = read_records(uri)
    return detect_layout(records[0].keys()) if records else "generic"


def manifest_digest(uri: str) -> str:
    """The sha256 hex of what a manifest is, for stage keys: a re-run with the same digest has the same data.

    A file's digest is the sha256 of its bytes. A directory's covers the sorted relative paths
    of its metadata, caption and audio files, with the bytes of each metadata and caption file
    and the size of each audio file — not mtimes (a copy keeps its digest), not audio bytes
    (reading a whole corpus to hash it would cost as much as ingesting it).
    """
    if _is_dir(uri):
        from lafma.data.folders import folder_digest

        return folder_digest(uri)
    h = hashlib.sha256()
    with fsspec.open(uri, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(uri: str, *, layout: str = "auto", audio_dir: str = "",
                  audiocaps_pattern: str = "{youtube_id}.wav", max_caption_chars: int = 512,
                  allowed_schemes: Iterable[str] | None = None) -> Manifest:
    """Read a manifest file or directory into clean rows and rejects (see the module docstring).

    Args:
        uri: a CSV / JSONL / Parquet file, or a directory in a folder layout.
        layout: ``"auto"``, one of :data:`FILE_LAYOUTS` (files) or :data:`FOLDER_LAYOUTS` (directories).
        audio_dir: where a file's relative audio paths resolve (default: the file's directory);
            a directory's audio is inside it, so it takes none.
        audiocaps_pattern: an AudioCaps row's audio file name, from its columns.
        max_caption_chars: longer captions are cut at a word.
        allowed_schemes: a file's rows whose audio URI has another scheme (:func:`uri_schemes`)
            are rejected as ``scheme_not_allowed``; None accepts any. A directory's audio lies
            inside it, under its own scheme.

    Raises:
        ValueError: a layout that does not fit ``uri``, or one that cannot be told.
    """
    if _is_dir(uri):
        if layout not in ("auto", *FOLDER_LAYOUTS):
            raise ValueError(f"{uri} is a directory; layout {layout!r} is for a manifest file: "
                             f"use 'auto' or one of {FOLDER_LAYOUTS}, or point at the file")
        if audio_dir:
            raise ValueError(f"audio_dir does not apply to a directory manifest ({uri}): its audio is inside it")
        from lafma.data.folders import read_folder

        return read_folder(uri, layout=layout, max_caption_chars=max_caption_chars)
    if layout in FOLDER_LAYOUTS:
        raise ValueError(f"layout {layout!r} is for a directory, but {uri} is a file")
    records, rejects = read_records(uri)
    if layout == "auto":
        layout = detect_layout(records[0].keys()) if records else "generic"
    base = audio_dir or _parent(uri)
    name_split = (_split_from_name(uri), "file name")
    out = ManifestBuilder(layout, max_caption_chars, rejects, allowed_schemes)
    for n, rec in enumerate(records, 1):
        if (bad := surplus_fields(rec, f"row-{n}")) is not None:
            out.manifest.rejects.append(bad)
            continue
        if layout == "audiocaps":
            audio = audiocaps_pattern.format(**{k: str(v) for k, v in rec.items()})
            rid = str(rec.get("audiocap_id") or stable_id(audio, str(rec.get("caption"))))
            captions = [rec.get("caption")]
        elif layout == "clotho":
            audio = str(rec.get("file_name") or "")
            rid = stable_id("clotho", audio)
            captions = [rec[k] for k in sorted(rec) if k.startswith("caption_")]
        else:
            audio = rec.get("audio")
            audio = "" if audio is None else str(audio)
            captions = [rec.get("caption")]
            rid = rec.get("id")
            rid = str(rid) if rid not in (None, "") else stable_id(audio, str(rec.get("caption")))
        out.add(rid=rid, audio=audio, audio_uri=resolve(audio, base) if audio else "", captions=captions,
                split=pick_split((split_alias(rec.get("split")), "column"), name_split),
                attributes={k: v for k, v in rec.items() if k not in _KNOWN})
    return out.build()
