"""nesta.json records where and how each linear was factorised, and reads runs written before it did."""

import torch

from nesta_ray.checkpoint.meta import LinearRecord, RunMeta
from nesta_ray.method.decompose import InputStats, Method, decompose
from nesta_ray.method.factorize import Solver


def test_each_linear_records_its_solver_and_the_run_counts_them():
    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(24, 16, generator=g), torch.randn(64, 16, generator=g, dtype=torch.float64)
    method, stats = Method("nsvd1", k1_tolerance=None, k1_fraction=0.75), InputStats(X.T @ X / 64, None, 64)
    records = {"a": LinearRecord.of(decompose(W, method, 8, stats), (24, 16)),
               "b": LinearRecord.of(decompose(W, method, 8, stats, solver=Solver(first="svd", residual="svd")),
                                    (24, 16))}
    assert records["a"].solver == "cpu float64 gram+gram" and records["b"].solver == "cpu float64 svd+svd"
    obj = RunMeta("r", "float32", method, 0.3, records).to_json()
    assert obj["solvers"] == {"cpu float64 gram+gram": 1, "cpu float64 svd+svd": 1}
    assert RunMeta.from_json(obj, "x").modules == records
    del obj["modules"]["a"]["solver"]  # a run written before the solver was recorded
    assert RunMeta.from_json(obj, "x").modules["a"].solver == ""
