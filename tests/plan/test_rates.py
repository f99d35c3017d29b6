"""Rates profiles: the file format (measured and assumed rates, their peaks and sources), fallbacks, and errors."""

import json

import pytest

from nesta_ray.errors import ConfigError
from nesta_ray.plan.rates import FIELDS, Rates, rates_file, rates_from, read_rates

from paths import REPO


def test_the_committed_h100_profile_is_assumed_with_a_source_and_efficiency_for_every_rate():
    rates = read_rates(str(REPO / "configs" / "rates" / "h100-assumed.yaml"))
    assert rates.label.startswith("assumed (NVIDIA H100")
    assert set(rates.sources) == set(rates.peaks) == set(FIELDS)  # every rate stated, each with a source
    assert rates.rate("matmul_gflops") == pytest.approx(989000 * 0.40)
    assert rates.peak("eigh_gflops") == 66900 and rates.rate("eigh_gflops") == pytest.approx(66900 * 0.03)
    assert "assumed" in rates.describe() and "40% of 989,000" in rates.describe()


def test_a_measured_file_round_trips_and_unset_rates_fall_back(tmp_path):
    path = tmp_path / "rates.json"
    path.write_text(rates_file("CPU x", {"matmul_gflops": 120.0, "svd_gflops": 3.0, "read_gbps": 2.0},
                               {"loadavg_1min": 0.4}))
    rates = read_rates(str(path))
    assert json.loads(path.read_text())["loadavg_1min"] == 0.4
    assert rates.label == "measured (CPU x; rates.json)" and rates.peaks == {}
    assert rates.rate("gram_gflops") == rates.rate("gemm_gflops") == 120.0  # fall back to the matmul rate
    assert rates.rate("eigh_gflops") == rates.peak("eigh_gflops") == 3.0  # and the factorisations to the SVD's
    assert rates.rate("copy_gbps") == float("inf")  # no device: no copies
    assert rates.flops_seconds({"gemm": 240e9, "eigh": 3e9, "qr": 0.0}) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown rates"):
        rates_file("CPU", {"flux_gflops": 1.0})


def test_the_floor_divides_by_peaks_the_estimate_by_rates():
    rates = Rates(100.0, 10.0, peaks={"matmul_gflops": 400.0, "svd_gflops": 10.0})
    work = {"gemm": 400e9, "svd": 10e9}
    assert rates.flops_seconds(work) == pytest.approx(5.0)  # 4 s of products at 100, 1 s of SVD at 10
    assert rates.flops_seconds(work, at_peak=True) == pytest.approx(2.0)  # products at the 400 peak


@pytest.mark.parametrize("body, field", [
    ({"kind": "guessed", "rates": {"matmul_gflops": 1, "svd_gflops": 1}}, "kind"),
    ({"rates": {"matmul_gflops": 1, "svd_gflops": 1, "warp_gflops": 2}}, "warp_gflops"),
    ({"rates": {"matmul_gflops": 1}}, "rates.svd_gflops"),
    ({"rates": {"matmul_gflops": -1, "svd_gflops": 1}}, "rates.matmul_gflops"),
    ({"rates": {"matmul_gflops": {"peak": 10, "efficiency": 2}, "svd_gflops": 1}}, "rates.matmul_gflops"),
    ([1, 2], "a rates file holds"),
])
def test_a_malformed_rates_file_names_the_field(body, field):
    with pytest.raises(ConfigError, match=field):
        rates_from(body, "r.yaml")


def test_a_missing_rates_file_names_the_scripts_that_write_one(tmp_path):
    with pytest.raises(ConfigError, match="does not exist.*cpu_rates.py"):
        read_rates(str(tmp_path / "none.yaml"))
