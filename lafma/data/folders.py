"""Directory manifests: a Hugging Face ``audiofolder``, or audio files with their captions beside them.

``audiofolder``: ``metadata.csv`` or ``metadata.jsonl`` files (at the top, in split sub-folders,
at any depth) whose ``file_name`` column names an audio file relative to the metadata file,
and whose first column among :data:`CAPTION_COLUMNS` holds the caption(s); other columns are
kept as attributes. An audio file that no metadata row names is rejected (``missing_caption``)
rather than dropped unseen.

``textfiles``: every audio file (:data:`AUDIO_EXTENSIONS`) with a same-named ``.txt`` beside it,
one caption per non-empty line (``dog.wav`` + ``dog.txt``), in any sub-folder. A row's id is
:func:`~lafma.data.manifest.stable_id` of its path relative to the folder, so it survives a move.

In both, a top-level sub-folder named for a split (``train/``, ``val/``, ``test-clean/``…) gives
the split of the files under it (a ``split`` column wins over it). Hidden files and folders
(``.DS_Store``, macOS ``._dog.wav`` forks) are skipped, as Hugging Face skips them. Folders are
listed with fsspec's ``find``, so ``s3://…`` works as a local path does; rows come out in
sorted path order, the same on every machine.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any, NamedTuple

import fsspec

from lafma.data.manifest import (
    _SPLIT_ALIASES,
    Manifest,
    ManifestBuilder,
    parse_records,
    pick_split,
    split_alias,
    stable_id,
    surplus_fields,
)

# What libsndfile decodes, by the extensions its formats are saved under. Left out: .raw (needs
# its format given), .mat (MATLAB data far more often than MAT4/MAT5 audio), .mpc (Musepack far
# more often than MPC2K), .sf (ambiguous).
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc",
                    ".au", ".snd", ".w64", ".rf64", ".caf", ".sph", ".nist", ".voc", ".paf", ".svx",
                    ".8svx", ".sd2", ".xi", ".htk", ".avr", ".pvf", ".sds", ".wve")
METADATA_NAMES = ("metadata.csv", "metadata.jsonl")
# Hugging Face audio data sets name their text column in all these ways; the first present wins.
CAPTION_COLUMNS = ("caption", "text", "transcription", "sentence", "description", "captions")
# A split folder is its split's name, alone or followed by a separator ("train-clean-100", "test_0").
_SPLIT_FOLDER = re.compile(r"([a-z]+)(?:[-._ 0-9].*)?")


class _File(NamedTuple):
    size: int
    regular: bool  # a FIFO or device would block a read: such a file is never opened here


@dataclass(frozen=True)
class Listing:
    """The files under a folder, by path relative to it (sorted, hidden ones skipped)."""

    uri: str  # the folder as given, no trailing slash: audio URIs are built on it
    fs: fsspec.AbstractFileSystem
    root: str  # the folder's path on ``fs``
    files: dict[str, _File]

    @cached_property
    def metadata(self) -> list[str]:
        return [rel for rel, f in self.files.items() if posixpath.basename(rel) in METADATA_NAMES and f.regular]

    @cached_property
    def audio(self) -> list[str]:
        return [rel for rel in self.files if rel.lower().endswith(AUDIO_EXTENSIONS)]

    def caption_file(self, audio_rel: str) -> str | None:
        """The ``.txt`` beside an audio file, if there is one."""
        txt = posixpath.splitext(audio_rel)[0] + ".txt"
        return txt if txt in self.files else None

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def read(self, rels: list[str]) -> dict[str, bytes | Exception]:
        """The bytes of each file, or why they could not be read (one bad file fails none other)."""
        todo = [rel for rel in rels if self.files[rel].regular]
        # cat_ranges, not cat: cat globs its paths, and "dog [1].txt" is a file name, not a pattern.
        blobs = self.fs.cat_ranges([f"{self.root}/{rel}" for rel in todo], [None] * len(todo),
                                   [None] * len(todo), on_error="return") if todo else []
        out: dict[str, bytes | Exception] = {rel: OSError("not a regular file") for rel in rels}
        out.update(zip(todo, blobs))
        return out


def list_folder(uri: str) -> Listing:
    """Every file under ``uri`` (local or remote), by relative path, in sorted order."""
    fs, root = fsspec.core.url_to_fs(uri)
    root = root.rstrip("/")
    files: dict[str, _File] = {}
    for name, info in fs.find(root, withdirs=False, detail=True).items():
        rel = name[len(root) + 1:] if name.startswith(root + "/") else ""
        # An S3 key ending in "/" is a console-made "folder", not a file.
        if not rel or rel.endswith("/") or any(p.startswith(".") for p in rel.split("/")):
            continue
        if info.get("islink"):  # the local listing types a link "other": look through it
            try:
                info = fs.info(name)
            except OSError:
                info = {**info, "type": "other"}  # dangling: the audio stage rejects it as missing
        if info.get("type") == "directory":
            continue  # a linked folder is not followed: a link can loop
        files[rel] = _File(int(info.get("size") or 0), info.get("type") == "file")
    return Listing(uri.rstrip("/"), fs, root, dict(sorted(files.items())))


def _folder_split(rel: str) -> str:
    top, sep, _ = rel.partition("/")
    m = _SPLIT_FOLDER.fullmatch(top.lower()) if sep else None
    return _SPLIT_ALIASES.get(m.group(1), "") if m else ""


def _found(listing: Listing) -> str:
    if not listing.files:
        return "it is empty"
    exts = Counter(posixpath.splitext(rel)[1].lower() or "(no extension)" for rel in listing.files)
    kinds = ", ".join(f"{n} {ext}" for ext, n in sorted(exts.items(), key=lambda kv: (-kv[1], kv[0]))[:8])
    audio = len(listing.audio)
    beside = sum(1 for rel in listing.audio if listing.caption_file(rel))
    return f"found {len(listing.files)} files ({kinds})" + (
        f"; {beside} of its {audio} audio files have a .txt beside them" if audio else "; no audio files")


def folder_layout(listing: Listing) -> str:
    """``"audiofolder"`` when the folder has metadata files, ``"textfiles"`` when it has audio with
    captions beside it (metadata wins when it has both: it is the explicit description).

    Raises:
        ValueError: neither, naming what was looked for and what was found.
    """
    if listing.metadata:
        return "audiofolder"
    if any(listing.caption_file(rel) for rel in listing.audio):
        return "textfiles"
    raise ValueError(f"cannot tell the layout of the directory {listing.uri}: looked for "
                     f"{' or '.join(METADATA_NAMES)} (a Hugging Face audiofolder) and for audio files with "
                     f"a same-named .txt beside them (textfiles); {_found(listing)}")


def read_folder(uri: str, *, layout: str = "auto", max_caption_chars: int = 512) -> Manifest:
    """Read a directory manifest (see the module docstring).

    Args:
        uri: the folder, local or remote.
        layout: ``"auto"``, ``"audiofolder"`` or ``"textfiles"``.
        max_caption_chars: longer captions are cut at a word.

    Raises:
        ValueError: the layout cannot be told, or the folder lacks what ``layout`` needs.
    """
    listing = list_folder(uri)
    layout = folder_layout(listing) if layout == "auto" else layout
    out = ManifestBuilder(layout, max_caption_chars)
    if layout == "audiofolder":
        if not listing.metadata:
            raise ValueError(f"{uri} has no {' or '.join(METADATA_NAMES)}: {_found(listing)}")
        _read_audiofolder(listing, out)
    elif layout == "textfiles":
        if not listing.audio:
            raise ValueError(f"{uri} has no audio files: {_found(listing)}")
        _read_textfiles(listing, out)
    else:
        raise ValueError(f"unknown folder layout {layout!r}: expected audiofolder or textfiles")
    return out.build()


def _read_textfiles(listing: Listing, out: ManifestBuilder) -> None:
    texts = listing.read([t for rel in listing.audio if (t := listing.caption_file(rel))])
    for rel in listing.audio:
        rid, audio_uri, txt = stable_id(rel), listing.uri_of(rel), listing.caption_file(rel)
        if txt is None:
            txt = posixpath.basename(posixpath.splitext(rel)[0]) + ".txt"
            out.reject(rid, audio_uri, "missing_caption", f"no {txt} beside it")
            continue
        data = texts[txt]
        if isinstance(data, Exception):
            out.reject(rid, audio_uri, "caption_unreadable", f"{txt}: {data}"[:200])
            continue
        try:
            text = data.decode("utf-8").lstrip("\ufeff")
        except UnicodeDecodeError as e:
            out.reject(rid, audio_uri, "caption_not_utf8", f"{txt}: byte {e.start}")
            continue
        out.add(rid=rid, audio=rel, audio_uri=audio_uri, captions=[ln for ln in text.splitlines() if ln.strip()],
                split=pick_split((_folder_split(rel), "folders")), attributes={})


def _inside(folder: str, name: str) -> str | None:
    """``name`` (relative to ``folder``) as a path relative to the root, or None when it leaves
    the root: such audio would be outside what the folder's digest covers."""
    if not name or name.startswith("/") or "://" in name:
        return None
    rel = posixpath.normpath(posixpath.join(folder, name))
    return None if rel == ".." or rel.startswith("../") else rel


def _caption_cells(value: Any) -> list[Any]:
    """A caption cell as a list: JSONL ``captions`` are lists; in CSV a list is JSON text."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            return [value]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _read_audiofolder(listing: Listing, out: ManifestBuilder) -> None:
    named: set[str] = set()
    blobs = listing.read(listing.metadata)
    for meta in listing.metadata:
        if isinstance(blobs[meta], Exception):
            raise OSError(f"cannot read {listing.uri_of(meta)}: {blobs[meta]}")
        records, bad = parse_records(blobs[meta], meta)
        out.manifest.rejects += [{**r, "id": f"{meta}:{r['id']}"} for r in bad]
        if not records:
            continue
        columns = list(dict.fromkeys(k for rec in records for k in rec if k is not None))
        if "file_name" not in columns:
            raise ValueError(f"{listing.uri_of(meta)} has no file_name column; its columns are {columns}")
        caption = next((c for c in CAPTION_COLUMNS if c in columns), None)
        if caption is None:
            raise ValueError(f"{listing.uri_of(meta)} has no caption column: looked for "
                             f"{', '.join(CAPTION_COLUMNS)}; its columns are {columns}")
        known = {"file_name", caption, "split", "id"}
        for n, rec in enumerate(records, 1):
            if (reject := surplus_fields(rec, f"{meta}:row-{n}")) is not None:
                out.manifest.rejects.append(reject)
                continue
            name = "" if rec.get("file_name") is None else str(rec["file_name"])
            rel = _inside(posixpath.dirname(meta), name)
            if name and rel is None:
                out.reject(stable_id(meta, name), "", "bad_manifest_row",
                           f"file_name {name!r} is not a path inside the folder")
                continue
            named.add(rel or "")
            rid = rec.get("id")
            rid = str(rid) if rid not in (None, "") else stable_id(rel) if rel else f"{meta}:row-{n}"
            out.add(rid=rid, audio=rel or "", audio_uri=listing.uri_of(rel) if rel else "",
                    captions=_caption_cells(rec.get(caption)),
                    split=pick_split((split_alias(rec.get("split")), "column"), (_folder_split(rel or ""), "folders")),
                    attributes={k: v for k, v in rec.items() if k not in known})
    for rel in listing.audio:
        if rel not in named:
            out.reject(stable_id(rel), listing.uri_of(rel), "missing_caption", "no metadata row names it")


def folder_digest(uri: str) -> str:
    """The sha256 hex over a folder's metadata, caption and audio files (see ``manifest_digest``)."""
    listing = list_folder(uri)
    captions = {t for rel in listing.audio if (t := listing.caption_file(rel))}
    blobs = listing.read(sorted({*listing.metadata, *captions}))
    h = hashlib.sha256()
    for rel in sorted({*blobs, *listing.audio}):
        blob = blobs.get(rel)
        if blob is None:
            value = f"size {listing.files[rel].size}"
        elif isinstance(blob, Exception):
            value = "unreadable"  # the read rejects it too; the digest still says the folder is this one
        else:
            value = "sha256 " + hashlib.sha256(blob).hexdigest()
        h.update(f"{rel}\0{value}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
