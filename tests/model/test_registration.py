"""``import nesta_ray`` registers the low-rank classes with transformers' Auto classes whatever is imported first
(each order in a fresh interpreter; the order nesta_ray-then-transformers is tests/checkpoint/test_hf_loading.py's)."""

import subprocess
import sys

import pytest

CHECK = ("from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
         "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING\n"
         "from nesta_ray.model.modeling_nesta_lowrank import NestaLowRankConfig, NestaLowRankForCausalLM\n"
         "assert CONFIG_MAPPING['nesta_lowrank'] is NestaLowRankConfig\n"
         "assert MODEL_FOR_CAUSAL_LM_MAPPING[NestaLowRankConfig] is NestaLowRankForCausalLM\n")


@pytest.mark.parametrize("first", [
    "import transformers\nimport nesta_ray\n",  # transformers already imported: registered at once
    "import nesta_ray.model.modeling_nesta_lowrank\n",  # the modeling module is what imports transformers
])
def test_the_auto_classes_are_registered_whatever_is_imported_first(first):
    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c", first + CHECK],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
