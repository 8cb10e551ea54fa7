"""Cluster definitions: Prometheus config, Grafana dashboard, Ray and KubeRay YAML, launch."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
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


def test_ray_cluster_yaml_installs_this_package_and_keeps_token_auth():
    cfg = yaml.safe_load((CLUSTER / "ray-cluster-gpu.yaml").read_text())
    mounts = cfg["file_mounts"]
    src = ROOT / mounts["~/seqface-dist"]  # `ray up` runs from the repository root
    assert tomllib.loads((src / "pyproject.toml").read_text())["project"]["name"] == "seqface-dist"
    assert any("pip install -e ~/seqface-dist" in c for c in cfg["setup_commands"])
    assert {".venv", "runs"} <= {e.split("/")[-1] for e in cfg["rsync_exclude"]}
    assert mounts["~/.ray/auth_token"] == "~/.ray/auth_token"
    for cmds in (cfg["head_start_ray_commands"], cfg["worker_start_ray_commands"]):
        starts = [c for c in cmds if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts)
    prom = next(c for c in cfg["head_start_ray_commands"] if "prometheus" in c)
    conf = prom.split("--config.file=")[1].split()[0].replace("$HOME/seqface-dist/", "")
    assert (ROOT / conf).is_file()
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
