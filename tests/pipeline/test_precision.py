"""The decomposition's precision policy and the solver a worker's device gets."""

import pytest
import torch

from nesta_ray.method.decompose import Method
from nesta_ray.pipeline.precision import decompose_precision, device_solver
from nesta_ray.pipeline.tasks import Work
from nesta_ray.plan.linears import Plan


def test_a_cpu_decomposes_in_float64_unless_the_config_says_otherwise():
    dtype, reason = decompose_precision(torch.device("cpu"))
    assert dtype == "float64" and reason.startswith("cpu: float64")
    assert decompose_precision(torch.device("cpu"), "float32") == ("float32", "runtime.decompose_precision")


def test_the_work_names_the_solver_of_every_path():
    work = Work(Plan([], 0), Method("nsvd1"), factorization="svd", decompose_precision="float32")
    solver, reason = device_solver(torch.device("cpu"), work)
    assert (solver.device, solver.dtype, solver.first, solver.residual) == ("cpu", "float32", "svd", "svd")
    assert reason == "runtime.decompose_precision"
    auto, _ = device_solver(torch.device("cpu"), Work(Plan([], 0), Method("nsvd1")))
    assert auto.label(576, 1536, 2) == "cpu float64 gram+gram"
    with pytest.raises(ValueError, match="factorization"):
        device_solver(torch.device("cpu"), Work(Plan([], 0), Method("nsvd1"), factorization="qr"))


def test_the_stage_key_names_where_an_automatic_precision_is_resolved(ray_local, tmp_path):
    from nesta_ray.config.loading import validate
    from nesta_ray.pipeline.context import decompose_devices

    def cfg(**runtime):
        return validate({"calibration": {"path": str(tmp_path / "c.txt")}, "output": {"uri": str(tmp_path)},
                         "runtime": runtime})

    assert decompose_devices(cfg()) == "cpu"  # embedded: the tasks run on CPUs
    assert decompose_devices(cfg(workers=2)) == "cpu"  # this cluster has no GPU
    assert decompose_devices(cfg(workers=2, decompose_precision="float32")) == ""  # fixed: in the config already
