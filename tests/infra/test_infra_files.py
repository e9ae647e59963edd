"""The cluster files (ray_cluster.yaml, infra/) agree with the code and with each other.

Nothing here starts a cluster: each test checks what a typo in these files would only show
on a cluster: a config key the loader rejects, a Ray or MLflow version or flag that does not
exist, an image that differs between head and workers, a Host header MLflow refuses, a job
env that makes Ray stop the driver. The security section checks that a cluster built from them
is private by default: every Ray process demands the token, the job API and the tracking server
are closed to strangers, no pod runs privileged, no secret sits in a file, an image or an upload.
"""

from __future__ import annotations

import importlib.util
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
MLFLOW_DIR = INFRA / "mlflow"
MLFLOW_DOCKERFILE = (MLFLOW_DIR / "Dockerfile").read_text()
DOCKERFILES = {"infra/Dockerfile": DOCKERFILE, "infra/mlflow/Dockerfile": MLFLOW_DOCKERFILE}


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
COMPOSE = _one(MLFLOW_DIR / "docker-compose.yaml")


def _pods(cluster_spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group of a RayCluster spec."""
    groups = [("head", cluster_spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in cluster_spec["workerGroupSpecs"]
    ]
    return [(name, g["template"]["spec"]) for name, g in groups]


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def _from_images(dockerfile: str) -> list[str]:
    """Every FROM image of a Dockerfile, a ${ARG} resolved to the ARG's default."""
    images = []
    for image in re.findall(r"^FROM\s+(?:--\S+\s+)*(\S+)", dockerfile, re.M):
        if m := re.fullmatch(r"\$\{?(\w+)\}?", image):
            image = re.search(rf"^ARG\s+{m.group(1)}=(\S+)", dockerfile, re.M).group(1)
        images.append(image)
    return images


def _base_image() -> str:
    """The FROM image of infra/Dockerfile."""
    (image,) = _from_images(DOCKERFILE)
    return image


def _instructions(dockerfile: str, keyword: str) -> list[str]:
    """The argument text of every ``keyword`` instruction (ENV, COPY, RUN...), continuations joined."""
    joined = dockerfile.replace("\\\n", " ")
    return re.findall(rf"^{keyword}\s+(.*)$", joined, re.M)


def _dockerfile_env(dockerfile: str) -> dict[str, str]:
    env = {}
    for args in _instructions(dockerfile, "ENV"):
        for assignment in shlex.split(args):
            name, _, value = assignment.partition("=")
            env[name] = value
    return env


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
    return load_pipeline_config(
        [local(c) for c in configs], overrides
    )  # raises ConfigError naming a misspelt key


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
    # The packages the Makefile installs --no-deps, installed the same way, each at one exact
    # version that the Makefile's requirement allows.
    from packaging.requirements import Requirement

    no_deps = (
        re.search(r"^NO_DEPS\s*:=\s*(.+)$", (REPO / "Makefile").read_text(), re.M)
        .group(1)
        .replace('"', "")
        .split()
    )
    installed = [
        Requirement(a)
        for argv in _pip_installs(DOCKERFILE)
        if "--no-deps" in argv
        for a in argv
        if "==" in a
    ]
    for spec in map(Requirement, no_deps):
        pins = [r for r in installed if r.name == spec.name]
        assert pins, f"the image does not install {spec} --no-deps as the Makefile does"
        (version,) = [s.version for s in pins[0].specifier]
        assert spec.specifier.contains(version), (
            f"the image pins {pins[0]}, the Makefile asks {spec}"
        )


def test_constraints_lock_every_requirement_inside_pyprojects_ranges():
    """constraints.txt (what `make install` installs) pins every requirement of the project and
    its dev extra, and every pin lies inside pyproject's range: a lock that drifted from
    pyproject.toml, or a range tightened without re-locking, fails here instead of at install."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lock = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            lock[canonicalize_name(name)] = version
    project = _pyproject()["project"]
    env = {"python_version": "3.11", "extra": "dev"}
    for spec in map(Requirement, project["dependencies"] + project["optional-dependencies"]["dev"]):
        if spec.marker and not spec.marker.evaluate(env):
            continue
        name = canonicalize_name(spec.name)
        assert name in lock, f"constraints.txt does not pin {spec.name}"
        assert spec.specifier.contains(lock[name], prereleases=True), (
            f"constraints.txt pins {spec.name}=={lock[name]} outside pyproject's {spec}"
        )
    assert lock["mlflow"] == _mlflow_server_pin(), "clients and the tracking server differ"


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
    assert re.search(r"/lafma[:@]", image), image
    for spec in (RAYCLUSTER["spec"], RAYJOB["spec"]["rayClusterSpec"]):
        for group, pod in _pods(spec):
            for c in pod["containers"]:
                assert c["image"] == image, f"{group}: {c['image']} != ray_cluster.yaml's {image}"
    for c in (
        (RAYJOB["spec"].get("submitterPodTemplate") or {}).get("spec", {}).get("containers", [])
    ):
        assert c["image"] == image, f"submitter: {c['image']} != ray_cluster.yaml's {image}"


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
    pin = _mlflow_server_pin()
    assert pin and pin.split(".")[:2] == mlflow.__version__.split(".")[:2], (
        pin,
        mlflow.__version__,
    )


@pytest.mark.parametrize(
    "path", ["ray_cluster.yaml", "infra/kuberay/raycluster.yaml", "infra/kuberay/rayjob.yaml"]
)
def test_placeholders_are_marked(path):
    """Account-specific values are visible <placeholders>, never someone's real account id."""
    text = (REPO / path).read_text()
    assert "<account>" in text
    assert not re.search(r"\b\d{12}\.dkr\.ecr\.", text)


# --------------------------------------------------------------------------- security: helpers

# The home of the rayproject/ray images' user (uid 1000), where ~ is inside a Ray container.
RAY_HOME = "/home/ray"
# The key of the Secret KubeRay reads the Ray token from (authOptions.secretName).
TOKEN_KEY = "auth_token"
# Labels the NetworkPolicies admit by (infra/README.md): every Ray pod names its cluster; a pod
# that submits jobs, or a pod that logs to MLflow from outside a Ray cluster, says so.
CLUSTER_LABEL = "lafma/ray-cluster"
SUBMITTER = {"lafma/ray-submitter": "true"}
MLFLOW_CLIENT = {"lafma/mlflow-client": "true"}
# Third-party images and how many version parts their most specific release tag has.
_RELEASE_TAG_PARTS = {"rayproject/ray": 3, "python": 3, "postgres": 2}


def _is_secret_name(name: str) -> bool:
    """An env var that holds a credential (RAY_AUTH_TOKEN_PATH holds where one is, not one)."""
    return bool(
        re.search(r"PASSWORD|SECRET|(^|_)TOKEN($|_)|CREDENTIAL", name, re.I)
    ) and not name.endswith("_PATH")


def _ray_specs() -> list[tuple[str, dict]]:
    return [("raycluster", RAYCLUSTER["spec"]), ("rayjob", RAYJOB["spec"]["rayClusterSpec"])]


def _submitter() -> dict:
    """The RayJob's submitter pod template ({}: KubeRay's default, with no securityContext)."""
    return RAYJOB["spec"].get("submitterPodTemplate") or {}


def _workloads() -> list[tuple[str, dict]]:
    """(where, pod template) of every pod the manifests make: the Ray heads and worker groups,
    the RayJob's submitter, and each Deployment / StatefulSet."""
    out = []
    for name, spec in _ray_specs():
        groups = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec["workerGroupSpecs"]
        ]
        out += [(f"{name}/{g}", group["template"]) for g, group in groups]
    out.append(("rayjob/submitter", _submitter()))
    for f in K8S_FILES:
        for d in _load(f):
            if d["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                out.append((f"{f.name}/{d['metadata']['name']}", d["spec"]["template"]))
    return out


def _kuberay_pods() -> dict[str, list[tuple[str, dict[str, str]]]]:
    """{cluster name: [(group, labels)]}, the head first: each pod's labels as KubeRay sets them,
    its template's plus its own (a RayJob's cluster gets a generated name)."""
    out = {}
    for (kind, spec), resource in zip(_ray_specs(), (RAYCLUSTER, RAYJOB)):
        name = resource["metadata"]["name"]
        cluster = name if kind == "raycluster" else f"{name}-x7k2p"
        groups = [("head", spec["headGroupSpec"])] + [
            (g["groupName"], g) for g in spec["workerGroupSpecs"]
        ]
        out[name] = [
            (
                group,
                {
                    **_labels(g["template"]),
                    "ray.io/cluster": cluster,
                    "ray.io/node-type": "head" if group == "head" else "worker",
                    "ray.io/group": group,
                    "ray.io/is-ray-node": "yes",
                },
            )
            for group, g in groups
        ]
    return out


def _ray_containers() -> list[tuple[str, dict, dict]]:
    """(where, pod spec, container) of every Ray head and worker container."""
    return [
        (f"{name}/{g}", pod, c)
        for name, spec in _ray_specs()
        for g, pod in _pods(spec)
        for c in pod["containers"]
    ]


def _containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _labels(template: dict) -> dict[str, str]:
    return (template.get("metadata") or {}).get("labels") or {}


def _env_entries(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _secret_ref(entry: dict | None) -> tuple[str, str] | None:
    ref = ((entry or {}).get("valueFrom") or {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def _writable_dirs(pod: dict, container: dict) -> list[str]:
    """Mount paths of the container's writable emptyDir volumes."""
    empty = {v["name"] for v in pod.get("volumes", []) if "emptyDir" in v}
    return [
        m["mountPath"]
        for m in container.get("volumeMounts", [])
        if m["name"] in empty and not m.get("readOnly")
    ]


def _docker_env() -> dict[str, str]:
    """The env vars ray_cluster.yaml's `docker run` gives every node's container."""
    argv = shlex.split(" ".join(CLUSTER["docker"]["run_options"]))
    pairs = [v for flag, v in zip(argv, argv[1:]) if flag in ("--env", "-e")]
    pairs += [a.split("=", 1)[1] for a in argv if a.startswith("--env=")]
    return dict(p.split("=", 1) for p in pairs)


def _ray_starts(commands: list[str]) -> list[tuple[dict[str, str], list[str]]]:
    """Each ``ray start`` among a node's shell commands: (its inline VAR=value, its argv)."""
    out = []
    for command in commands:
        for part in re.split(r";|&&|\|\|", command):
            argv = shlex.split(part)
            inline = {}
            while argv and re.fullmatch(r"\w+=.*", argv[0]):
                name, _, value = argv.pop(0).partition("=")
                inline[name] = value
            if argv[:2] == ["ray", "start"]:
                out.append((inline, argv))
    return out


def _flag(argv: list[str], name: str) -> list[str]:
    """The values of ``--name=value`` and ``--name value`` in an argv."""
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{name}=")]
    return values + [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]


def _pip_installs(dockerfile: str) -> list[list[str]]:
    """The argv (after ``pip install``) of every pip install in a Dockerfile's RUN instructions."""
    return [
        shlex.split(m.group(1))
        for run in _instructions(dockerfile, "RUN")
        for m in re.finditer(r"pip install ([^&;|]*)", run)
    ]


def _copies(dockerfile: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY."""
    out = []
    for args in _instructions(dockerfile, "COPY"):
        argv = [a for a in shlex.split(args) if not a.startswith("--")]
        out.append((argv[:-1], argv[-1]))
    return out


def _mlflow_server_pin() -> str | None:
    """The mlflow version infra/mlflow/requirements.txt pins for the server image."""
    path = MLFLOW_DIR / "requirements.txt"
    m = path.is_file() and re.search(
        r"^mlflow(?:\[[\w,]+\])?==([\d.]+)\s*$", path.read_text(), re.M
    )
    return m.group(1) if m else None


def _lines(path: Path) -> list[str]:
    """The non-blank, non-comment lines of a .dockerignore or requirements file."""
    return [
        line.strip()
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def _mlflow_server() -> tuple[dict, dict]:
    """(pod spec, container) of the tracking server's Deployment."""
    (d,) = [d for d in _load(MLFLOW_DIR / "k8s" / "mlflow.yaml") if d["kind"] == "Deployment"]
    pod = d["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


def _compose_env(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    return env if isinstance(env, dict) else dict(e.split("=", 1) for e in env)


def _selects(selector: dict | None, labels: dict[str, str]) -> bool:
    """Kubernetes label selectors: matchLabels and matchExpressions all hold; {} selects all."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        has, values = e["key"] in labels, e.get("values") or []
        holds = {
            "In": has and labels.get(e["key"]) in values,
            "NotIn": not has or labels.get(e["key"]) not in values,
            "Exists": has,
            "DoesNotExist": not has,
        }[e["operator"]]
        if not holds:
            return False
    return True


def _admitted(policies: list[dict], dst: dict, src: dict, port: int, src_ns: str = "lafma") -> bool:
    """Whether NetworkPolicy ingress lets a pod labelled ``src`` in ``src_ns`` open TCP ``port``
    on a pod labelled ``dst`` in namespace lafma (the semantics of networking.k8s.io/v1)."""
    selecting = [
        p["spec"]
        for p in policies
        if p["metadata"]["namespace"] == "lafma"
        and _selects(p["spec"]["podSelector"], dst)
        and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True  # a pod no policy selects is open to every pod of the cluster network
    for spec in selecting:
        for rule in spec.get("ingress") or []:
            ports = rule.get("ports")
            if ports and not any(
                p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports
            ):
                continue
            for peer in rule.get("from") or [{"namespaceSelector": {}}]:  # no `from`: every source
                if "ipBlock" in peer:
                    return True  # an address range can hold any pod: count it as open
                if "namespaceSelector" in peer:
                    in_ns = _selects(
                        peer["namespaceSelector"], {"kubernetes.io/metadata.name": src_ns}
                    )
                else:
                    in_ns = src_ns == "lafma"
                if in_ns and _selects(peer.get("podSelector"), src):
                    return True
    return False


def _network_policies() -> list[dict]:
    files = [INFRA / "kuberay" / "networkpolicy.yaml", MLFLOW_DIR / "k8s" / "networkpolicy.yaml"]
    return [d for f in files if f.is_file() for d in _load(f) if d["kind"] == "NetworkPolicy"]


# --------------------------------------------------------------------------- security: Ray token auth


def test_every_kuberay_container_demands_the_token_from_one_secret():
    for name, spec in _ray_specs():
        auth = spec.get("authOptions") or {}
        assert auth.get("mode") == "token", (
            f"{name}: no authOptions.mode: token — anyone who reaches the dashboard can submit a job "
            "and run code as the lafma-ray service account"
        )
        # A Secret we create (infra/README.md), so the token is known before the cluster exists;
        # KubeRay then also hands it to the containers it adds (autoscaler, wait-gcs-ready, submitter).
        secret = auth.get("secretName")
        assert secret, f"{name}: authOptions.secretName"
        containers = [(g, c) for g, pod in _pods(spec) for c in pod["containers"]]
        if name == "rayjob":
            assert _submitter(), "rayjob: no submitterPodTemplate"
            containers += [("submitter", c) for c in _submitter()["spec"]["containers"]]
        for group, c in containers:
            env = _env_entries(c)
            assert (env.get("RAY_AUTH_MODE") or {}).get("value") == "token", (
                f"{name}/{group}: RAY_AUTH_MODE"
            )
            assert _secret_ref(env.get("RAY_AUTH_TOKEN")) == (secret, TOKEN_KEY), (
                f"{name}/{group}: RAY_AUTH_TOKEN must come from Secret {secret}, key {TOKEN_KEY}"
            )


def test_ec2_nodes_start_ray_with_the_token_from_a_mounted_file():
    env = _docker_env()
    assert env.get("RAY_AUTH_MODE") == "token", (
        "ray_cluster.yaml: docker run_options need --env RAY_AUTH_MODE=token"
    )
    assert "RAY_AUTH_TOKEN" not in env, "the token itself never goes into the cluster config"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    assert path, "ray_cluster.yaml: --env RAY_AUTH_TOKEN_PATH=<the mounted token file>"
    # file_mounts put the token file on every node; a remote ~/x is /home/ray/x in the container.
    remotes = [r.replace("~", RAY_HOME, 1).rstrip("/") for r in CLUSTER.get("file_mounts") or {}]
    assert any(path.startswith(f"{r}/") for r in remotes), (
        f"{path} is not under any file_mounts target {remotes}"
    )
    commands = CLUSTER["head_start_ray_commands"] + CLUSTER["worker_start_ray_commands"]
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = _ray_starts(CLUSTER[kind])
        assert starts, f"no `ray start` in {kind}"
        for inline, _ in starts:
            assert inline.get("RAY_AUTH_MODE", env["RAY_AUTH_MODE"]) == "token", kind
    assert set(re.findall(r"RAY_AUTH_MODE=(\w+)", " ".join(commands))) <= {"token"}


_AUTH_PROBE = """
from ray._raylet import AuthenticationMode, get_authentication_mode
from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled
token_mode = get_authentication_mode() == AuthenticationMode.TOKEN
print(token_mode, get_auth_headers_if_auth_enabled({}).get("authorization"))
"""


def _ray_auth_in(env: dict[str, str], home: Path) -> str:
    """What Ray makes of a process env: "<token mode?> <the Authorization header clients send>"."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run(
        [sys.executable, "-c", _AUTH_PROBE],
        env={**base, "HOME": str(home), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_installed_ray_takes_the_token_the_way_the_cluster_files_give_it(tmp_path):
    """Each node's Ray (server and clients alike) runs in token mode with the secret the files
    point it at: on EC2 a file under the mounted directory, on Kubernetes the Secret's value."""
    token = "lafma-test-token-0123456789abcdef"
    home = tmp_path / "home"
    # EC2: the container's environment, its /home/ray standing in as `home`.
    ec2 = {k: v for k, v in _docker_env().items() if k.startswith("RAY_AUTH")}
    if path := ec2.get("RAY_AUTH_TOKEN_PATH"):
        ec2["RAY_AUTH_TOKEN_PATH"] = str(home / Path(path).relative_to(RAY_HOME))
        Path(ec2["RAY_AUTH_TOKEN_PATH"]).parent.mkdir(parents=True)
        Path(ec2["RAY_AUTH_TOKEN_PATH"]).write_text(token)
    home.mkdir(exist_ok=True)
    assert _ray_auth_in(ec2, home) == f"True Bearer {token}", (
        "ray_cluster.yaml's nodes would run Ray without auth"
    )
    # KubeRay: every Ray container's env, with its Secret references resolved to the token.
    envs = set()
    for _, _, c in _ray_containers():
        env = {}
        for name, entry in _env_entries(c).items():
            if name.startswith("RAY_AUTH"):
                env[name] = token if _secret_ref(entry) else entry.get("value", "")
        envs.add(tuple(sorted(env.items())))
    for env in envs:
        assert _ray_auth_in(dict(env), home) == f"True Bearer {token}", (
            f"a KubeRay container with {env}"
        )


def test_ec2_dashboard_listens_on_loopback_only():
    (head,) = [
        argv for _, argv in _ray_starts(CLUSTER["head_start_ray_commands"]) if "--head" in argv
    ]
    assert _flag(head, "--dashboard-host") == ["127.0.0.1"], (
        f"head dashboard host {_flag(head, '--dashboard-host')}: the job API must be reachable only "
        "through the SSH tunnel of `ray dashboard ray_cluster.yaml`, not from the VPC"
    )
    assert "ray dashboard ray_cluster.yaml" in (INFRA / "README.md").read_text()


# --------------------------------------------------------------------------- security: network


def test_network_policies_admit_only_the_cluster_its_submitters_and_the_operator():
    policies = _network_policies()
    assert (INFRA / "kuberay" / "networkpolicy.yaml").is_file() and policies, (
        "no NetworkPolicy for the Ray pods"
    )
    reach = lambda dst, src, port, ns="lafma": _admitted(policies, dst, src, port, ns)  # noqa: E731
    clusters = _kuberay_pods()
    for name, pods in clusters.items():
        for group, labels in pods:
            assert labels.get(CLUSTER_LABEL) == name, (
                f"{name}/{group}: pod label {CLUSTER_LABEL}: {name}"
            )
            assert any(_selects(p["spec"]["podSelector"], labels) for p in policies), (
                f"{name}/{group}: no NetworkPolicy selects this pod: any pod can reach it"
            )
        (head,) = [labels for g, labels in pods if g == "head"]
        workers = [labels for g, labels in pods if g != "head"]
        # Inside the cluster, everything: the GCS, the object manager, a worker port, the agent.
        for w, port in [(w, port) for w in workers for port in (6379, 8076, 10002, 52365)]:
            assert reach(head, w, port) and reach(w, head, port) and reach(w, w, port), (name, port)
        # Submitters reach the job API and nothing else.
        assert reach(head, SUBMITTER, 8265), f"{name}: a pod labelled {SUBMITTER} cannot submit"
        assert not reach(head, SUBMITTER, 6379) and not any(
            reach(w, SUBMITTER, 8265) for w in workers
        )
        # Nobody else: an unlabelled pod here, a labelled one in another namespace, the other cluster.
        assert not reach(head, {}, 8265) and not reach(head, {}, 6379), (
            f"{name}: open to any pod in lafma"
        )
        assert not reach(head, SUBMITTER, 8265, ns="default"), (
            f"{name}: open to pods of other namespaces"
        )
        others = [labels for other, ps in clusters.items() if other != name for _, labels in ps]
        assert not any(reach(dst, o, 6379) for o in others for dst in [head, *workers]), name
    assert _selects({"matchLabels": SUBMITTER}, _labels(_submitter())), (
        "the RayJob's submitter is not labelled"
    )
    # KubeRay's operator polls the RayJob's job status on the head's dashboard port, from its own namespace.
    operator = {"app.kubernetes.io/name": "kuberay-operator"}
    namespaces = {
        (peer.get("namespaceSelector") or {})
        .get("matchLabels", {})
        .get("kubernetes.io/metadata.name")
        for p in policies
        for rule in p["spec"].get("ingress") or []
        for peer in rule.get("from") or []
        if _selects(peer.get("podSelector"), operator) and peer.get("podSelector")
    } - {None}
    rayjob_head = clusters[RAYJOB["metadata"]["name"]][0][1]
    assert namespaces and all(reach(rayjob_head, operator, 8265, ns) for ns in namespaces)
    # MLflow: Ray pods and labelled clients; its Postgres: MLflow alone.
    docs = {
        d["metadata"]["name"]: d
        for f in K8S_FILES
        for d in _load(f)
        if d["kind"] in ("Deployment", "StatefulSet")
    }
    mlflow, postgres = (
        _labels(docs["mlflow"]["spec"]["template"]),
        _labels(docs["mlflow-postgres"]["spec"]["template"]),
    )
    ray_pods = [labels for pods in clusters.values() for _, labels in pods]
    assert all(reach(mlflow, r, 5000) for r in ray_pods) and reach(mlflow, MLFLOW_CLIENT, 5000)
    assert not reach(mlflow, {}, 5000) and not reach(mlflow, MLFLOW_CLIENT, 5000, ns="default")
    assert reach(postgres, mlflow, 5432)
    assert not reach(postgres, {}, 5432) and not any(reach(postgres, r, 5432) for r in ray_pods)


# --------------------------------------------------------------------------- security: pods and images


def _assert_unprivileged(where: str, merged: dict, own: dict) -> None:
    uid = merged.get("runAsUser")
    assert isinstance(uid, int) and uid > 0, f"{where}: runAsUser must be a non-root uid, not {uid}"
    assert own.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation: false"
    assert "ALL" in (own.get("capabilities") or {}).get("drop", []), (
        f"{where}: capabilities drop ALL"
    )
    assert own.get("readOnlyRootFilesystem") is True, f"{where}: readOnlyRootFilesystem: true"


def test_every_pod_runs_unprivileged_on_a_read_only_root():
    for where, template in _workloads():
        pod = template.get("spec") or {}
        assert pod.get("containers"), (
            f"{where}: no pod template (KubeRay's default submitter has no securityContext)"
        )
        psc = pod.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, f"{where}: pod securityContext.runAsNonRoot: true"
        for c in _containers(pod):
            own = c.get("securityContext") or {}
            _assert_unprivileged(f"{where}/{c['name']}", {**psc, **own}, own)
            assert "/tmp" in _writable_dirs(pod, c), (
                f"{where}/{c['name']}: a read-only root needs an emptyDir on /tmp"
            )
    # KubeRay adds the autoscaler to the head pod with autoscalerOptions' securityContext and mounts.
    for name, spec in _ray_specs():
        head = spec["headGroupSpec"]["template"]["spec"]
        options = spec.get("autoscalerOptions") or {}
        own = options.get("securityContext") or {}
        _assert_unprivileged(
            f"{name}/autoscaler", {**(head.get("securityContext") or {}), **own}, own
        )
        assert "/tmp" in _writable_dirs(head, options), (
            f"{name}/autoscaler: autoscalerOptions.volumeMounts /tmp"
        )
    # The same on the compose machine and the EC2 nodes.
    for name, service in COMPOSE["services"].items():
        assert service.get("read_only") is True, f"compose {name}: read_only: true"
        assert "ALL" in service.get("cap_drop", []), f"compose {name}: cap_drop: [ALL]"
        assert "no-new-privileges:true" in service.get("security_opt", []), (
            f"compose {name}: no-new-privileges"
        )
        assert any(t.split(":")[0] == "/tmp" for t in service.get("tmpfs", [])), (
            f"compose {name}: tmpfs /tmp"
        )
    options = " ".join(CLUSTER["docker"]["run_options"])
    assert re.search(r"--cap-drop[= ]ALL", options) and re.search(
        r"--security-opt[= ]no-new-privileges", options
    )


def test_ray_containers_can_write_where_ray_and_the_jobs_write():
    """With the root read-only, Ray's temp dir and every cache the image and the job env point
    at must be on a writable volume."""
    env = _dockerfile_env(DOCKERFILE)
    env.update({k: v.replace("${HOME}", RAY_HOME) for k, v in RUNTIME_ENV["env_vars"].items()})
    caches = ["TORCH_EXTENSIONS_DIR", "MPLCONFIGDIR", "TRITON_CACHE_DIR", "XDG_CACHE_HOME"]
    missing = [name for name in caches if not env.get(name)]
    assert not missing, f"infra/Dockerfile: set {missing} (else they default to the read-only home)"
    paths = ["/tmp/ray", *(env[name] for name in caches)]
    for where, pod, c in _ray_containers():
        writable = _writable_dirs(pod, c)
        for path in paths:
            assert any(path == w or path.startswith(w.rstrip("/") + "/") for w in writable), (
                f"{where}: {path} is on the read-only root ({writable} are writable)"
            )


def _images() -> list[tuple[str, str]]:
    out = [("ray_cluster.yaml docker.image", CLUSTER["docker"]["image"])]
    for where, template in _workloads():
        out += [
            (f"{where}/{c['name']}", c.get("image", ""))
            for c in _containers(template.get("spec") or {})
        ]
    out += [
        (f"compose {name}", s["image"]) for name, s in COMPOSE["services"].items() if "image" in s
    ]
    out += [
        (f"{name} FROM", image)
        for name, text in DOCKERFILES.items()
        for image in _from_images(text)
    ]
    return out


def test_every_image_is_pinned():
    for where, image in _images():
        ref, _, digest = image.partition("@")
        name, _, tag = ref.rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
        assert tag or digest, f"{where}: {image} has no tag: Docker pulls :latest"
        assert tag != "latest", f"{where}: {image}: latest moves under a running cluster"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), f"{where}: {image}"
        if name.rsplit("/", 1)[-1] in ("lafma", "lafma-mlflow"):
            continue  # ours, built from infra/: tagged per build (infra/README.md)
        parts = _RELEASE_TAG_PARTS.get(name)
        assert parts, (
            f"{where}: {name} is a new base image: say in _RELEASE_TAG_PARTS how its release tags read"
        )
        assert re.match(rf"\d+(\.\d+){{{parts - 1}}}(-|$)", tag), (
            f"{where}: {image}: pin a release ({parts} version parts), not the moving tag {tag}"
        )


def test_every_pip_install_in_the_images_is_pinned():
    exact = re.compile(r"[A-Za-z0-9_.-]+(\[[\w,.-]+\])?==[\w.+!-]+")
    for name, text in DOCKERFILES.items():
        context = REPO if name == "infra/Dockerfile" else MLFLOW_DIR
        for argv in _pip_installs(text):
            files = _flag(argv, "-r")
            for f in files:
                if f == "/tmp/requirements.txt" and name == "infra/Dockerfile":
                    continue  # pyproject's own pins (test_dockerfile_installs_exactly_the_pyproject_pins)
                local = context / Path(f).name
                assert local.is_file(), f"{name}: -r {f}: no {local.name} in the build context"
                reqs = [r for r in _lines(local) if not r.startswith("-")]
                loose = [r for r in reqs if not exact.fullmatch(r.split(";")[0].strip())]
                assert reqs and not loose, f"{name}: {local.name} leaves {loose} unpinned"
            for a in argv:
                if a.startswith("-") or a in files or a == ".":
                    continue  # flags; `pip install --no-deps -e .`: the project itself
                assert exact.fullmatch(a), f"{name}: pip install {a}: pin one exact version"
            if "." in argv:
                assert "--no-deps" in argv, (
                    f"{name}: the project goes in --no-deps, on top of the pinned set"
                )


# --------------------------------------------------------------------------- security: secrets


def _assert_no_credentials(where: str, argv: list[str]) -> None:
    for a in map(str, argv):
        assert not re.search(r"://[^/@\s]*:[^/@\s]+@", a), (
            f"{where}: a password in a URI on the command line: {a}"
        )
        # Kubernetes expands $(VAR) in command/args: the secret lands in the process's argv.
        assert not [v for v in re.findall(r"\$\((\w+)\)", a) if _is_secret_name(v)], f"{where}: {a}"
        assert not re.search(r"--[\w-]*(password|token|secret)[\w-]*[= ]", a, re.I), f"{where}: {a}"
        assert not [v for v in re.findall(r"\b(\w+)=", a) if _is_secret_name(v)], f"{where}: {a}"


def test_no_password_on_a_command_line_in_an_image_or_as_a_default():
    for where, template in _workloads():
        for c in _containers(template.get("spec") or {}):
            for name, entry in _env_entries(c).items():
                if _is_secret_name(name):
                    assert "value" not in entry and _secret_ref(entry), (
                        f"{where}: {name} must come from a Secret"
                    )
            _assert_no_credentials(
                f"{where}/{c['name']}", [*c.get("command", []), *c.get("args", [])]
            )
    compose_text = (MLFLOW_DIR / "docker-compose.yaml").read_text()
    for var, default in re.findall(r"\$\{(\w+):?-([^}]*)\}", compose_text):
        assert not _is_secret_name(var), (
            f"compose: ${{{var}}} defaults to {default!r}: a password nobody chose"
        )
    for name, service in COMPOSE["services"].items():
        for var, value in _compose_env(service).items():
            if _is_secret_name(var):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), (
                    f"compose {name}: {var}: ${{VAR:?message}}"
                )
        _assert_no_credentials(f"compose {name}", service.get("command") or [])
    _assert_no_credentials(
        "ray_cluster.yaml",
        [
            *CLUSTER["docker"]["run_options"],
            *CLUSTER["head_start_ray_commands"],
            *CLUSTER["worker_start_ray_commands"],
        ],
    )
    for name, text in DOCKERFILES.items():
        for kind in ("ENV", "ARG"):
            for args in _instructions(text, kind):
                assert not [a for a in shlex.split(args) if _is_secret_name(a.split("=")[0])], (
                    f"{name}: {kind} {args}"
                )


_SECRET_FILES = (
    ".env",
    ".env.production",
    "infra/mlflow/.env",
    "server.pem",
    "certs/server.pem",
    "tls.key",
    "deploy/tls.key",
    ".aws/credentials",
    ".ssh/id_ed25519",
    "credentials",
    "configs/credentials",
    ".mlflow/credentials",
    ".netrc",
)


def test_secret_files_never_reach_an_image_or_a_job_upload():
    # Docker's own .dockerignore semantics (the docker package is a dependency of mlflow).
    from docker.utils.build import PatternMatcher
    from ray._private.runtime_env.packaging import _get_excludes

    build = PatternMatcher(_lines(REPO / ".dockerignore"))
    upload = _get_excludes(REPO, RUNTIME_ENV["excludes"])
    for path in _SECRET_FILES:
        assert build.matches(path), f".dockerignore lets {path} into the image"
        assert upload(REPO / path), (
            f"infra/runtime_env.yaml's excludes let --working-dir upload {path}"
        )
    assert (MLFLOW_DIR / ".dockerignore").is_file(), "infra/mlflow is a build context of its own"
    mlflow_build = PatternMatcher(_lines(MLFLOW_DIR / ".dockerignore"))
    for path in (".env", "admin.pem", "tls.key", "credentials"):
        assert mlflow_build.matches(path), f"infra/mlflow/.dockerignore lets {path} into the image"
    # What the images copy still goes in.
    for context, matcher, text in (
        (REPO, build, DOCKERFILE),
        (MLFLOW_DIR, mlflow_build, MLFLOW_DOCKERFILE),
    ):
        for sources, _ in _copies(text):
            for src in sources:
                assert src == "." or ((context / src).exists() and not matcher.matches(src)), src
    for path in (
        "pipelines/run_all.py",
        "lafma/config.py",
        "infra/bake_text_encoder.py",
        "pyproject.toml",
    ):
        assert not build.matches(path), path
    # `ray up` copies only the node secrets, from outside the checkout; code travels with --working-dir.
    assert not CLUSTER.get("cluster_synced_files")
    for remote, local in (CLUSTER.get("file_mounts") or {}).items():
        source = Path(os.path.expanduser(local))
        assert source.is_absolute() and not source.resolve().is_relative_to(REPO), (
            f"file_mounts {remote}: {local}"
        )


# --------------------------------------------------------------------------- security: MLflow login


def _read_auth_config(monkeypatch, ini: Path):
    """MLflow's own reader of a basic-auth ini, loaded by path: importing mlflow.server.auth also
    imports the app (Flask-WTF, the mlflow[auth] extra), which the client side does not need."""
    import mlflow

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(ini))
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    spec = importlib.util.spec_from_file_location(
        "auth_config", Path(mlflow.__file__).parent / "server/auth/config.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.read_auth_config()


def test_mlflow_server_demands_a_login_and_clients_have_one(monkeypatch):
    from importlib.metadata import entry_points

    from mlflow.utils.credentials import _get_credentials_path
    from sqlalchemy.engine import make_url

    assert "basic-auth" in {e.name for e in entry_points(group="mlflow.app")}
    _, server = _mlflow_server()
    compose = COMPOSE["services"]["mlflow"]
    for where, argv in (
        ("k8s", [*server.get("command", []), *server["args"]]),
        ("compose", compose["command"]),
    ):
        assert _flag(argv, "--app-name") == ["basic-auth"], (
            f"{where}: mlflow server without --app-name basic-auth: anyone reaching it can "
            "read and write every run"
        )
    pin = _mlflow_server_pin()
    assert pin and re.search(
        r"^mlflow\[auth\]==", (MLFLOW_DIR / "requirements.txt").read_text(), re.M
    )
    assert server["image"].endswith(f":{pin}"), (
        f"{server['image']}: tag it with the mlflow it runs ({pin})"
    )
    # The app's secrets come from Secrets (k8s) or required variables (compose), never a file.
    env, compose_env = _env_entries(server), _compose_env(compose)
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY", "PGPASSWORD"):
        assert _secret_ref(env.get(name)), f"k8s mlflow: {name} from a Secret"
        assert name in compose_env, f"compose mlflow: {name}"
    # The ini the image runs with (MLflow's own reader): no password in it, not even the database's.
    config_path = _dockerfile_env(MLFLOW_DOCKERFILE).get("MLFLOW_AUTH_CONFIG_PATH")
    assert config_path and any(
        "basic_auth.ini" in sources and config_path in (dst, f"{dst.rstrip('/')}/basic_auth.ini")
        for sources, dst in _copies(MLFLOW_DOCKERFILE)
    ), "infra/mlflow/Dockerfile: COPY basic_auth.ini to $MLFLOW_AUTH_CONFIG_PATH"
    config = _read_auth_config(monkeypatch, MLFLOW_DIR / "basic_auth.ini")
    assert config.admin_password is None and make_url(config.database_uri).password is None
    assert config.default_permission in ("READ", "NO_PERMISSIONS")
    # Every Ray container logs in; on EC2 through MLflow's credentials file, mounted on every node.
    for where, _, c in _ray_containers():
        for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            assert _secret_ref(_env_entries(c).get(name)), f"{where}: {name} from a Secret"
    # MLflow reads ~/.mlflow/credentials; a file mount must bring it to every node.
    credentials = Path(_get_credentials_path()).relative_to(Path.home()).as_posix()
    remotes = [r.removeprefix("~/").rstrip("/") for r in CLUSTER.get("file_mounts") or {}]
    assert any(credentials.startswith(f"{r}/") for r in remotes), (
        f"ray_cluster.yaml: file_mounts for ~/{credentials}"
    )


# --------------------------------------------------------------------------- security: the baked model


def _bake_module():
    spec = importlib.util.spec_from_file_location("bake", INFRA / "bake_text_encoder.py")
    bake = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bake)
    return bake


def test_bake_refuses_a_moving_revision():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in ([], ["--revision", "main"], ["--revision", "v1.0"], ["--revision", "0a11ac2"]):
        out = subprocess.run(
            [sys.executable, str(INFRA / "bake_text_encoder.py"), "google/flan-t5-large", *args],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert out.returncode != 0 and "--revision" in out.stderr, (args, out.stderr[-500:])
    assert re.search(r"^ARG TEXT_ENCODER_REVISION\s*$", DOCKERFILE, re.M), (
        "no default: the builder names the commit"
    )
    assert re.search(
        r'bake_text_encoder\.py "\$\{TEXT_ENCODER\}" --revision "\$\{TEXT_ENCODER_REVISION\}"',
        DOCKERFILE,
    )


def test_baked_revision_is_what_offline_loading_resolves(tmp_path):
    """A snapshot baked at a commit is what ``from_pretrained(<hub id>)`` loads with the hub off:
    the check the image runs after baking, on a tiny T5 laid out as the HF cache lays it out."""
    from lafma.text.encoders import tiny_t5_encoder

    bake, repo, sha = (
        _bake_module(),
        "google/flan-t5-large",
        "0123456789abcdef0123456789abcdef01234567",
    )
    snapshot = tmp_path / "hub" / "models--google--flan-t5-large" / "snapshots" / sha
    enc = tiny_t5_encoder(dim=32, layers=1)
    enc.tokenizer.save_pretrained(snapshot)
    enc.model.save_pretrained(snapshot)
    bake.pin_revision(repo, sha, cache_dir=tmp_path / "hub")
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", bake._CHECK, repo],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "d_model=32, loads offline" in out.stdout, out.stderr[-2000:]
