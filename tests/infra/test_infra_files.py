"""The cluster files (ray_cluster.yaml, infra/) agree with the code and with each other.

Nothing here starts a cluster: each test checks what a typo in these files would only show
on a cluster: a config key the loader rejects, a Ray or MLflow version or flag that does not
exist, an image that differs between head and workers, a Host header MLflow refuses, a job
env that makes Ray stop the driver.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import ray
import yaml

from pipelines.config import load_pipeline_config
from pipelines.core.cluster import FORWARDED_ENV

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = (INFRA / "Dockerfile").read_text()


def _pyproject() -> dict:
    # tomllib is Python 3.11+, like the image (and its requirements step); on 3.10 the dev
    # dependency tomli is the same parser.
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(path: Path) -> dict:
    (doc,) = _load(path)
    return doc


CLUSTER = _one(REPO / "ray_cluster.yaml")
RAYCLUSTER = _one(INFRA / "kuberay" / "raycluster.yaml")
RAYJOB = _one(INFRA / "kuberay" / "rayjob.yaml")
RUNTIME_ENV = _one(INFRA / "runtime_env.yaml")
K8S_FILES = sorted(
    [*(INFRA / "kuberay").glob("*.yaml"), *(INFRA / "mlflow" / "k8s").glob("*.yaml")]
)


def _pods(cluster_spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group of a RayCluster spec."""
    groups = [("head", cluster_spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]
    ]
    return [(name, g["template"]["spec"]) for name, g in groups]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _base_image() -> str:
    """The FROM image of infra/Dockerfile, with a ${ARG} resolved to the ARG's default."""
    image = re.search(r"^FROM\s+(\S+)", DOCKERFILE, re.M).group(1)
    if m := re.fullmatch(r"\$\{?(\w+)\}?", image):
        image = re.search(rf"^ARG\s+{m.group(1)}=(\S+)", DOCKERFILE, re.M).group(1)
    return image


def _job_commands(text: str) -> list[list[str]]:
    """Every ``python pipelines/run_all.py ...`` command in ``text`` as argv (shell continuations joined)."""
    joined = text.replace("\\\n", " ")
    return [
        shlex.split(line[line.index("python ") :])
        for line in joined.splitlines()
        if "python " in line and "run_all.py" in line
    ]


def _load_job_config(argv: list[str], prefix: str = ""):
    """Check a run_all.py command: script and config exist, and the config loads with its overrides."""
    assert argv[0] == "python", argv
    script, rest = argv[1], argv[2:]
    local = lambda p: REPO / p.removeprefix(prefix).lstrip("/")  # noqa: E731 — image path -> repo path
    assert local(script).is_file(), f"{script} is not a file of the repository"
    configs = [rest[i + 1] for i, a in enumerate(rest) if a == "--config"] or ["configs/demo.yaml"]
    for config in configs:
        assert local(config).is_file(), f"{config} is not a file of the repository"
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    return load_pipeline_config([local(c) for c in configs], overrides)  # raises ConfigError naming a misspelt key


# --------------------------------------------------------------------------- every file


def test_every_yaml_parses_and_k8s_objects_are_complete():
    files = [REPO / "ray_cluster.yaml", *INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")]
    assert len(files) >= 8
    for f in files:
        docs = _load(f)
        assert docs and all(isinstance(d, dict) for d in docs), f
    names = {}
    for f in K8S_FILES:
        for d in _load(f):
            assert d.get("apiVersion") and d.get("kind") and d["metadata"].get("name"), f
            if d["kind"] != "Namespace":
                assert d["metadata"].get("namespace") == "lafma", (
                    f"{f}: {d['kind']} outside namespace lafma"
                )
            names.setdefault(d["kind"], set()).add(d["metadata"]["name"])
    assert "lafma" in names["Namespace"]
    # Ray pods run as the IRSA service account defined beside them.
    for spec in (RAYCLUSTER["spec"], RAYJOB["spec"]["rayClusterSpec"]):
        for group, pod in _pods(spec):
            assert pod.get("serviceAccountName") in names["ServiceAccount"], group


def test_no_credentials_in_any_file():
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    files = [
        REPO / "ray_cluster.yaml",
        REPO / ".dockerignore",
        *(p for p in INFRA.rglob("*") if p.is_file()),
    ]
    for f in files:
        text = f.read_text()
        assert not key_id.search(text), f"{f}: looks like an AWS access key id"
        assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*[:=]", text), f
    for f in K8S_FILES:
        assert all(d["kind"] != "Secret" for d in _load(f)), (
            f"{f}: secrets are created by hand, not committed"
        )


# --------------------------------------------------------------------------- image and versions


def test_image_matches_installed_ray_python_and_pyproject():
    image = _base_image()
    m = re.fullmatch(r"rayproject/ray:(\d+)\.(\d+)\.(\d+)-py(\d)(\d+)-(gpu|cu\d+)", image)
    assert m, f"unexpected base image {image}"
    assert (m[1], m[2]) == tuple(ray.__version__.split(".")[:2]), (
        f"{image} vs installed ray {ray.__version__}"
    )
    assert (m[4], m[5]) == ("3", "11")
    ray_pin = next(d for d in _pyproject()["project"]["dependencies"] if d.startswith("ray["))
    assert ray_pin.endswith(f"=={m[1]}.{m[2]}.*"), ray_pin
    for spec in (RAYCLUSTER["spec"], RAYJOB["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"].split(".")[:2] == [m[1], m[2]]


def test_dockerfile_installs_exactly_the_pyproject_pins():
    deps = _pyproject()["project"]["dependencies"]
    assert "torch==2.11.0" in deps and "torchaudio==2.11.0" in deps
    # Any torch pin spelled out in the Dockerfile must be pyproject's.
    for name, pin in re.findall(r"\b(torch|torchaudio)(==[\w.*]+)", DOCKERFILE):
        assert f"{name}{pin}" in deps, f"Dockerfile pins {name}{pin}, pyproject {deps}"
    # The requirements the image installs are what its own extraction command prints.
    cmd = re.search(
        r'python -c "(import tomllib;.*?)"\s*\\?\s*>\s*/tmp/requirements.txt', DOCKERFILE, re.S
    )
    assert cmd, "the Dockerfile no longer derives its requirements from pyproject.toml"
    out = subprocess.run(
        [sys.executable, "-c", cmd.group(1)], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [d.replace(" ", "") for d in deps]
    # The packages the Makefile installs --no-deps, installed the same way.
    no_deps = (
        re.search(r"^NO_DEPS\s*:=\s*(.+)$", (REPO / "Makefile").read_text(), re.M).group(1).replace('"', "").split()
    )
    for pkg in no_deps:
        assert f'pip install --no-deps "{pkg}"' in DOCKERFILE, pkg


def test_dockerignore_keeps_local_state_out():
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".lafma", ".cache", "mlruns", "*.db", ".git"):
        assert required in patterns, required
    assert {"__pycache__", "**/__pycache__"} & patterns


def test_one_image_everywhere():
    image = CLUSTER["docker"]["image"]
    assert image.endswith("/lafma:latest")
    for spec in (RAYCLUSTER["spec"], RAYJOB["spec"]["rayClusterSpec"]):
        for group, pod in _pods(spec):
            for c in pod["containers"]:
                assert c["image"] == image, f"{group}: {c['image']} != ray_cluster.yaml's {image}"


def test_baked_encoder_check_loads_a_saved_t5(tmp_path, monkeypatch, capsys):
    """The build-time load check of infra/bake_text_encoder.py, on a tiny T5 saved like a hub
    snapshot (in-process: the image runs it in a subprocess with the hub switched off)."""
    import importlib.util

    from lafma.text.encoders import tiny_t5_encoder

    spec = importlib.util.spec_from_file_location("bake", INFRA / "bake_text_encoder.py")
    bake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bake)
    enc = tiny_t5_encoder(dim=32, layers=1)
    enc.tokenizer.save_pretrained(tmp_path)
    enc.model.save_pretrained(tmp_path)
    monkeypatch.setattr(sys, "argv", ["-c", str(tmp_path)])
    exec(compile(bake._CHECK, "bake_check", "exec"), {"__name__": "__main__"})
    assert "d_model=32, loads offline" in capsys.readouterr().out


# --------------------------------------------------------------------------- ray up


def test_ray_cluster_yaml_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(CLUSTER))  # the schema `ray up` enforces


def test_ray_cluster_has_cpu_head_and_scale_to_zero_gpu_workers():
    types = CLUSTER["available_node_types"]
    head = types[CLUSTER["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = {
        n: t
        for n, t in types.items()
        if n != CLUSTER["head_node_type"] and t["resources"].get("GPU", 0) > 0
    }
    assert gpu, "no GPU worker type"
    for name, t in gpu.items():
        assert t.get("min_workers", 0) == 0, f"{name} keeps GPU nodes up while idle"
        assert t["max_workers"] >= 1 and t["resources"].get("CPU", 0) > 0, name
    workers = [t for n, t in types.items() if n != CLUSTER["head_node_type"]]
    assert CLUSTER["max_workers"] >= sum(t["max_workers"] for t in workers)
    assert CLUSTER["provider"]["type"] == "aws" and not CLUSTER["provider"].get(
        "cache_stopped_nodes", True
    )
    assert any(o.startswith("--env MLFLOW_TRACKING_URI=") for o in CLUSTER["docker"]["run_options"])


# --------------------------------------------------------------------------- jobs


def test_rayjob_entrypoint_runs_a_real_script_with_a_valid_config():
    workdir = re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE, re.M)[-1]
    (argv,) = _job_commands(RAYJOB["spec"]["entrypoint"])
    cfg = _load_job_config(argv, prefix=workdir)
    assert cfg.storage.root.startswith("s3://") and cfg.data.manifest.startswith("s3://")
    # Every GPU request must fit the cluster at its largest, or Ray Train waits forever.
    gpu_groups = [
        g
        for g in RAYJOB["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
    ]
    assert gpu_groups
    for g in gpu_groups:
        assert g["minReplicas"] == 0
    per_pod = [
        (
            int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]),
            float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"]),
            g["maxReplicas"],
        )
        for g in gpu_groups
    ]
    total_gpus = sum(gpus * n for gpus, _, n in per_pod)
    for t in (cfg.train_vae, cfg.train_vocoder, cfg.train_lfm):
        assert t.gpus_per_worker > 0
        assert t.num_workers * t.gpus_per_worker <= total_gpus
        assert any(
            t.gpus_per_worker <= gpus and t.cpus_per_worker <= cpus for gpus, cpus, _ in per_pod
        )


def test_rayjob_cleans_up_and_uses_the_runtime_env():
    spec = RAYJOB["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert spec["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"] == RUNTIME_ENV["env_vars"]


def test_readme_job_commands_load():
    commands = _job_commands((INFRA / "README.md").read_text())
    assert len(commands) >= 2  # the cluster job and the local rehearsal
    for argv in commands:
        _load_job_config(argv)


def test_runtime_env_is_valid_and_documented():
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**RUNTIME_ENV)  # Ray's own validation: env_vars str -> str, excludes a list of str
    readme = (INFRA / "README.md").read_text()
    for name, value in RUNTIME_ENV["env_vars"].items():
        assert isinstance(value, str)
        assert name in FORWARDED_ENV or f"`{name}`" in readme, (
            f"{name}: not forwarded by the code nor documented"
        )
        assert not name.startswith("AWS_"), "credentials come from instance profiles / IRSA"


def test_runtime_env_excludes_keep_the_upload_small():
    # Ray's own matcher for runtime_env excludes (gitignore syntax, relative to the working dir).
    from ray._private.runtime_env.packaging import PACKAGE_SIZE_WARNING, _dir_travel, _get_excludes

    excluded = _get_excludes(REPO, RUNTIME_ENV["excludes"])
    for path in (
        ".venv/bin/python",
        ".lafma/data/demo/x.parquet",
        ".cache/torch_extensions/a.so",
        "mlflow.db",
        ".lafma/mlflow.db",
        "mlruns/0/meta.yaml",
        "mlartifacts/1/a.png",
        ".git/HEAD",
        "lafma/__pycache__/config.cpython-311.pyc",
    ):
        assert excluded(REPO / path), path
    for path in (
        "pipelines/run_all.py",
        "configs/lafma_audiocaps.yaml",
        "lafma/config.py",
        "pyproject.toml",
    ):
        assert not excluded(REPO / path), path
    # This checkout, as `ray job submit --working-dir .` would zip it (ignoring .gitignore).
    size = 0

    def add(p: Path) -> None:
        nonlocal size
        size += p.stat().st_size if p.is_file() else 0

    _dir_travel(REPO, [_get_excludes(REPO, RUNTIME_ENV["excludes"])], add, include_gitignore=False)
    assert 0 < size < PACKAGE_SIZE_WARNING, f"working dir upload would be {size / 2**20:.0f} MiB"


_DRIVER = """
import ray._private.node, ray._private.services

class Reached(Exception):
    pass

def stop(*args, **kwargs):
    raise Reached  # past the runtime-env merge; start or join nothing

ray._private.services.canonicalize_bootstrap_address = stop
ray._private.node.Node = stop
from pipelines.config import ComputeConfig
from pipelines.core.cluster import init_ray
try:
    init_ray(ComputeConfig())
except Reached:
    print("MERGED")
"""


def test_job_driver_gets_past_ray_init_under_this_runtime_env():
    """Under ``ray job submit`` the driver's environment holds the job's env_vars (expanded)
    and the job config; ``init_ray`` then calls ``ray.init(runtime_env=...)`` with the
    FORWARDED_ENV it finds, which Ray merges with the job's runtime env."""
    job_env = RUNTIME_ENV["env_vars"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({k: os.path.expandvars(v) for k, v in job_env.items()})
    env["RAY_JOB_CONFIG_JSON_ENV_VAR"] = json.dumps(
        {
            "runtime_env": {
                "working_dir": "gcs://_ray_pkg_0123456789abcdef.zip",
                "env_vars": job_env,
            },
            "metadata": {},
        }
    )
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "MERGED" in out.stdout, out.stderr[-2000:]


# --------------------------------------------------------------------------- MLflow


def _allowed_hosts(args: list[str]) -> list[str]:
    (value,) = [a.split("=", 1)[1] for a in args if a.startswith("--allowed-hosts=")]
    return value.split(",")


def test_ray_pods_reach_the_mlflow_service_and_it_accepts_their_host_header():
    from mlflow.server.security_utils import is_allowed_host_header

    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for d in _load(INFRA / "mlflow" / "k8s" / "mlflow.yaml")
    }
    service = docs[("Service", "mlflow")]
    (port,) = [p["port"] for p in service["spec"]["ports"]]
    server = docs[("Deployment", "mlflow")]["spec"]["template"]["spec"]["containers"][0]
    uris = {
        _env(c).get("MLFLOW_TRACKING_URI")
        for spec in (RAYCLUSTER["spec"], RAYJOB["spec"]["rayClusterSpec"])
        for _, pod in _pods(spec)
        for c in pod["containers"]
    }
    (uri,) = uris  # one value, set on every Ray pod
    url = urlsplit(uri)
    assert (
        url.hostname
        == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    )
    assert url.port == port
    assert is_allowed_host_header(_allowed_hosts(server["args"]), url.netloc), (
        f"MLflow would answer 403 to {uri}"
    )
    assert is_allowed_host_header(
        _allowed_hosts(server["args"]), f"localhost:{port}"
    )  # kubectl port-forward
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())
    assert is_allowed_host_header(
        _allowed_hosts(compose["services"]["mlflow"]["command"]), "127.0.0.1:5000"
    )


def test_mlflow_server_flags_exist_and_server_matches_client():
    import mlflow
    from mlflow.cli import server

    flags = {opt for p in server.params for opt in [*p.opts, *p.secondary_opts]}
    deployment = [
        d for d in _load(INFRA / "mlflow" / "k8s" / "mlflow.yaml") if d["kind"] == "Deployment"
    ][0]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    compose = yaml.safe_load((INFRA / "mlflow" / "docker-compose.yaml").read_text())["services"][
        "mlflow"
    ]
    for args in (container["args"], compose["command"][2:]):
        used = {a.split("=", 1)[0] for a in args if a.startswith("--")}
        assert used <= flags, f"not options of `mlflow server`: {used - flags}"
        assert {
            "--backend-store-uri",
            "--artifacts-destination",
            "--serve-artifacts",
            "--allowed-hosts",
        } <= used
    pin = re.search(r'"mlflow==(\d+)\.(\d+)\.\*"', (INFRA / "mlflow" / "Dockerfile").read_text())
    assert pin and pin.groups() == tuple(mlflow.__version__.split(".")[:2])


@pytest.mark.parametrize(
    "path", ["ray_cluster.yaml", "infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml"]
)
def test_placeholders_are_marked(path):
    """Account-specific values are visible <placeholders>, never someone's real account id."""
    text = (REPO / path).read_text()
    assert "<account>" in text
    assert not re.search(r"\b\d{12}\.dkr\.ecr\.", text)
