"""JobMetrics on a real `ray start --head` node: values recorded in a driver and in an actor reach the node's
Prometheus endpoint under the exported names that cluster/grafana-dashboard.json uses, and the node lists that
endpoint in the discovery file cluster/prometheus.yml reads."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from nesta_ray.ops.metrics import EXPORTED_NAMES, SPECS

from paths import REPO
from ray_head import head_node

# Ray's default export interval is 10 s; 1 s keeps the test short (the setting only changes how often, not what).
ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
       "RAY_metrics_report_interval_ms": "1000"}
ENV.pop("RAY_ADDRESS", None)

DRIVER = """
import sys, time, ray
from nesta_ray.ops.metrics import JobMetrics
ray.init(address=sys.argv[1], log_to_driver=False)
metrics = JobMetrics("nightly", "run-1", "smollm2<135m>")

@ray.remote(num_cpus=0)
class Shard:
    def layer(self, m):
        m.layer_done(1, 2.5, 0.03, {"eigen_fallbacks": 2, "clamped_eigenvalues": 0})
        m.bytes_written(1000)
        return True

shard = Shard.remote()
assert ray.get(shard.layer.remote(metrics))
metrics.layers_total(2)
metrics.layer_done(0, 1.5, 0.02, {})
metrics.bytes_written(24)
metrics.drift(0, 0.125)
metrics.gate(False)
metrics.run_finished(12.0)
print("recorded", flush=True)
time.sleep(120)  # keep the gauges' process alive until the test has scraped them
"""


def _scrape(port: int) -> dict[str, list]:
    """Samples by name from the node's endpoint, only ours (``ray_nesta_*``)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("ray_nesta_"):
                out.setdefault(s.name, []).append(s)
    return out


@pytest.fixture(scope="module")
def head():
    """A head node with its own ports, up and answering (tests/ray_head.py)."""
    with head_node(ENV, num_cpus=1) as node:
        yield node.address, node.metrics_port, node.temp


def test_driver_and_actor_metrics_reach_the_prometheus_endpoint(head):
    address, port, _ = head
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, address], env=ENV, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        samples: dict[str, list] = {}
        deadline = time.time() + 60
        while time.time() < deadline and not set(EXPORTED_NAMES) <= set(samples):
            assert driver.poll() is None, driver.stderr.read()[-3000:]
            time.sleep(1)
            try:
                samples = _scrape(port)
            except OSError:  # the endpoint is not up yet
                continue
        assert set(EXPORTED_NAMES) <= set(samples), f"missing {sorted(set(EXPORTED_NAMES) - set(samples))}"
    finally:
        os.killpg(driver.pid, signal.SIGTERM)
        driver.wait(timeout=30)

    def values(name: str, **labels: str) -> list[float]:
        return [s.value for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]

    job = {"job_name": "nightly", "run_id": "run-1", "model": "smollm2<135m>"}
    assert all(s.labels[k] == v for v_list in samples.values() for s in v_list for k, v in job.items())
    assert sum(values("ray_nesta_layers_done_total")) == 2  # one from the actor, one from the driver
    assert sum(values("ray_nesta_bytes_written_total")) == 1024
    assert values("ray_nesta_layer_seconds", layer="1") == [2.5]  # recorded inside the actor
    assert values("ray_nesta_whitened_loss", layer="0") == [0.02]
    assert values("ray_nesta_fallbacks_total", kind="eigen_fallbacks") == [2]
    assert values("ray_nesta_fallbacks_total", kind="clamped_eigenvalues") == []  # zero counts are not sent
    assert values("ray_nesta_drift_score", layer="0") == [0.125]
    assert values("ray_nesta_gate_passed") == [0]
    assert values("ray_nesta_run_seconds") == [12.0] and values("ray_nesta_layers_total") == [2]


def test_exported_names_follow_ray_conventions():
    assert len(set(EXPORTED_NAMES)) == len(SPECS)
    for spec, exported in zip(SPECS, EXPORTED_NAMES):
        assert spec.name.startswith("nesta_") and exported == "ray_" + spec.name + (
            "_total" if spec.kind == "counter" else "")


def test_job_metrics_refuse_to_start_without_ray():
    code = "from nesta_ray.ops.metrics import JobMetrics; JobMetrics('j', 'r', 'm')"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "RuntimeError: JobMetrics needs Ray: call ray.init()" in out.stderr


def test_head_lists_its_metrics_endpoint_where_prometheus_yml_looks(head):
    _, port, temp = head
    prom = yaml.safe_load((REPO / "cluster" / "prometheus.yml").read_text())
    (path,) = next(j for j in prom["scrape_configs"] if j["job_name"] == "ray")["file_sd_configs"][0]["files"]
    local = temp / Path(path).relative_to("/tmp/ray")  # /tmp/ray is Ray's default --temp-dir
    # The dashboard rewrites the file every 5 s from the live node table; its first write can come before the
    # node has registered (then it lists only the dashboard's own metrics port), so read until the node appears.
    targets: list[str] = []
    deadline = time.time() + 60
    while time.time() < deadline and f"127.0.0.1:{port}" not in targets:
        time.sleep(1)
        if local.exists():
            targets = [t for group in json.loads(local.read_text()) for t in group["targets"]]
    assert f"127.0.0.1:{port}" in targets
