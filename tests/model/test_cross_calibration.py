"""Two-stream calibration for the anchored fit: the cross sums are the data's, X̂ = X gives today's statistics
bit for bit, and the streams of a real (tiny) layer are paired token for token."""

import pytest
import torch

from nesta_ray.errors import NumericalError
from nesta_ray.model.arch import arch_for
from nesta_ray.model.calibration import GramAccumulator, layer_inputs, run_with_statistics
from nesta_ray.model.cross_calibration import CrossGramAccumulator, run_two_streams
from nesta_ray.model.layers import decoder_layers, group_inputs, run_layer

from tiny import tiny_model


def test_cross_sums_are_the_products_of_the_paired_streams():
    g = torch.Generator().manual_seed(0)
    X, X_hat = torch.randn(2, 30, 8, generator=g), torch.randn(2, 30, 8, generator=g)  # two micro-batches
    acc, own = CrossGramAccumulator(8), GramAccumulator(8)
    for x, x_hat in zip(X, X_hat):
        acc.add(x, x_hat)
        own.add(x_hat)
    stats = acc.stats(own)
    Xf, Xh = X.reshape(-1, 8).double(), X_hat.reshape(-1, 8).double()
    assert stats.tokens == 60
    torch.testing.assert_close(stats.cross, Xf.T @ Xh / 60, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.dense_gram, Xf.T @ Xf / 60, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.gram, Xh.T @ Xh / 60, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(stats.cross, stats.cross.T)  # C = XᵀX̂ is not symmetric: the order matters


def test_mismatched_streams_are_refused():
    acc, own = CrossGramAccumulator(4), GramAccumulator(4)
    with pytest.raises(ValueError, match="differ in shape"):
        acc.add(torch.ones(3, 4), torch.ones(2, 4))
    with pytest.raises(NumericalError, match="0 dense and 0 compressed"):
        acc.stats(own)
    acc.add(torch.ones(3, 4), torch.ones(3, 4))
    own.add(torch.ones(2, 4))
    with pytest.raises(NumericalError, match="3 dense and 2 compressed"):
        acc.stats(own)
    acc.add(torch.full((1, 4), float("inf")), torch.ones(1, 4))
    own.add(torch.ones(2, 4))
    with pytest.raises(NumericalError, match="cross-Gram"):
        acc.stats(own)


def _batches(model, spec, seed):
    g = torch.Generator().manual_seed(seed)
    return layer_inputs(model, spec, torch.randint(0, 2000, (4, 16), generator=g), 2)


def test_equal_streams_give_todays_statistics_bit_for_bit():
    model = tiny_model("llama", layers=2)
    spec = arch_for("llama")
    layer = decoder_layers(model, spec)[0]
    batches = _batches(model, spec, 1)
    dense_out, comp_out, stats = run_two_streams(lambda h, kw: run_layer(layer, h, kw), group_inputs(layer, spec),
                                                 batches, batches)
    outputs, plain = run_with_statistics(layer, spec, spec.groups, batches)
    assert set(stats) == set(plain)
    for group, s in stats.items():
        assert torch.equal(s.gram, plain[group].gram) and torch.equal(s.abs_mean, plain[group].abs_mean)
        assert torch.equal(s.cross, s.gram) and torch.equal(s.dense_gram, s.gram)
    for a, b, c in zip(dense_out, comp_out, outputs):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_different_streams_pair_each_dense_input_with_its_compressed_one():
    model = tiny_model("llama", layers=2)
    spec = arch_for("llama")
    layer = decoder_layers(model, spec)[0]
    dense, compressed = _batches(model, spec, 2), _batches(model, spec, 3)
    dense_out, comp_out, stats = run_two_streams(lambda h, kw: run_layer(layer, h, kw), group_inputs(layer, spec),
                                                 dense, compressed)
    _, of_dense = run_with_statistics(layer, spec, spec.groups, dense)
    _, of_compressed = run_with_statistics(layer, spec, spec.groups, compressed)
    for group, s in stats.items():
        assert torch.equal(s.gram, of_compressed[group].gram)
        assert torch.equal(s.dense_gram, of_dense[group].gram)
        assert not torch.allclose(s.cross, s.gram) and not torch.allclose(s.cross, s.dense_gram)
    with torch.no_grad():
        assert all(torch.equal(o, run_layer(layer, h, kw)) for o, (h, kw) in zip(dense_out, dense))
        assert all(torch.equal(o, run_layer(layer, h, kw)) for o, (h, kw) in zip(comp_out, compressed))
    with pytest.raises(ValueError, match="2 dense and 1 compressed"):
        run_two_streams(lambda h, kw: run_layer(layer, h, kw), group_inputs(layer, spec), dense, compressed[:1])
