"""Stage bookkeeping: content-addressed output paths, ``_SUCCESS.json`` markers, and
sharded execution on Ray Data that resumes exactly after a crash.

A stage's output lives at ``<root>/data/<dataset>/<stage>-<hash>/`` where the hash covers
its config and its inputs' hashes, so changing anything upstream gives a new path and a
finished stage is recognised by its marker alone.

Sharding: the work is split into deterministic shards; shard ``i`` writes
``rejects/shard-i.parquet`` and then ``shard-i.parquet`` as whole objects (atomic locally
and on S3). A re-run processes only shards whose data file is missing, so an interrupted
stage resumes with no duplicated and no missing rows.

Tests kill a run at a known point through :data:`HOLD_ENV` (test-only, see :func:`hold_spec`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from lafma.config import config_hash, to_dict
from pipelines.config import PipelineConfig
from pipelines.core import storage

MARKER = "_SUCCESS.json"


@dataclass
class StageContext:
    """What a stage sees: the config, the storage root, and upstream stages' outputs."""

    cfg: PipelineConfig
    root: str
    dataset: str
    hashes: dict[str, str] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    # The pipeline's MLflow parent run; each stage's run is its child (ids by stage name).
    parent_run_id: str | None = None
    run_ids: dict[str, str] = field(default_factory=dict)
    # Config keys that name weights from elsewhere (vae.pretrained, train_lfm.init_from, ...):
    # their uri, sha256 and format (pipelines.train.sources.resolve_sources).
    sources: dict[str, dict] = field(default_factory=dict)

    def data_dir(self, stage: str, digest: str) -> str:
        return storage.join(self.root, "data", self.dataset, f"{stage}-{digest}")


class Stage:
    """One step of the DAG. A stage names itself, the stages it ``needs``, what its output
    path hashes (``key``) and how it makes that output (``run``, whose dict becomes the
    ``_SUCCESS.json`` marker). The runner (:mod:`pipelines.core.dag`) knows nothing else of it:
    everything stage-specific is one of these methods, with a default here.
    """

    name: str = ""
    needs: tuple[str, ...] = ()

    def key(self, ctx: StageContext) -> dict:
        """What the output path hashes: the stage's config and its inputs' hashes."""
        raise NotImplementedError

    def run(self, ctx: StageContext, out_dir: str) -> dict:
        """Write everything under ``out_dir`` (the marker is written after it returns)."""
        raise NotImplementedError

    def done(self, marker: dict, ctx: StageContext) -> bool:
        """Whether an existing marker still counts as finished (a training stage asked for
        more steps does not)."""
        return True

    def version(self, marker: dict) -> Any:
        """Beyond the stage hash, what a dependant must see change (a training stage resumed to
        more steps keeps its directory but not its weights); None: the hash alone."""
        return None

    def check(self, ctx: StageContext, marker: dict) -> None:
        """Called once the stage is finished (now or before), before any later stage runs:
        raise to stop the DAG on what this output proves wrong for the stages after it."""

    def summary(self, info: dict) -> list[str]:
        """Extra lines for the DAG's summary table, from the stage's marker."""
        return []

    def resources(self, ctx: StageContext) -> list:
        """What running the stage asks the cluster for (:class:`pipelines.core.preflight.Request`
        each); none: it runs on the driver."""
        return []


# Config fields added after stages were first cached, at the value that keeps the old behaviour:
# a stage's hash leaves them out at that value, so upgrading does not invalidate finished stages
# (a VAE trained for hours keeps its directory); set to anything else, they are hashed.
ADDED_AT_DEFAULT: dict[str, Any] = {"init_from": "", "pretrained": "", "mid_attention": True,
                                    "upsample_padding": "exact", "num_heads": 0, "grid": "uniform",
                                    "null_caption": "masked", "peak": 0.95, "duration_embedding": False,
                                    "variable_duration": False, "placement_strategy": "PACK",
                                    "position_channels": False, "layers": [-1]}


def _stable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()
                if not (k in ADDED_AT_DEFAULT and v == ADDED_AT_DEFAULT[k])}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def digest(obj: Any) -> str:
    """Short stable hash of configs, dicts and lists of them (see :data:`ADDED_AT_DEFAULT`)."""
    return config_hash(_stable(to_dict(obj)))


def read_marker(out_dir: str) -> dict | None:
    uri = storage.join(out_dir, MARKER)
    return storage.read_json(uri) if storage.exists(uri) else None


def write_marker(out_dir: str, info: dict) -> None:
    """Written last: its presence means every other file of the stage is complete."""
    storage.write_json(storage.join(out_dir, MARKER), info)


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.parquet"


def chunk(items: Sequence[Any], size: int) -> list[list[Any]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def pending_shards(out_dir: str, n: int) -> list[int]:
    done = {uri.rsplit("/", 1)[-1] for uri in storage.list_files(out_dir, ".parquet")}
    return [i for i in range(n) if shard_name(i) not in done]


def write_shard(out_dir: str, i: int, table: pa.Table, rejects: pa.Table) -> None:
    storage.write_parquet(storage.join(out_dir, "rejects", shard_name(i)), rejects)
    storage.write_parquet(storage.join(out_dir, shard_name(i)), table)  # last: marks the shard done


def run_shards(out_dir: str, shards: list[list[dict]], fn: Callable | type, *, label: str,
               num_cpus: float = 0.5, num_gpus: float = 0.0, actors: int = 0,
               fn_kwargs: dict | None = None) -> int:
    """Run ``fn`` over the shards not yet written, on Ray Data; returns how many ran.

    ``fn`` takes ``{"shard": i, "rows": [...]}`` and returns ``{"shard": i, "rows_out": n,
    "rejected": k}`` after writing the shard itself. With ``actors > 0`` it is a class run
    in an actor pool (for models that are expensive to load), else a plain task per shard.
    """
    import ray.data
    from ray.data import ActorPoolStrategy

    todo = pending_shards(out_dir, len(shards))
    hold = hold_spec(label)
    if hold is not None:
        fn = _held(fn, *hold)
    print(f"[{label}] {len(shards)} shards, {len(shards) - len(todo)} already done, {len(todo)} to run",
          flush=True)
    if not todo:
        return 0
    items = [{"shard": i, "rows": shards[i]} for i in todo]
    # One operator, no downstream consumer to starve: Ray Data's per-operator reservation
    # only holds CPUs back here (it cost a third of the stage's throughput on 2 cores).
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    if actors:
        ds = ds.map_batches(fn, batch_size=1, compute=ActorPoolStrategy(size=actors), num_cpus=num_cpus,
                            num_gpus=num_gpus, fn_constructor_kwargs=fn_kwargs or {}, batch_format="pyarrow")
    else:
        ds = ds.map(fn, num_cpus=num_cpus, fn_kwargs=fn_kwargs or {})
    start, done, rows_out, rejected = time.time(), 0, 0, 0
    for r in ds.iter_rows():
        done += 1
        rows_out += int(r["rows_out"])
        rejected += int(r["rejected"])
        print(f"[{label}] shard {int(r['shard'])} done ({done}/{len(todo)}): {rows_out} rows, {rejected} rejected, "
              f"{time.time() - start:.1f} s", flush=True)
    return len(todo)


# Test-only fault injection: an environment variable, not a config key, so no stage hash changes.
HOLD_ENV = "LAFMA_TEST_HOLD"


def hold_spec(label: str) -> tuple[int, str, str] | None:
    """``(n, marker, release)`` when ``LAFMA_TEST_HOLD=<label>:<n>:<marker file>[:<release file>]``
    names ``label``, else None (``release`` is "" when not given).

    Test-only, so a test can kill a run at a known point instead of racing a wall-clock window:
    :func:`run_shards` with that label lets exactly ``n`` shards of this run be written, then its
    tasks block forever; a training job of that stage (:func:`pipelines.core.training.maybe_hold`)
    blocks forever once it has reported its step-``n`` checkpoint. Either creates the marker file
    (a local path) when it reaches that point. With a release file, a training job blocks only
    until that file exists, then trains on (a test holds two runs at a point they both reach).
    """
    spec = os.environ.get(HOLD_ENV, "")
    name, _, rest = spec.partition(":")
    if not spec or name != label:
        return None
    n, _, files = rest.partition(":")
    marker, _, release = files.partition(":")
    return int(n), marker, release


def hold_forever(marker: str | None = None, release: str = "") -> None:
    """Create ``marker`` (when given), then block until the process is killed, or until the file
    ``release`` exists when one is named (see :func:`hold_spec`)."""
    if marker:
        with open(marker, "w"):
            pass
    while not (release and os.path.exists(release)):
        time.sleep(0.2 if release else 3600)


def _held(fn: Callable | type, n: int, marker: str, release: str = "") -> Callable | type:
    """``fn`` (a shard function or actor class) that lets ``n`` shards be written, then holds.

    Each shard takes a ticket first, a directory beside the marker (``mkdir`` is atomic), so
    tasks running in parallel cannot write more than ``n``: a task finding none left holds
    before it starts; the task that finishes the ``n``-th shard creates the marker and holds.
    """
    tickets = f"{marker}.tickets"

    def around(call: Callable[[], Any]) -> Any:
        os.makedirs(tickets, exist_ok=True)
        for k in range(n):
            try:
                os.mkdir(os.path.join(tickets, str(k)))
                break
            except FileExistsError:
                continue
        else:
            hold_forever()
        out = call()  # writes its shard
        os.mkdir(os.path.join(tickets, f"{k}.done"))
        if sum(t.endswith(".done") for t in os.listdir(tickets)) == n:
            hold_forever(marker)
        return out

    if isinstance(fn, type):
        class Held(fn):
            def __call__(self, batch: Any) -> Any:
                call = super().__call__
                return around(lambda: call(batch))

        return Held

    def held(item: dict, **kwargs: Any) -> Any:
        return around(lambda: fn(item, **kwargs))

    return held


def rejects_summary(out_dir: str) -> tuple[int, dict[str, int]]:
    table = storage.read_parquet_dir(storage.join(out_dir, "rejects"), columns=None)
    if table.num_rows == 0:
        return 0, {}
    reasons: dict[str, int] = {}
    for r in table.column("reason").to_pylist():
        reasons[r] = reasons.get(r, 0) + 1
    return table.num_rows, dict(sorted(reasons.items()))


def arrow_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows → table; float-list columns are built from one flat buffer and offsets.

    ``pa.table`` on a list of numpy arrays converts element by element (about 2 ms per 10 s
    clip); concatenating and wrapping is ~100x cheaper and dominates nothing.
    """
    import numpy as np

    cols = {}
    for f in schema:
        values = [r[f.name] for r in rows]
        if pa.types.is_list(f.type) and pa.types.is_floating(f.type.value_type):
            lengths = np.fromiter((len(v) for v in values), dtype=np.int32, count=len(values))
            offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int32)
            flat = np.concatenate(values).astype(np.float32) if values else np.zeros(0, np.float32)
            cols[f.name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))
        else:
            cols[f.name] = pa.array(values, type=f.type)
    return pa.table(cols, schema=schema)


REJECT_SCHEMA = pa.schema([("id", pa.string()), ("audio_uri", pa.string()), ("reason", pa.string()),
                           ("detail", pa.string())])


def rejects_table(rows: list[dict]) -> pa.Table:
    cols = {name: [str(r.get(name) or "") for r in rows] for name in REJECT_SCHEMA.names}
    return pa.table(cols, schema=REJECT_SCHEMA)
