"""One storage root, local path or ``s3://bucket/prefix``, through fsspec.

Credentials and a custom S3 endpoint come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``), never from configs.

What the pipeline writes it reads back whole (:func:`read_bytes`); an input it is given (a
manifest's audio) it reads through :func:`read_bounded`: allowed schemes only, regular files
only, at most a set number of bytes, within a set time.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import stat
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.asyn import AsyncFileSystem
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem

from lafma.data.manifest import is_remote, scheme_refusal  # noqa: F401 — one definition, re-exported

# botocore's socket limits for every S3 call (s3fs's own retry loop runs around these): a
# stalled endpoint fails a request in seconds instead of holding a task. read_timeout is per
# socket read, not per transfer, so large uploads and downloads are not cut short.
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3, "mode": "standard"}}
# Through fsspec's per-protocol defaults, not fs_and_path's arguments: every S3 filesystem of the
# process (this module's, and fsspec.open's in lafma's manifest readers) is then made with the
# same options, so it stays the one cached instance whose listings _fresh() forgets. What a
# user's own fsspec configuration sets wins.
_s3_defaults = fsspec.config.conf.setdefault("s3", {})
_s3_defaults["config_kwargs"] = {**S3_CONFIG, **_s3_defaults.get("config_kwargs", {})}


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


class InputRefused(ValueError):
    """An input :func:`read_bounded` will not read. ``reason`` is a rejects-table code:
    ``scheme_not_allowed``, ``not_a_file``, ``too_large`` or ``timeout``."""

    def __init__(self, uri: str, reason: str, detail: str):
        super().__init__(f"{uri}: {reason} ({detail})")
        self.uri, self.reason, self.detail = uri, reason, detail

    def __reduce__(self):  # crosses process boundaries (Ray) with its fields
        return type(self), (self.uri, self.reason, self.detail)


def check_scheme(uri: str, allowed: Iterable[str]) -> None:
    """Raises :class:`InputRefused` (``scheme_not_allowed``) unless every scheme ``uri`` reads
    through (:func:`lafma.data.manifest.uri_schemes`) is in ``allowed``."""
    if (why := scheme_refusal(uri, allowed)) is not None:
        raise InputRefused(uri, "scheme_not_allowed", why)


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _read_local(uri: str, path: str, max_bytes: int) -> bytes:
    # stat first: opening a device can do something (rewind a tape, block on a FIFO's writer).
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise InputRefused(uri, "not_a_file", _kind(st.st_mode))
    # O_NONBLOCK: should the path become a FIFO between stat and open, open returns at once and
    # fstat below refuses it. It changes nothing for a regular file.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InputRefused(uri, "not_a_file", _kind(st.st_mode))
        if st.st_size > max_bytes:
            raise InputRefused(uri, "too_large", f"{_mb(st.st_size)} > {_mb(max_bytes)}")
        chunks, n = [], 0
        while n <= max_bytes and (chunk := os.read(fd, min(1 << 20, max_bytes + 1 - n))):
            chunks.append(chunk)
            n += len(chunk)
    finally:
        os.close(fd)
    if n > max_bytes:  # it grew after fstat
        raise InputRefused(uri, "too_large", f"more than {_mb(max_bytes)}")
    return b"".join(chunks)


def _read_remote(uri: str, fs: fsspec.AbstractFileSystem, path: str, max_bytes: int, timeout: float) -> bytes:
    # An async filesystem (s3fs) takes a time limit per call (past it the request is cancelled);
    # the two calls share one deadline.
    deadline = time.monotonic() + timeout

    def limit() -> dict:
        return {"timeout": max(deadline - time.monotonic(), 1e-3)} if isinstance(fs, AsyncFileSystem) else {}

    try:
        info = fs.info(path, **limit())
        if info.get("type") != "file":
            raise InputRefused(uri, "not_a_file", f"a {info.get('type') or 'non-file'} entry")
        size = info.get("size")
        if size is not None and int(size) > max_bytes:
            raise InputRefused(uri, "too_large", f"{_mb(int(size))} > {_mb(max_bytes)}")
        if size is not None and int(size) == 0:
            return b""  # a range request on an empty S3 object is refused (416), not answered empty
        # The range ends at the size where it is known (a range past an object's end may be
        # refused too), one byte past the cap otherwise.
        end = max_bytes + 1 if size is None else min(int(size), max_bytes + 1)
        data = fs.cat_file(path, start=0, end=end, **limit())
    except FSTimeoutError:
        raise InputRefused(uri, "timeout", f"not read within {timeout:g} s") from None
    if len(data) > max_bytes:
        raise InputRefused(uri, "too_large", f"more than {_mb(max_bytes)}")
    return data


def read_bounded(uri: str, *, max_bytes: int, allowed_schemes: Iterable[str] = ("file", "s3"),
                 timeout: float = 120.0) -> bytes:
    """The bytes of one input file, read only if it is safe to.

    Args:
        uri: a local path, ``file://`` or a remote URI.
        max_bytes: a larger file is refused, from its size before any byte is read; at most
            ``max_bytes + 1`` bytes are ever read, so a file that grows meanwhile is refused too.
        allowed_schemes: schemes ``uri`` may use (``file``: a local path).
        timeout: seconds a remote read may take, on filesystems that support a deadline.

    Raises:
        InputRefused: another scheme, not a regular file (a directory, device, FIFO, socket),
            larger than ``max_bytes``, or not read within ``timeout``.
        FileNotFoundError: nothing at ``uri``.
        OSError: any other failure to read it.
    """
    check_scheme(uri, allowed_schemes)
    fs, path = fs_and_path(uri)
    if isinstance(fs, LocalFileSystem):
        return _read_local(uri, path, max_bytes)
    return _read_remote(uri, fs, path, max_bytes, timeout)


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


def write_parquet(uri: str, table: pa.Table, row_group_size: int | None = None) -> None:
    """``row_group_size``: rows per row group (pyarrow's default: one group up to 1 Mi rows).
    Small groups let a reader fetch a few rows by their statistics (:func:`read_row_groups`)."""
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd", row_group_size=row_group_size)
    write_bytes(uri, buf.getvalue())


def parquet_metadata(uri: str) -> pq.FileMetaData:
    """The footer of one Parquet file (row groups, their row counts and column statistics),
    fetched without its data."""
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


def read_row_groups(uri: str, groups: Sequence[int], columns: list[str] | None = None) -> pa.Table:
    """Only the row groups ``groups`` of one Parquet file (only ``columns``): ranged reads, so
    the rest of the file is not fetched."""
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read_row_groups(list(groups), columns=columns)


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


def iter_parquet_batches(uri: str, columns: list[str] | None = None,
                         batch_size: int = 64) -> Iterator[pa.RecordBatch]:
    """The rows of one Parquet file, ``batch_size`` at a time (only ``columns``): a table far
    larger than memory can be scanned, and only the columns asked for are fetched."""
    fs, path = fs_and_path(uri)
    with fs.open(path, "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


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
