"""Perplexity against a hand computation, and counting of non-finite windows."""

import math

import pytest
import torch
from torch.nn import functional as F

from nesta_ray.ops.evaluation import perplexity

from tiny import tiny_model


def test_perplexity_is_exp_of_mean_token_nll():
    model = tiny_model("llama", layers=1, vocab=300)
    ids = torch.randint(0, 300, (3, 10))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    r = perplexity(model, ids, name="x", batch_size=2)
    assert r.tokens == 27 and r.windows == 3 and r.nonfinite_windows == 0
    assert r.perplexity == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_non_finite_windows_are_counted_not_hidden():
    model = tiny_model("llama", layers=1, vocab=300)
    ids = torch.randint(0, 300, (3, 10))
    clean = perplexity(model, ids[1:])

    def poison(module, args, output):  # overflow in the first window only
        output = output.clone()
        output[0] = float("nan")
        return output

    handle = model.model.norm.register_forward_hook(poison)
    r = perplexity(model, ids, batch_size=3)
    handle.remove()
    assert r.nonfinite_windows == 1 and r.windows == 3 and r.tokens == 18
    assert r.perplexity == pytest.approx(clean.perplexity, rel=1e-5)
