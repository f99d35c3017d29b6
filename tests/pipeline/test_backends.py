"""The layerwise backend on its own: it reads only its layers, runs them like the model, installs factors."""

import torch

from nesta_ray.io.sources import ModelSource, load_model
from nesta_ray.method.decompose import Method, decompose
from nesta_ray.model.arch import arch_for
from nesta_ray.model.calibration import layer_inputs
from nesta_ray.model.layers import run_layer
from nesta_ray.model.lowrank import LowRankLinear
from nesta_ray.pipeline.backends import LayerwiseBackend, ShardPart
from nesta_ray.plan.linears import make_plan


def test_a_shard_of_later_layers_runs_them_like_the_whole_model(tiny3_folder):
    model, _ = load_model(tiny3_folder)
    spec = arch_for("llama")
    backend = LayerwiseBackend(ModelSource(tiny3_folder, tiny3_folder), ShardPart([1, 2], first=False, last=True),
                               dtype="float32", device=torch.device("cpu"))
    assert set(backend.layers) == {1, 2} and backend.resident
    for i in (1, 2):
        mine, theirs = backend.layer(i).state_dict(), model.model.layers[i].state_dict()
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
    (hidden, kwargs), = layer_inputs(model, spec, torch.randint(0, 2000, (2, 16)), 2)
    with torch.no_grad():
        h1 = run_layer(model.model.layers[0], hidden, kwargs)
        with backend.loaded(1):
            got = backend.run(1, h1, kwargs)
        assert torch.equal(got, run_layer(model.model.layers[1], h1, kwargs))

    plan = make_plan(model, spec, method=Method("svd"), ratio=0.5, targets=["q_proj", "down_proj"])
    plans = plan.for_layer(1)["attn_in"]
    weights = backend.weights(1, plans)
    assert torch.equal(torch.from_numpy(weights[plans[0].name]), model.get_submodule(plans[0].name).weight)
    factors = {p.name: decompose(torch.from_numpy(weights[p.name]), Method("svd"), p.rank) for p in plans}
    backend.install(1, factors)
    q = backend.layer(1).self_attn.q_proj
    assert isinstance(q, LowRankLinear) and q.rank == plans[0].rank and q.A.device.type == "cpu"
