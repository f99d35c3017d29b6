"""Gram accumulation and the statistics hooks on a real (tiny) transformers model."""

import pytest
import torch

from nesta_ray.errors import NumericalError
from nesta_ray.model.arch import arch_for
from nesta_ray.model.calibration import GramAccumulator, InputStatistics
from nesta_ray.model.layers import decoder_layers, group_inputs

from tiny import tiny_model


def test_accumulator_sums_batches_and_normalises_by_tokens():
    X1, X2 = torch.randn(3, 7, 5), torch.randn(11, 5)
    acc = GramAccumulator(5)
    acc.add(X1)
    acc.add(X2)
    X = torch.cat([X1.reshape(-1, 5), X2]).double()
    assert acc.tokens == 32
    torch.testing.assert_close(acc.gram(), X.T @ X / 32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(acc.abs_mean(), X.abs().mean(0), rtol=1e-6, atol=1e-6)
    assert acc.gram().dtype == torch.float64


def test_merge_equals_one_accumulator_over_all_batches():
    X1, X2 = torch.randn(9, 4), torch.randn(6, 4)
    a, b, both = GramAccumulator(4), GramAccumulator(4), GramAccumulator(4)
    a.add(X1)
    b.add(X2)
    both.add(X1)
    both.add(X2)
    a.merge(b)
    torch.testing.assert_close(a.gram(), both.gram())
    with pytest.raises(ValueError):
        a.merge(GramAccumulator(3))


def test_empty_or_non_finite_statistics_raise():
    with pytest.raises(NumericalError, match="no calibration token"):
        GramAccumulator(3).gram()
    acc = GramAccumulator(2)
    acc.add(torch.tensor([[float("inf"), 1.0]]))
    with pytest.raises(NumericalError, match="non-finite"):
        acc.gram()


def test_hooks_give_one_gram_per_distinct_input_equal_to_each_linears_input():
    model = tiny_model("llama", layers=1)
    spec = arch_for("llama")
    layer = decoder_layers(model, spec)[0]
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [
        lin.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(name, []).append(args[0].clone()))
        for name, lin in layer.named_modules() if isinstance(lin, torch.nn.Linear)
    ]
    ids = torch.randint(0, 1000, (2, 12))
    with torch.no_grad(), InputStatistics(group_inputs(layer, spec)) as stats:
        model(input_ids=ids)
    for h in handles:
        h.remove()
    assert set(stats.accumulators) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}

    def gram_of(name):
        x = torch.cat(seen[name]).reshape(-1, seen[name][0].shape[-1]).double()
        return x.T @ x / x.shape[0]

    for group, linear in [("attn_in", "self_attn.k_proj"), ("attn_in", "self_attn.v_proj"),
                          ("attn_out", "self_attn.o_proj"), ("mlp_in", "mlp.up_proj"), ("mlp_out", "mlp.down_proj")]:
        torch.testing.assert_close(stats.accumulators[group].gram(), gram_of(linear), rtol=1e-5, atol=1e-6)
    assert stats.accumulators["mlp_out"].tokens == 24
    # hooks are gone after the context: another forward changes nothing
    before = stats.accumulators["attn_in"].tokens
    with torch.no_grad():
        model(input_ids=ids)
    assert stats.accumulators["attn_in"].tokens == before
