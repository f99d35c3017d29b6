"""cluster/: every file parses, the launcher YAML passes Ray's own schema, the KubeRay manifests run the job config
they name, the schedule runs the same RayJob, Prometheus finds Ray's endpoints and Grafana queries only metrics
that nesta_ray.ops.metrics defines."""

import copy
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE
from ray.autoscaler._private.util import prepare_config, validate_config

from nesta_ray.config.loading import load_config
from nesta_ray.ops.metrics import EXPORTED_NAMES, JOB_TAGS, SPECS

from paths import REPO

CLUSTER = REPO / "cluster"
METRICS_PORT = 8080


def _yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def _entry_config(entrypoint: str) -> tuple[str, str]:
    """(working directory, --config path) of an entrypoint ``cd DIR && python -m nesta_ray.compress --config P``."""
    m = re.fullmatch(r"cd (\S+) && python -m nesta_ray\.compress --config (\S+)", entrypoint)
    assert m, f"entrypoint does not run nesta_ray.compress: {entrypoint!r}"
    return m.group(1), m.group(2)


@pytest.mark.parametrize("path", sorted(p.name for p in CLUSTER.iterdir() if p.suffix in (".yaml", ".yml", ".json")))
def test_every_file_parses(path):
    text = (CLUSTER / path).read_text()
    docs = [json.loads(text)] if path.endswith(".json") else list(yaml.safe_load_all(text))
    assert docs and all(isinstance(d, dict) and d for d in docs)


def test_cluster_launcher_config_passes_rays_schema():
    cfg = _yaml("ray-cluster.yaml")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # unknown keys fail here
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` runs: head type known, worker counts fit
    workers = [t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]]
    assert [t["resources"]["GPU"] for t in workers] == [load_config(str(REPO / "configs/llama70b.yaml")).runtime.workers]
    head, gpu = " ".join(cfg["head_setup_commands"]), " ".join(cfg["worker_setup_commands"])
    assert "download.pytorch.org/whl/cpu" in head and "whl/cpu" not in gpu  # CPU torch on the head only
    assert all("nesta_ray[gguf]" in cmds for cmds in (head, gpu))
    assert cfg["file_mounts"]["~/nesta_ray"] == "."
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert f"--metrics-export-port={METRICS_PORT}" in " ".join(cfg[key])


def test_rayjob_runs_the_70b_config_on_gpu_workers():
    job = _yaml("kuberay-rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob") and job["metadata"]["name"]
    spec = job["spec"]
    workdir, config_path = _entry_config(spec["entrypoint"])
    cfg = load_config(str(REPO / config_path))  # the config the job runs exists and validates
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    (group,) = cluster["workerGroupSpecs"]
    (container,) = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus == cfg.runtime.workers == int(container["resources"]["requests"]["nvidia.com/gpu"])
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pods = [cluster["headGroupSpec"]["template"]["spec"], group["template"]["spec"]]
    for pod, params in zip(pods, [cluster["headGroupSpec"]["rayStartParams"], group["rayStartParams"]]):
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        assert ports["metrics"] == int(params["metrics-export-port"]) == METRICS_PORT  # what prometheus.yml keeps
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(rf"^WORKDIR {re.escape(workdir)}\b", dockerfile, re.M)
    assert {c["image"] for pod in pods for c in pod["containers"]} == {"registry.example.com/nesta-ray:0.1.0"}


def test_nightly_schedule_creates_the_same_rayjob():
    cron, job = _yaml("kuberay-raycronjob.yaml"), _yaml("kuberay-rayjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    fields = cron["spec"]["schedule"].split()
    assert len(fields) == 5 and fields[2:] == ["*", "*", "*"]  # once a day
    assert cron["spec"]["jobTemplate"] == job["spec"]
    assert job["spec"]["activeDeadlineSeconds"] < 24 * 3600  # a night ends before the next starts


def test_prometheus_scrapes_rays_discovery_file_and_kuberay_metrics_ports():
    prom = _yaml("prometheus.yml")
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    (sd,) = jobs["ray"]["file_sd_configs"]
    assert [os.path.basename(f) for f in sd["files"]] == [PROMETHEUS_SERVICE_DISCOVERY_FILE]
    keep = {r["source_labels"][0]: r["regex"] for r in jobs["kuberay"]["relabel_configs"] if r.get("action") == "keep"}
    assert keep == {"__meta_kubernetes_pod_label_ray_io_is_ray_node": "yes",
                    "__meta_kubernetes_pod_container_port_name": "metrics"}


def _exprs(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_grafana_queries_only_and_all_metrics_nesta_ray_exports():
    dash = json.loads((CLUSTER / "grafana-dashboard.json").read_text())
    assert dash["uid"] and dash["title"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    queries = _exprs(dash) + [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    used = {name for q in queries for name in re.findall(r"\bray_\w+", q)}
    assert used <= set(EXPORTED_NAMES), f"unknown metrics {sorted(used - set(EXPORTED_NAMES))}"
    assert set(EXPORTED_NAMES) <= {n for q in _exprs(dash) for n in re.findall(r"\bray_\w+", q)}
    labels = set(JOB_TAGS) | {t for s in SPECS for t in s.tags}
    for q in queries:
        named = set(re.findall(r"(\w+)\s*=~?\s*\"", q)) | {x.strip() for g in re.findall(r"by \(([^)]*)\)", q)
                                                           for x in g.split(",")}
        named |= set(re.findall(r"label_values\([^,]+,\s*(\w+)\)", q))
        assert named <= labels, f"{q}: labels {sorted(named - labels)} are not tags of nesta_ray.ops.metrics"
    variables = {v["name"] for v in dash["templating"]["list"] if v["type"] == "query"}
    assert variables == set(JOB_TAGS)
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dash["panels"])
