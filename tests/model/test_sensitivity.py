"""The sensitivity pass on real (tiny) transformers models: layer-by-layer backward equals one autograd backward
through the whole model, chunked head gradients equal unchunked ones."""

import pytest
import torch
from torch.nn import functional as F

from nesta_ray.model import sensitivity
from nesta_ray.model.arch import arch_for
from nesta_ray.model.layers import decoder_layers, head_logits, layer_linears
from nesta_ray.model.sensitivity import ComponentFisher, collect_projections, head_gradient

from tiny import tiny_family, tiny_model


def _bases(model, spec, seed=0):
    """A random orthonormal basis U (m, m) per linear, name -> (module, U)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        for path, lin in layer_linears(layer, spec).items():
            m = lin.weight.shape[0]
            out[f"{i}.{path}"] = (i, lin, torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0])
    return out


def _reference(model, ids, bases):
    """Σ_t (g_tᵀ U)² with g from one ordinary backward of the summed next-token NLL through the whole model."""
    outputs: dict[str, list] = {}

    def keep(name, out):
        out.retain_grad()
        outputs.setdefault(name, []).append(out)

    handles = [lin.register_forward_hook(lambda mod, a, out, name=name: keep(name, out))
               for name, (_, lin, _) in bases.items()]
    for start in range(0, ids.shape[0], 2):
        batch = ids[start : start + 2]
        logits = model(input_ids=batch, use_cache=False).logits.float()
        F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="sum").backward()
    for h in handles:
        h.remove()
    return {name: sum(((o.grad.reshape(-1, U.shape[0]).double() @ U) ** 2).sum(0) for o in outputs[name])
            for name, (_, _, U) in bases.items()}


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_layer_by_layer_projections_equal_one_whole_model_backward(family):
    model = tiny_model("llama", layers=3) if family == "llama" else tiny_family("gemma3_text", layers=3)
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, 2000, (4, 20), generator=torch.Generator().manual_seed(1))
    bases = _bases(model, spec)
    fishers = {name: ComponentFisher(U) for name, (_, _, U) in bases.items()}
    linears: dict[int, dict] = {}
    for name, (i, lin, _) in bases.items():
        linears.setdefault(i, {})[name] = lin
    nll = collect_projections(model, spec, ids, 2, linears, fishers)
    reference = _reference(model, ids, bases)
    for name, fisher in fishers.items():
        assert fisher.tokens == 4 * 20
        torch.testing.assert_close(fisher.sums, reference[name], rtol=2e-4, atol=1e-6 * float(reference[name].max()))
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert nll == pytest.approx(float(F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="sum")),
                                rel=1e-5)


def test_chunked_head_gradient_equals_the_unchunked_one(monkeypatch):
    model = tiny_family("gemma3_text", layers=1)  # soft-capped logits: still per token
    spec = arch_for(model.config.model_type)
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(2))
    ids = torch.randint(0, 2000, (2, 9))
    full, nll = head_gradient(lambda h: head_logits(model, spec, h), hidden, ids)
    monkeypatch.setattr(sensitivity, "HEAD_CHUNK_TOKENS", 6)  # 3 positions per window per chunk
    chunked, nll_chunked = head_gradient(lambda h: head_logits(model, spec, h), hidden, ids)
    torch.testing.assert_close(chunked, full, rtol=1e-4, atol=1e-5 * float(full.abs().max()))
    assert nll_chunked == pytest.approx(nll, rel=1e-6)
    assert bool((full[:, -1] == 0).all())  # the last position predicts nothing


def test_parameters_get_no_gradient():
    model = tiny_model("llama", layers=2)
    spec = arch_for("llama")
    lin = decoder_layers(model, spec)[1].mlp.down_proj
    fishers = {"d": ComponentFisher(torch.eye(64, dtype=torch.float64))}
    collect_projections(model, spec, torch.randint(0, 2000, (2, 8)), 2, {1: {"d": lin}}, fishers)
    assert all(p.grad is None for p in model.parameters())
    assert float(fishers["d"].sums.sum()) > 0


def test_micro_batches_side_by_side_give_the_sequential_sums_bit_for_bit():
    model = tiny_model("llama", layers=3)
    spec = arch_for("llama")
    ids = torch.randint(0, 2000, (6, 24), generator=torch.Generator().manual_seed(3))
    bases = _bases(model, spec)
    linears: dict[int, dict] = {}
    for name, (i, lin, _) in bases.items():
        linears.setdefault(i, {})[name] = lin
    runs = {}
    for workers in (1, 3):
        fishers = {name: ComponentFisher(U) for name, (_, _, U) in bases.items()}
        nll = collect_projections(model, spec, ids, 2, linears, fishers, workers)
        runs[workers] = nll, {name: (f.sums, f.tokens) for name, f in fishers.items()}
    assert runs[1][0] == runs[3][0]
    for name, (sums, tokens) in runs[1][1].items():
        assert tokens == runs[3][1][name][1] == 6 * 24 and torch.equal(sums, runs[3][1][name][0])
