"""lm-evaluation-harness offline on a local task over ../shared/corpora text: the ``nesta`` model on a compressed
run and on its dense source, the harness's ``hf`` model on the run folder, and the ``python -m nesta_ray.lmeval``
command line. Every per-document loglikelihood the harness reports is checked against one computed directly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

from nesta_ray.lmeval import main as lmeval_main
from nesta_ray.ops.lmeval import NestaLM

from paths import corpus
from tiny import write_tiny_run

TASK = "nesta_wiki_rolling"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A loglikelihood_rolling task over six Wikipedia paragraphs (read from the corpus now, never copied into the
    repository), with its dataset cache in the test's folder."""
    folder = tmp_path_factory.mktemp("lmeval")
    paragraphs = [p.strip() for p in Path(corpus("en_wikipedia")).read_text(encoding="utf-8").split("\n\n") if len(p.strip()) > 200]
    docs = folder / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": p[:600]}) + "\n" for p in paragraphs[:6]))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n  cache_dir: {folder / 'datasets'}\n"
        "test_split: test\noutput_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n"
        "metadata:\n  version: 1.0\n")
    return folder


@pytest.fixture(scope="module")
def run(tiny_folder, tmp_path_factory):
    return write_tiny_run(str(tmp_path_factory.mktemp("lmeval-run") / "out"), tiny_folder)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


def _harness(model, task_dir, model_args=None) -> tuple[list[float], dict]:
    """Per-document loglikelihoods (in document order) and the task's metrics."""
    out = simple_evaluate(model=model, model_args=model_args, tasks=[TASK],
                          task_manager=TaskManager(include_path=str(task_dir)), log_samples=True, device="cpu",
                          batch_size=2)
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    return [float(s["filtered_resps"][0]) for s in samples], out["results"][TASK]


def _direct(lm: NestaLM, task_dir) -> list[float]:
    """Each document's log-likelihood computed here: every token after the harness's prefix token, one window."""
    totals = []
    for line in (task_dir / "docs.jsonl").read_text().splitlines():
        ids = torch.tensor([[lm.prefix_token_id, *lm.tok_encode(json.loads(line)["text"])]])
        assert ids.shape[1] <= lm.max_length
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=ids[:, :-1]).logits.double(), dim=-1)
        totals.append(float(logp.gather(-1, ids[:, 1:, None]).sum()))
    return totals


def test_nesta_model_scores_compressed_and_dense_as_computed_directly(run, tiny_folder, task_dir):
    scores = {}
    for name, source in (("compressed", run), ("dense", tiny_folder)):
        lm = NestaLM(pretrained=source, batch_size=2)
        assert (type(lm.model).__name__ == "NestaLowRankForCausalLM") == (name == "compressed")
        scores[name], metrics = _harness(lm, task_dir)
        assert metrics["bits_per_byte,none"] > 0
        torch.testing.assert_close(torch.tensor(scores[name]), torch.tensor(_direct(lm, task_dir)), rtol=1e-5, atol=1e-3)
    assert len(scores["dense"]) == 6
    assert all(abs(c - d) > 1e-3 for c, d in zip(scores["compressed"], scores["dense"]))  # compression shows


def test_the_harness_hf_model_loads_a_run_folder_through_the_registered_classes(run, task_dir):
    scores, _ = _harness("hf", task_dir, model_args=f"pretrained={run},dtype=float32")
    expected, _ = _harness(NestaLM(pretrained=run, batch_size=2), task_dir)
    torch.testing.assert_close(torch.tensor(scores), torch.tensor(expected), rtol=0, atol=1e-4)


def test_the_command_line_runs_the_harness_with_the_nesta_model(run, task_dir, tmp_path, monkeypatch, capsys):
    proc = subprocess.run(
        [sys.executable, "-m", "nesta_ray.lmeval", "--model", "nesta", "--model_args", f"pretrained={run}",
         "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "2", "--device", "cpu",
         "--output_path", str(tmp_path / "results"), "--log_samples"],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"|{TASK}|" in proc.stdout.replace(" ", "")
    samples = [json.loads(line) for f in Path(tmp_path / "results").rglob(f"samples_{TASK}_*.jsonl")
               for line in f.read_text().splitlines()]
    expected, _ = _harness(NestaLM(pretrained=run, batch_size=2), task_dir)
    got = [float(s["filtered_resps"][0]) for s in sorted(samples, key=lambda s: s["doc_id"])]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-4)
    monkeypatch.setattr(sys, "argv", ["lmeval", "--model", "nesta", "--model_args", f"pretrained={tmp_path / 'gone'}",
                                      "--tasks", TASK, "--include_path", str(task_dir)])
    assert lmeval_main() == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: model source {tmp_path / 'gone'} does not exist")
    monkeypatch.setattr(sys, "argv", ["lmeval", "--model", "nesta", "--model_args", f"pretrained={run}",
                                      "--tasks", "no_such_task", "--include_path", str(task_dir)])
    assert lmeval_main() == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: lm-evaluation-harness stopped: ValueError: Tasks not found: no_such_task")
    assert "lm-eval ls tasks" in last
