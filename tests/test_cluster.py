"""Cluster definitions: Prometheus config, Grafana dashboard, Ray and KubeRay YAML, launch."""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from prom_util import require
from promql_util import (
    dashboard_queries,
    dashboard_variable_queries,
    metric_names_in_promql,
)

from seqface_dist.metrics import EXPORTED_METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]
CLUSTER, LAUNCH = ROOT / "cluster", ROOT / "launch"
SD_GLOB = "/tmp/seqface/sd/*.json"  # where the driver's discovery files go on the head node
IMAGE_ROOT = "/home/ray/seqface-dist/"  # the repository inside cluster/Dockerfile's image
CLUSTER_CONFIG = Path("configs/cluster-8gpu.yaml")  # what the cluster manifests train
# Series Prometheus makes itself for every target.
PROMETHEUS_BUILTINS = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


@pytest.fixture(scope="module")
def promtool() -> str:
    return require("promtool")


def load_all(name: str) -> list[dict]:
    return list(yaml.safe_load_all((CLUSTER / name).read_text()))


def console_scripts() -> dict[str, str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def check_seqface_command(argv: list[str]) -> Path:
    """argv runs `seqface train --config X`: the script and subcommand exist; return X."""
    assert argv[0] in console_scripts(), f"{argv[0]} is not a console script in pyproject"
    assert console_scripts()[argv[0]] == "seqface_dist.cli:main"
    from seqface_dist.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert argv[1] in sub.choices, f"seqface has no subcommand {argv[1]!r}"
    assert argv[2] == "--config"
    return Path(argv[3])


def check_config_path(path: Path) -> None:
    assert path.parts[0] == "configs" and path.suffix == ".yaml", path
    assert (ROOT / path).is_file(), f"{path} is named but not in the repository"


# ---------------------------------------------------------------------------- Prometheus


def test_promtool_accepts_the_scrape_config(tmp_path, promtool):
    r = subprocess.run([promtool, "check", "config", str(CLUSTER / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
    # The copies embedded in the KubeRay manifests (Prometheus sidecar) are valid too.
    for name in ("kuberay-raycluster.yaml", "kuberay-rayjob.yaml"):
        cm = next(d for d in load_all(name) if d["kind"] == "ConfigMap")
        f = tmp_path / f"{name}.prometheus.yml"
        f.write_text(cm["data"]["prometheus.yml"])
        r = subprocess.run([promtool, "check", "config", str(f)], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, (name, r.stdout + r.stderr)


def test_promtool_rejects_a_broken_config(tmp_path, promtool):
    # The check above can fail: an unknown field is refused.
    cfg = yaml.safe_load((CLUSTER / "prometheus.yml").read_text())
    cfg["scrape_configs"][0]["file_sd_config"] = cfg["scrape_configs"][0].pop("file_sd_configs")
    f = tmp_path / "bad.yml"
    f.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([promtool, "check", "config", str(f)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0


def test_scrape_config_uses_the_discovery_glob_and_5s_interval():
    cfg = yaml.safe_load((CLUSTER / "prometheus.yml").read_text())
    assert cfg["global"]["scrape_interval"] == "5s"
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "seqface")
    assert job["honor_labels"] is True
    assert job["file_sd_configs"][0]["files"] == [SD_GLOB]


# ---------------------------------------------------------------------------- Grafana


def test_dashboard_is_valid_json_and_queries_only_exported_metrics():
    dash = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    queries = list(dashboard_queries(dash)) + list(dashboard_variable_queries(dash))
    assert len(queries) >= 20
    used = set()
    for title, expr in queries:
        names = metric_names_in_promql(expr)
        assert names, f"panel {title!r}: no metric in {expr!r}"
        unknown = names - EXPORTED_METRIC_NAMES - PROMETHEUS_BUILTINS
        assert not unknown, f"panel {title!r} queries unexported {sorted(unknown)}: {expr}"
        used |= names
    # Panels for what the issue asks for.
    titles = " | ".join(t.lower() for t, _ in dashboard_queries(dash))
    for word in ("throughput", "loss", "step time", "bad samples", "s3", "shard", "memory",
                 "head rows", "accuracy", "tar @ far", "hinge", "learning rate"):
        assert word in titles, word
    for name in ("seqface_samples_total", "seqface_loss", "seqface_step_phase_seconds_sum",
                 "seqface_bad_samples_total", "seqface_process_resident_memory_bytes"):
        assert name in used
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}"
               for p in dash["panels"] if p["type"] != "row")


def test_promql_name_extraction_can_fail():
    # The dashboard check relies on this: an unknown name is reported, functions are not.
    expr = 'sum by (rank) (rate(seqface_not_a_metric_total{run=~"$run"}[5m])) / seqface_loss'
    assert metric_names_in_promql(expr) == {"seqface_not_a_metric_total", "seqface_loss"}


# ---------------------------------------------------------------------------- Ray cluster YAML


def test_ray_cluster_yaml_passes_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    cfg = yaml.safe_load((CLUSTER / "ray-cluster-gpu.yaml").read_text())
    for key in ("cluster_name", "provider", "auth", "available_node_types", "head_node_type"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws"
    assert cfg["head_node_type"] in cfg["available_node_types"]
    validate_config(prepare_config(cfg))  # raises on a schema violation
    gpu_types = [t["node_config"]["InstanceType"] for t in cfg["available_node_types"].values()]
    assert any(t.startswith(("g5.", "p4d.", "p5.")) for t in gpu_types), gpu_types


def test_ray_cluster_yaml_runs_the_project_image_and_keeps_token_auth():
    import ray

    cfg = yaml.safe_load((CLUSTER / "ray-cluster-gpu.yaml").read_text())
    # Every command runs in the image the KubeRay manifests use (Python 3.11 + pinned
    # stack), never on the AMI's own Python.
    (rc,) = [d for d in load_all("kuberay-raycluster.yaml") if d["kind"] == "RayCluster"]
    image = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    assert cfg["docker"]["image"] == image
    assert not {"head_image", "worker_image"} & set(cfg["docker"])
    commands = [c for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                for c in cfg.get(key, [])]
    assert not [c for c in commands if "pip install" in c], "the image holds the package"
    check = " ".join(cfg["setup_commands"])
    assert "import seqface_dist" in check and f"'{ray.__version__}'" in check
    # A mount at the image's repository would hide it.
    mounts = cfg["file_mounts"]
    assert not any(dst.rstrip("/") in ("~/seqface-dist", IMAGE_ROOT.rstrip("/"))
                   for dst in mounts)
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        starts = [c for c in cmds if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    prom = next(c for c in cfg["head_start_ray_commands"] if "prometheus" in c)
    conf = prom.split("--config.file=")[1].split()[0]
    assert conf.startswith("$HOME/seqface-dist/")  # $HOME is /home/ray in the image
    assert (ROOT / conf.replace("$HOME/seqface-dist/", "")).is_file()
    assert any("/tmp/seqface/sd" in c for c in cfg["head_setup_commands"])


# ---------------------------------------------------------------------------- KubeRay


def _check_pod_template(t: dict, where: str) -> list[dict]:
    containers = t["spec"]["containers"]
    assert containers, where
    for c in containers:
        assert c.get("name") and c.get("image"), f"{where}: a container needs name and image"
    return containers


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    import ray

    assert spec["rayVersion"] == ray.__version__, f"{where}.rayVersion vs installed Ray"
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)  # required before KubeRay 1.4
    containers = _check_pod_template(head["template"], f"{where}.headGroupSpec")
    ray_head = containers[0]
    assert ray_head["image"].endswith(":0.1.0") and "seqface-dist" in ray_head["image"]
    mounts = {m["mountPath"] for c in containers for m in c.get("volumeMounts", [])}
    assert os.path.dirname(SD_GLOB) in mounts  # the sidecar sees the driver's files
    assert spec["workerGroupSpecs"], where
    for g in spec["workerGroupSpecs"]:
        w = f"{where}.workerGroupSpecs[{g.get('groupName')}]"
        assert g["groupName"] and isinstance(g["rayStartParams"], dict), w
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"], w
        (c,) = _check_pod_template(g["template"], w)
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, w
        assert c["image"] == ray_head["image"], w


def test_kuberay_raycluster_has_the_required_fields():
    docs = load_all("kuberay-raycluster.yaml")
    (rc,) = [d for d in docs if d["kind"] == "RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1" and rc["metadata"]["name"]
    _check_ray_cluster_spec(rc["spec"], "RayCluster.spec")
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{rc['spec']['rayVersion']}-" in dockerfile


def test_kuberay_rayjob_runs_seqface_train_on_the_same_cluster_spec():
    (rj,) = [d for d in load_all("kuberay-rayjob.yaml") if d["kind"] == "RayJob"]
    (rc,) = [d for d in load_all("kuberay-raycluster.yaml") if d["kind"] == "RayCluster"]
    assert rj["apiVersion"] == "ray.io/v1" and rj["metadata"]["name"]
    spec = rj["spec"]
    assert spec["rayClusterSpec"] == rc["spec"]  # one cluster definition, two uses
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob.spec.rayClusterSpec")
    assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    assert spec["shutdownAfterJobFinishes"] is True
    config = check_seqface_command(shlex.split(spec["entrypoint"]))
    assert str(config).startswith(IMAGE_ROOT)
    check_config_path(Path(str(config)[len(IMAGE_ROOT):]))


def cluster_config():
    from seqface_dist.config import load_config

    return load_config(ROOT / CLUSTER_CONFIG)


def gpus_needed(cfg) -> int:
    """GPUs a training config asks Ray for: one per Train worker when use_gpu."""
    return cfg.train.num_workers if cfg.train.use_gpu else 0


def gpus_per_pod(group: dict) -> int:
    (c,) = group["template"]["spec"]["containers"]
    res = c["resources"]
    assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"]
    return int(res["limits"]["nvidia.com/gpu"])


def gpus_reserved(spec: dict) -> int:
    """GPUs a RayCluster spec's worker groups hold: replicas x GPUs per pod."""
    return sum(g["replicas"] * gpus_per_pod(g) for g in spec["workerGroupSpecs"])


def ray_cluster_specs() -> list[tuple[str, dict]]:
    (rc,) = [d for d in load_all("kuberay-raycluster.yaml") if d["kind"] == "RayCluster"]
    (rj,) = [d for d in load_all("kuberay-rayjob.yaml") if d["kind"] == "RayJob"]
    return [("kuberay-raycluster.yaml", rc["spec"]),
            ("kuberay-rayjob.yaml", rj["spec"]["rayClusterSpec"])]


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"]
                                                  for g in spec["workerGroupSpecs"]]


def test_kuberay_worker_gpus_are_what_the_cluster_config_trains_on():
    cfg = cluster_config()
    assert cfg.train.use_gpu and gpus_needed(cfg) == cfg.train.num_workers
    (rj,) = [d for d in load_all("kuberay-rayjob.yaml") if d["kind"] == "RayJob"]
    assert shlex.split(rj["spec"]["entrypoint"])[3] == IMAGE_ROOT + str(CLUSTER_CONFIG)
    for name, spec in ray_cluster_specs():
        assert gpus_reserved(spec) == gpus_needed(cfg), (
            f"{name}: worker replicas x nvidia.com/gpu = {gpus_reserved(spec)}, "
            f"{CLUSTER_CONFIG} trains {gpus_needed(cfg)} GPU workers")
        for g in spec["workerGroupSpecs"]:
            # Without an autoscaler nothing grows the group past replicas.
            assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], name
            (c,) = g["template"]["spec"]["containers"]
            cpus = int(c["resources"]["limits"]["cpu"])
            assert cpus >= gpus_per_pod(g) * cfg.train.cpus_per_worker, name
    # The check can fail: one more replica reserves GPUs no worker uses.
    _, spec = ray_cluster_specs()[0]
    spec["workerGroupSpecs"][0]["replicas"] += 1
    assert gpus_reserved(spec) != gpus_needed(cfg)


def _tsdb_volume(template: dict) -> dict:
    (prom,) = [c for c in template["spec"]["containers"] if c["name"] == "prometheus"]
    path = next(a.split("=", 1)[1] for a in prom["args"] if a.startswith("--storage.tsdb.path="))
    (mount,) = [m for m in prom["volumeMounts"] if m["mountPath"] == path]
    (vol,) = [v for v in template["spec"]["volumes"] if v["name"] == mount["name"]]
    return vol


def test_prometheus_sidecar_keeps_its_data_on_a_pvc_outside_the_cluster():
    for name, spec in ray_cluster_specs():
        vol = _tsdb_volume(spec["headGroupSpec"]["template"])
        claim = vol["persistentVolumeClaim"]["claimName"]  # not an emptyDir: outlives the pod
        (pvc,) = [d for d in load_all(name) if d["kind"] == "PersistentVolumeClaim"]
        assert pvc["metadata"]["name"] == claim, name
        assert pvc["spec"]["resources"]["requests"]["storage"], name
        assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"], name
        # Prometheus runs as nobody (65534): the volume must be writable for it.
        assert spec["headGroupSpec"]["template"]["spec"]["securityContext"]["fsGroup"] == 65534


def _metrics_ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])
            if p["name"].startswith("sf-metrics-")}


def test_podmonitor_scrapes_the_fixed_worker_ports_of_the_config():
    cfg = cluster_config()
    base = cfg.metrics.port
    assert base > 0, f"{CLUSTER_CONFIG}: metrics.port must be a fixed base for the PodMonitor"
    assert cfg.metrics.host == "0.0.0.0"
    (pm,) = load_all("kuberay-podmonitor.yaml")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1" and pm["kind"] == "PodMonitor"
    endpoints = pm["spec"]["podMetricsEndpoints"]
    monitored = [e["port"] for e in endpoints]
    assert len(monitored) == len(set(monitored))
    assert all(e["path"] == "/metrics" and e["honorLabels"] is True for e in endpoints)
    selector = pm["spec"]["selector"]["matchLabels"]
    assert selector.get("ray.io/node-type") == "worker"  # KubeRay's label on worker pods
    for name, spec in ray_cluster_specs():
        for g in spec["workerGroupSpecs"]:
            labels = g["template"]["metadata"]["labels"]
            own = {k: v for k, v in selector.items() if not k.startswith("ray.io/")}
            assert own and own.items() <= labels.items(), name
            (c,) = g["template"]["spec"]["containers"]
            ports = _metrics_ports(c)
            # One port per local rank: base + 0 .. base + GPUs per pod - 1.
            assert sorted(ports.values()) == [base + k for k in range(gpus_per_pod(g))], name
            assert sorted(ports) == sorted(monitored), name
            assert all(len(n) <= 15 for n in ports)  # Kubernetes' limit for port names
            all_ports = [p["containerPort"] for p in c["ports"]]
            assert len(all_ports) == len(set(all_ports)), name


def test_s3_credentials_service_account_and_secret_reach_every_ray_pod():
    docs = {d["kind"]: d for d in load_all("kuberay-s3-credentials.yaml")}
    sa, secret = docs["ServiceAccount"], docs["Secret"]
    role = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert role.startswith("arn:aws:iam::") and "REPLACE" in role  # a marked placeholder
    keys = secret["stringData"]
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"} <= set(keys)
    assert keys["AWS_ACCESS_KEY_ID"] == keys["AWS_SECRET_ACCESS_KEY"] == "REPLACE-ME"
    # The README's `kubectl apply -l` selectors pick one document each.
    assert sa["metadata"]["labels"] != secret["metadata"]["labels"]
    for name, spec in ray_cluster_specs():
        for t in pod_templates(spec):
            assert t["spec"]["serviceAccountName"] == sa["metadata"]["name"], name
            ray_container = t["spec"]["containers"][0]
            refs = [e["secretRef"] for e in ray_container["envFrom"]]
            # optional: with IRSA the Secret need not exist.
            assert refs == [{"name": secret["metadata"]["name"], "optional": True}], name


# ---------------------------------------------------------------------------- launch/


def test_runtime_envs_are_valid_for_ray_and_exclude_local_state():
    from ray.runtime_env import RuntimeEnv

    gpu = yaml.safe_load((LAUNCH / "runtime_env.yaml").read_text())
    cpu = yaml.safe_load((LAUNCH / "runtime_env_cpu.yaml").read_text())
    for env in (gpu, cpu):
        RuntimeEnv(**env)  # Ray's own validation of the fields
        assert env["working_dir"] == "."
        assert {".venv/", "runs/", ".git/"} <= set(env["excludes"])
    assert "DS_ACCELERATOR" not in gpu["env_vars"]  # GPU nodes pick CUDA themselves
    assert cpu["env_vars"]["DS_ACCELERATOR"] == "cpu"


def _run_submit(tmp_path, env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"PATH": os.environ["PATH"], "HOME": str(home), **env_extra}
    return subprocess.run(["bash", str(LAUNCH / "submit.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=60, cwd=tmp_path)


def test_submit_script_builds_the_ray_job_command_and_keeps_auth(tmp_path):
    r = subprocess.run(["bash", "-n", str(LAUNCH / "submit.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    text = (LAUNCH / "submit.sh").read_text()
    assert "disabled" not in text.split("set -euo pipefail")[1]  # never turns auth off
    assert "~/.ray/auth_token" in text
    # The `ray` it calls is swapped for a recorder of its argv and auth environment.
    rec = tmp_path / "ray_recorder.sh"
    out = tmp_path / "argv.txt"
    rec.write_text(f'#!/bin/sh\nprintf "%s\\n" "$RAY_AUTH_MODE" "$RAY_AUTH_TOKEN" "$@" > {out}\n')
    rec.chmod(0o755)
    env = {"RAY": str(rec), "RAY_ADDRESS": "http://127.0.0.1:8265", "RAY_AUTH_TOKEN": "t0k",
           "CONFIG": "pyproject.toml"}  # any existing file: configs/ come with training
    r = _run_submit(tmp_path, env, "optim.lr=0.05")
    assert r.returncode == 0, r.stderr
    argv = out.read_text().splitlines()
    assert argv[:2] == ["token", "t0k"]
    assert argv[2:] == ["job", "submit", "--address", "http://127.0.0.1:8265", "--runtime-env",
                        "launch/runtime_env.yaml", "--", "seqface", "train", "--config",
                        "pyproject.toml", "optim.lr=0.05"]
    check_seqface_command(argv[argv.index("--") + 1:])

    r = _run_submit(tmp_path, {"RAY": str(rec), "RAY_ADDRESS": "http://x:8265",
                               "CONFIG": "pyproject.toml"})
    assert r.returncode == 2 and "no token" in r.stderr  # no token anywhere: refuses
    r = _run_submit(tmp_path, {"RAY": str(rec), "RAY_AUTH_TOKEN": "t"})
    assert r.returncode != 0 and "RAY_ADDRESS" in r.stderr
    r = _run_submit(tmp_path, {"RAY": str(rec), "RAY_ADDRESS": "http://x:8265",
                               "RAY_AUTH_TOKEN": "t", "CONFIG": "configs/nope.yaml"})
    assert r.returncode == 2 and "configs/nope.yaml not found" in r.stderr


def test_submit_script_default_config_is_the_cluster_config():
    text = (LAUNCH / "submit.sh").read_text()
    default = text.split('CONFIG="${CONFIG:-')[1].split("}")[0]
    check_config_path(Path(default))


# ---------------------------------------------------------------------------- image


def dockerfile() -> list[tuple[str, str]]:
    """cluster/Dockerfile as (INSTRUCTION, arguments), continuation lines joined."""
    out, buf = [], ""
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        instr, _, args = buf.strip().partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


def copy_sources(args: str) -> list[str]:
    words = [w for w in shlex.split(args) if not w.startswith("--")]
    return words[:-1]


def pip_installs(run: str) -> list[list[str]]:
    """The argument lists of every `pip install` in one RUN."""
    found = []
    for part in run.split("&&"):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i] in ("pip", "pip3") and words[i + 1] == "install":
                found.append(words[i + 2:])
    return found


def dependency_layer() -> tuple[list[str], str, list[str]]:
    """(files the dependency layer copies, its requirements command, its pip arguments)."""
    steps = dockerfile()
    copies = [i for i, (k, _) in enumerate(steps) if k == "COPY"]
    dep_run = next(i for i, (k, a) in enumerate(steps)
                   if k == "RUN" and any("-r" in p for p in pip_installs(a)))
    files = [f for i in copies if i < dep_run for f in copy_sources(steps[i][1])]
    make_reqs, _ = steps[dep_run][1].split("&&", 1)
    (pip_args,) = pip_installs(steps[dep_run][1])
    return files, make_reqs, pip_args


def pyproject_dependencies() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]


def constraints_gpu() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints-gpu.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version and "[" not in name, f"constraints-gpu.txt: pin {line!r} with =="
            pins[name.strip().lower()] = version.strip()
    return pins


def test_dockerfile_installs_dependencies_before_the_source_as_a_non_root_user():
    import ray

    steps = dockerfile()
    kinds = [k for k, _ in steps]
    (base,) = [a for k, a in steps if k == "FROM"]
    # An exact release tag of the Ray the manifests name (a digest may follow), never latest.
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py311-(gpu|cu\d+)(@sha256:[0-9a-f]{64})?",
                     base)
    assert m, f"FROM {base}: pin an exact rayproject/ray X.Y.Z-py311 GPU tag"
    assert m.group(1) == ray.__version__ == constraints_gpu()["ray"]
    # Non-root before anything runs, and at the end.
    users = [a for k, a in steps if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert kinds.index("USER") < kinds.index("RUN")
    assert [a for k, a in steps if k == "WORKDIR"][-1] == IMAGE_ROOT.rstrip("/")
    # Dependencies first: only what their install reads is copied before it.
    files, _, pip_args = dependency_layer()
    assert sorted(files) == ["constraints-gpu.txt", "pyproject.toml"], files
    assert pip_args[pip_args.index("-c") + 1] == "constraints-gpu.txt"
    copies = [i for i, k in enumerate(kinds) if k == "COPY"]
    src_copy = next(i for i in copies if {".", "seqface_dist"} & set(copy_sources(steps[i][1])))
    dep_run = next(i for i, (k, a) in enumerate(steps) if k == "RUN" and "-r" in a)
    assert dep_run < src_copy
    # The package: non-editable, after the source, its dependencies already in place.
    installs = [p for k, a in steps if k == "RUN" for p in pip_installs(a)]
    assert not [p for p in installs if "-e" in p or "--editable" in p]
    final = installs[-1]
    assert final[-1] == "." and "--no-deps" in final
    assert kinds.index("RUN", src_copy) > src_copy


def test_dockerfile_requirements_command_lists_pyprojects_dependencies(tmp_path):
    files, make_reqs, _ = dependency_layer()
    for f in files:
        (tmp_path / f).write_bytes((ROOT / f).read_bytes())
    words = shlex.split(make_reqs)
    assert words[:2] == ["python", "-c"] and words[3] == ">"
    r = subprocess.run([sys.executable, "-c", words[2]], cwd=tmp_path, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == pyproject_dependencies()


def test_constraints_gpu_pins_the_stack_the_cluster_files_assume():
    import ray
    from packaging.requirements import Requirement

    pins = constraints_gpu()
    assert {"ray", "torch", "deepspeed"} <= set(pins)
    assert pins["ray"] == ray.__version__  # = rayVersion and the image's tag (tests above)
    deps = {Requirement(d).name.lower(): Requirement(d) for d in pyproject_dependencies()}
    for name, version in pins.items():
        assert name in deps, f"constraints-gpu.txt pins {name}, not a dependency"
        assert deps[name].specifier.contains(version), (name, version, str(deps[name]))
    assert "+" not in pins["torch"]  # the CUDA build from the index, not a +cpu one
    assert "ray" in deps and {"default", "train"} <= deps["ray"].extras


DOCKERIGNORED = {"demo-out", "shards", ".env", "runs", ".venv", ".git"}


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_image():
    patterns = set()
    for line in (CLUSTER / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")):
            patterns.add(line.strip("/"))
    assert DOCKERIGNORED <= patterns, DOCKERIGNORED - patterns
    # Every local output .gitignore names at the root is excluded too.
    for line in (ROOT / ".gitignore").read_text().splitlines():
        line = line.strip()
        if line.startswith("/") and not line.startswith("/*"):
            assert line.strip("/") in patterns, line
    assert "**/__pycache__" in patterns


def _pip_env() -> dict[str, str]:
    """pip as a docker build sees it: the default index, no local wheels or caps."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX",
                        "PIP_REQUIREMENT", "PIP_TARGET", "PIP_PREFIX", "PIP_USER")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


@pytest.mark.slow  # ~25 s: resolves the whole GPU stack against the package index
def test_image_dependency_layer_resolves_with_the_gpu_constraints(tmp_path):
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    if (sys.implementation.name, sys.version_info[:2], sys.platform, platform.machine()) != (
            "cpython", (3, 11), "linux", "x86_64"):
        pytest.skip("resolves with this interpreter's tags: needs CPython 3.11 on linux "
                    "x86_64 (the image's); DeepSpeed is an sdist, so --platform cannot stand in")
    env = _pip_env()
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "deepspeed"],
                           capture_output=True, text=True, timeout=60, env=env)
    if probe.returncode != 0:
        pytest.skip("package index unreachable (pip index versions: "
                    f"{probe.stderr.strip()[-200:]})")
    # The layer exactly as the Dockerfile builds it: its files, its requirements command, its
    # pip arguments, resolved without installing.
    files, make_reqs, pip_args = dependency_layer()
    for f in files:
        (tmp_path / f).write_bytes((ROOT / f).read_bytes())
    words = shlex.split(make_reqs)
    reqs = tmp_path / "requirements.txt"
    reqs.write_text(subprocess.run([sys.executable, "-c", words[2]], cwd=tmp_path, check=True,
                                   capture_output=True, text=True).stdout)
    pip_args[pip_args.index("-r") + 1] = str(reqs)
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", *pip_args, "--dry-run",
                        "--ignore-installed", "--quiet", "--report", str(report)],
                       cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
           for i in json.loads(report.read_text())["install"]}
    for name, version in constraints_gpu().items():
        assert got[canonicalize_name(name)] == version, (name, got.get(name))
    missing = {canonicalize_name(Requirement(d).name) for d in pyproject_dependencies()} - set(got)
    assert not missing, missing
    # The CUDA build of torch (its CUDA libraries are wheels), and ray's extras resolved.
    assert any(n.startswith("nvidia-") for n in got), sorted(got)
    assert {"aiohttp", "pyarrow"} <= set(got)  # ray[default] (dashboard), ray[train]
