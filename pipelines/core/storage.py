"""One storage root, local path or ``s3://bucket/prefix``, through fsspec.

Credentials and a custom S3 endpoint come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), never from configs.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from lafma.data.manifest import is_remote  # noqa: F401 — one definition, re-exported


def fs_and_path(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(root: str, *parts: str) -> str:
    if is_remote(root):
        return posixpath.join(root.rstrip("/"), *parts)
    return os.path.join(root, *parts)


def absolute(root: str) -> str:
    return root if is_remote(root) else os.path.abspath(root)


def _fresh(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Forget what this process cached about ``path``: s3fs keeps directory listings per process,
    and the files a stage looks for (shards, markers) are written by other processes (Ray
    workers, another driver), so a listing cached earlier would hide them."""
    if not isinstance(fs, LocalFileSystem):
        fs.invalidate_cache(path)


def exists(uri: str) -> bool:
    fs, path = fs_and_path(uri)
    _fresh(fs, path)
    return fs.exists(path)


def read_bytes(uri: str) -> bytes:
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object; atomic locally (temp file + rename) and on S3 (single PUT)."""
    fs, path = fs_and_path(uri)
    if is_remote(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_parquet(uri: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    write_bytes(uri, buf.getvalue())


def list_files(uri: str, suffix: str = "") -> list[str]:
    """Full URIs of the files directly under ``uri`` (sorted); [] if it does not exist."""
    fs, path = fs_and_path(uri)
    _fresh(fs, path)
    if not fs.exists(path):
        return []
    names = sorted(p for p in fs.ls(path, detail=False) if p.endswith(suffix) and fs.isfile(p))
    if is_remote(uri):
        scheme = uri.split("://", 1)[0]
        return [f"{scheme}://{p}" for p in names]
    return names


def size(uri: str) -> int:
    """Bytes in the file at ``uri``."""
    fs, path = fs_and_path(uri)
    return int(fs.size(path))


def read_parquet_file(uri: str, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(uri)), columns=columns)


def read_parquet_dir(uri: str, columns: list[str] | None = None) -> pa.Table:
    """All ``*.parquet`` files directly under ``uri``, concatenated in name order."""
    files = list_files(uri, ".parquet")
    tables = [pq.read_table(io.BytesIO(read_bytes(f)), columns=columns) for f in files]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def copy_tree(src: str, dest: str) -> None:
    """Every file under the local directory ``src``, sub-folders included, to ``dest`` (local or
    s3://) at the same relative path."""
    for folder, subfolders, files in os.walk(src):
        subfolders.sort()
        for name in sorted(files):
            file = os.path.join(folder, name)
            rel = os.path.relpath(file, src).split(os.sep)
            with open(file, "rb") as f:
                write_bytes(join(dest, *rel), f.read())


def remove(uri: str) -> None:
    fs, path = fs_and_path(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)
