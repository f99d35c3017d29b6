"""Architecture map, low-rank module, and the layer-by-layer runner against a plain forward."""

import pytest
import torch

from nesta_ray.errors import ModelError
from nesta_ray.model.arch import ARCHITECTURES, arch_for
from nesta_ray.model.layers import capture_layer_inputs, decoder_layers, group_inputs, layer_linears, run_layer
from nesta_ray.model.lowrank import LowRankLinear

from tiny import tiny_model


def test_unknown_architecture_names_the_supported_ones():
    with pytest.raises(ModelError, match="not supported.*llama, mistral, qwen2"):
        arch_for("gpt2")


def test_low_rank_linear_equals_its_dense_product():
    A, B, bias = torch.randn(6, 3), torch.randn(3, 5), torch.randn(6)
    lr = LowRankLinear.from_factors(A, B, bias)
    x = torch.randn(2, 4, 5)
    with torch.no_grad():
        torch.testing.assert_close(lr(x), x @ (A @ B).T + bias)
    assert sum(p.numel() for p in lr.parameters()) == 3 * (6 + 5) + 6


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_layerwise_run_reproduces_the_full_forward(model_type):
    model = tiny_model(model_type, layers=3)
    spec = arch_for(model.config.model_type)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        hidden, kwargs = capture_layer_inputs(model, spec, ids)
        for layer in decoder_layers(model, spec):
            hidden = run_layer(layer, hidden, kwargs)
        logits = model.lm_head(model.model.norm(hidden))
        expected = model(input_ids=ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_linears_and_input_groups_of_a_llama_layer():
    model = tiny_model("llama")
    spec = arch_for("llama")
    layer = decoder_layers(model, spec)[0]
    assert list(layer_linears(layer, spec)) == [
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
    ]
    assert list(layer_linears(layer, spec, ["down_proj"])) == ["mlp.down_proj"]
    assert set(group_inputs(layer, spec)) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert spec.group_of("v_proj") == "attn_in" and spec.group_of("up_proj") == "mlp_in"
