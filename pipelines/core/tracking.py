"""How every LAFMA job talks to MLflow: one store per storage root, runs by id, rank-0 logging.

The driver creates runs; workers log by run id (:class:`RunLogger`), never via the fluent "active
run", so any process (a restarted Ray worker too) logs into the driver's run."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from pipelines.core import storage

if TYPE_CHECKING:
    from mlflow import MlflowClient

# MLflow's limits (mlflow.utils.validation); it would cut long param values with just a warning.
_MAX_KEY, _MAX_VALUE, _CUT = 250, 6000, "...[truncated; see params.json]"
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")
# Tracking URIs that name a server, which picks the artifact store itself.
SERVER_SCHEMES = {"http", "https", "databricks"}


def tracking_uri(root: str) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else sqlite in ``root`` (in ``./.lafma`` if s3://)."""
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    os.makedirs(local := os.path.abspath(".lafma" if storage.is_remote(root) else root),
                exist_ok=True)
    return "sqlite:///" + os.path.join(local, "mlflow.db")  # absolute path: four slashes


def artifact_root(root: str) -> str:
    """``<root>/mlartifacts``: an absolute local path (created) or an ``s3://`` URI."""
    if storage.is_remote(root):
        return storage.join(root, "mlartifacts")
    os.makedirs(path := os.path.join(os.path.abspath(root), "mlartifacts"), exist_ok=True)
    return path


def configure(root: str, uri: str | None = None) -> str:
    """Set mlflow's global tracking URI to the store for ``root`` (or to ``uri``, the driver's
    choice handed to a worker); return the URI."""
    import mlflow
    user_set = "MLFLOW_TRACKING_URI" in os.environ
    mlflow.set_tracking_uri(uri := uri or tracking_uri(root))
    if not user_set:  # set_tracking_uri exports the env var; it must not pass for a user's choice
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    return uri


def _client(uri: str | None) -> MlflowClient:
    from mlflow import MlflowClient
    return MlflowClient(uri)  # None: mlflow's current URI (env var or configure())


def ensure_experiment(name: str, root: str) -> str:
    """Id of experiment ``name``, created with artifacts under :func:`artifact_root` if missing.

    A tracking *server* (``http(s)://``) chooses its own artifact store (``--artifacts-destination``
    or ``--default-artifact-root``). A database URI (``sqlite:///…``, ``postgresql://…``) has no
    server to choose: MLflow would fall back to ``./mlruns`` in whatever directory the process
    runs, so the artifacts go under the storage root instead."""
    uri = tracking_uri(root)
    client = _client(uri)
    if (exp := client.get_experiment_by_name(name)) is not None:
        return exp.experiment_id
    location = None if uri.split("://", 1)[0] in SERVER_SCHEMES else artifact_root(root)
    return client.create_experiment(name, artifact_location=location)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"vae": {"ch": 128}, "x": [1]} -> {"vae.ch": "128", "x": "[1]"}``; keys made valid."""
    out: dict[str, str] = {}
    for key, v in params.items():
        name = _BAD_KEY_CHARS.sub("_", f"{prefix}{key}")[:_MAX_KEY]
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, f"{name}."))
        else:
            out[name] = json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
    return out


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    from mlflow.entities import Param
    flat = flatten_params(params)  # long values: cut visibly, kept whole in an artifact
    batch = [Param(k, v if len(v) <= _MAX_VALUE else v[: _MAX_VALUE - len(_CUT)] + _CUT)
             for k, v in flat.items()]
    client.log_batch(run_id, params=batch)  # the client splits it into <= 100 per request
    if any(len(v) > _MAX_VALUE for v in flat.values()):
        client.log_dict(run_id, flat, "params.json")


def start_run(*, root: str, experiment: str, run_name: str,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              parent_run_id: str | None = None) -> str:
    """Create a RUNNING run and return its id, leaving the fluent active run alone. Nesting is
    the ``mlflow.parentRunId`` tag (what ``nested=True`` writes), so it works across processes.

    Args:
        root: Storage root, local path or ``s3://bucket/prefix``.
        experiment: Experiment name, created if missing.
        run_name: Display name.
        params: Resolved config, logged flattened (:func:`flatten_params`).
        tags: e.g. ``{"lafma.stage": "train_vae", "lafma.config_hash": "ab12"}``.
        parent_run_id: The parent run, if any.
    """
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    with contextlib.suppress(ImportError):  # internal module; losing it costs provenance only
        from mlflow.tracking.context.registry import resolve_tags
        all_tags = resolve_tags(all_tags)  # user, source file, git commit (as the fluent API)
    client = _client(tracking_uri(root))
    run = client.create_run(ensure_experiment(experiment, root), tags=all_tags, run_name=run_name)
    if params:
        _log_params(client, run.info.run_id, params)
    return run.info.run_id


def find_run(*, root: str, experiment: str, tags: Mapping[str, Any]) -> str | None:
    """The newest non-deleted run carrying all ``tags`` (to resume a stage), or None."""
    if not tags or any("'" in str(v) for v in tags.values()):  # the filter has no escapes
        raise ValueError(f"find_run needs tags whose values have no single quote: {tags}")
    client = _client(tracking_uri(root))
    if (exp := client.get_experiment_by_name(experiment)) is None:
        return None
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs([exp.experiment_id], query, max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def end_run(run_id: str, status: str = "FINISHED", *, tracking: str | None = None) -> None:
    """Set a run's status: FINISHED, FAILED or KILLED (or RUNNING again, to resume it)."""
    client = _client(tracking)  # set_terminated would stamp an end time on a resumed run
    (client.update_run if status == "RUNNING" else client.set_terminated)(run_id, status)


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch.Tensor, without importing torch; bf16 has no numpy dtype
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class RunLogger:
    """Logs into a run by id from rank 0 only, importing mlflow lazily (torchtune's pattern).

    Args:
        run_id: Run created by the driver (:func:`start_run`), or None to log nothing.
        rank: Global rank; only rank 0 logs, so N workers leave one history.
        tracking: The driver's tracking URI; None uses mlflow's current one.
    """

    def __init__(self, run_id: str | None, rank: int = 0, tracking: str | None = None) -> None:
        self.run_id = run_id
        self.enabled = run_id is not None and rank == 0
        self._client = _client(tracking) if self.enabled else None

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log scalars (floats, 0-d tensors) at ``step``, under keys like ``"mel/l1"``."""
        if self.enabled and metrics:
            from mlflow.entities import Metric
            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
            self._client.log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a nested dict as dotted params (a key cannot be re-logged with a new value)."""
        if self.enabled and params:
            _log_params(self._client, self.run_id, params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set or overwrite tags (values become strings)."""
        if self.enabled and tags:
            from mlflow.entities import RunTag
            self._client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_text(self, text: str, artifact_path: str) -> None:
        """Log ``text`` as the file ``artifact_path`` of the run."""
        if self.enabled:
            self._client.log_text(self.run_id, text, artifact_path)

    def log_dict(self, data: Mapping[str, Any], artifact_path: str) -> None:
        """Log JSON, or YAML when ``artifact_path`` ends in .yaml/.yml."""
        if self.enabled:
            self._client.log_dict(self.run_id, dict(data), artifact_path)

    def log_image(self, image: bytes | Any, artifact_path: str) -> None:
        """Log PNG bytes (e.g. :func:`mel_image`) or a matplotlib Figure as a PNG file."""
        if self.enabled:
            if not isinstance(image, (bytes, bytearray)):
                image.savefig(buf := io.BytesIO(), format="png")
                image = buf.getvalue()
            self._client.log_stream(self.run_id, io.BytesIO(image), artifact_path)

    def log_audio(self, wav: Any, sample_rate: int, artifact_path: str) -> None:
        """Log ``wav: (T,) or (C, T)`` in [-1, 1] as 16-bit PCM; clipped, NaN -> 0 (playable)."""
        if self.enabled:
            import soundfile as sf
            x = np.squeeze(_to_numpy(wav))
            # NaN/Inf have no PCM value; clip here rather than trust libsndfile's clipping mode.
            x = np.clip(np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
            sf.write(buf := io.BytesIO(), x.T, sample_rate, "PCM_16", format="WAV")  # (T, C)
            self._client.log_stream(self.run_id, io.BytesIO(buf.getvalue()), artifact_path)


@contextlib.contextmanager
def system_metrics(run_id: str | None, *, rank: int = 0, tracking: str | None = None,
                   interval_s: float = 10.0, node_id: str | None = None) -> Iterator[None]:
    """Log CPU, memory, disk, network (GPU if NVML works) as ``system/...`` metrics of the run
    while the block runs; a no-op unless ``run_id`` is set and ``rank == 0`` (pass the local
    rank and a ``node_id`` to watch each node). Failures warn, never raise."""
    monitor = None
    if run_id is not None and rank == 0:
        try:  # mlflow's monitor, bound to a run id; resume_logging: a retry continues its steps
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
            monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, node_id=node_id,
                                           resume_logging=True, tracking_uri=tracking)
            monitor.start()  # a thread; it stops by itself once the run is not RUNNING
        except Exception as e:  # e.g. a changed internal API: telemetry must not stop training
            warnings.warn(f"system metrics off for run {run_id}: {e}", stacklevel=3)
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def _mel_arrays(mels: list[tuple]) -> list[np.ndarray]:
    arrays = [_to_numpy(m) for _, m, *_ in mels]  # a panel may carry a region after its mel
    if not arrays or any(a.ndim != 2 for a in arrays):
        raise ValueError(f"need (title, (n_mels, T)) pairs, got {[a.shape for a in arrays]}")
    return arrays


def _colour_range(arrays: list[np.ndarray]) -> tuple[float, float]:
    """(vmin, vmax) over every finite value of ``arrays``: one scale, so panels compare by eye."""
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    return vmin, max(vmax, vmin + 1e-6)  # a constant mel still needs a valid range


def _draw_mel(ax: Any, a: np.ndarray, vrange: tuple[float, float], sample_rate: int, hop_length: int) -> Any:
    """``a: (n_mels, T)`` on ``ax`` with time in seconds; returns the image (for a colour bar)."""
    return ax.imshow(a, origin="lower", aspect="auto", interpolation="nearest", cmap="magma",
                     vmin=vrange[0], vmax=vrange[1],
                     extent=(0, a.shape[1] * hop_length / sample_rate, 0, a.shape[0]))


def _png(fig: Any) -> bytes:
    fig.savefig(buf := io.BytesIO(), format="png", dpi=100)
    return buf.getvalue()


def mel_image(mels: list[tuple[str, np.ndarray]], *, sample_rate: int, hop_length: int) -> bytes:
    """PNG, a panel per ``(title, mel: (n_mels, T))``, one colour scale (to compare by eye)."""
    from matplotlib.figure import Figure  # not pyplot: no global state; png renders with Agg
    arrays = _mel_arrays(mels)
    vrange = _colour_range(arrays)
    fig = Figure(figsize=(8, 1 + 2 * len(arrays)), layout="constrained")
    axes = fig.subplots(len(arrays), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, _), a in zip(axes, mels, arrays, strict=True):
        image = _draw_mel(ax, a, vrange, sample_rate, hop_length)
        ax.set(title=title, ylabel="mel bin")
    axes[-1].set_xlabel("time (s)")
    fig.colorbar(image, ax=list(axes), label="log magnitude")
    return _png(fig)


# Colour of the lines that mark a panel's region: cyan stands out on every shade of magma.
REGION_COLOUR = "cyan"


def mel_grid(rows: list[tuple[str, list[tuple]]], *, sample_rate: int, hop_length: int) -> bytes:
    """PNG, one titled row per ``(row title, [(panel title, mel: (n_mels, T)), ...])``, every
    row with the same number of panels side by side and the whole sheet on one colour scale
    (so a panel compares with any other, across rows too). 4 x 2.5 inches a panel at 100 dpi,
    plus 1 inch of width for the colour bar and half an inch of height for the margins.

    A panel given as ``(title, mel, (start, end))`` has that span of seconds marked by dashed
    :data:`REGION_COLOUR` lines at its edges (e.g. the part of a clip that was regenerated)."""
    from matplotlib.figure import Figure
    arrays = [_mel_arrays(panels) for _, panels in rows]
    if not arrays or len({len(a) for a in arrays}) != 1:
        raise ValueError(f"need rows with the same number of panels, got {[len(a) for a in arrays]}")
    vrange = _colour_range([a for row in arrays for a in row])
    cols = len(arrays[0])
    fig = Figure(figsize=(4 * cols + 1, 0.5 + 2.5 * len(rows)), layout="constrained")
    # Subfigures give each row its own title (the caption) above its panels' titles.
    sheet, bar = fig.subfigures(1, 2, width_ratios=(4 * cols, 1))
    for sub, (caption, panels), row in zip(np.atleast_1d(sheet.subfigures(len(rows), 1)), rows, arrays,
                                           strict=True):
        sub.suptitle(caption, fontweight="bold")
        for col, (ax, (title, _, *region), a) in enumerate(zip(sub.subplots(1, cols, squeeze=False)[0], panels,
                                                                row, strict=True)):
            image = _draw_mel(ax, a, vrange, sample_rate, hop_length)
            for edge in region[0] if region else ():
                # Lines, not a shaded span: a tint would shift the panel's colours off the shared scale.
                ax.axvline(edge, color=REGION_COLOUR, linestyle="--", linewidth=1.5)
            ax.set(title=title, xlabel="time (s)", ylabel="mel bin" if col == 0 else None)
    bar.colorbar(image, cax=bar.add_subplot(), label="log magnitude")
    return _png(fig)
