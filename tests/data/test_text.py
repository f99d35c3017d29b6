"""Text sources, windows and seeded selection."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nesta_ray.data.text import fingerprint_tokens, pick_windows, read_dataset, read_text, token_windows
from nesta_ray.errors import DataError


def test_txt_jsonl_and_parquet_sources(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo")
    assert read_text(str(tmp_path / "a.txt")).text == "one\n\ntwo"
    lines = [json.dumps({"text": "alpha"}), "not json", json.dumps({"other": 1}), json.dumps({"text": "beta"})]
    (tmp_path / "a.jsonl").write_text("\n".join(lines))
    jsonl = read_text(str(tmp_path / "a.jsonl"))
    assert jsonl.text == "alpha\n\nbeta"
    assert jsonl.skipped == {"invalid json": 1, "no 'text' field": 1}  # counted by reason, for the run report
    pq.write_table(pa.table({"body": ["x", "y"]}), tmp_path / "a.parquet")
    assert read_text(str(tmp_path / "a.parquet"), text_field="body").text == "x\n\ny"
    with pytest.raises(DataError, match="no column 'text'"):
        read_text(str(tmp_path / "a.parquet"))


def test_bad_sources_give_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(str(tmp_path / "missing.txt"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(DataError, match="unknown text format"):
        read_text(str(tmp_path / "a.csv"))
    (tmp_path / "bad.jsonl").write_text("nope\n{}\n")
    with pytest.raises(DataError, match="2 bad lines"):
        read_text(str(tmp_path / "bad.jsonl"))


def test_dataset_without_network_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="could not be loaded.*use a local") as err:
        read_dataset("allenai/c4", split="train")
    assert "\n" not in str(err.value)


class _CharTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_windows_are_non_overlapping_and_selection_is_seeded():
    w = token_windows(_CharTokenizer(), "abcdefghij" * 10, 7)  # 100 tokens -> 14 windows of 7
    assert w.shape == (14, 7) and w[1, 0] == ord("h")
    a = pick_windows(w, 2, 10, 4, seed=3)
    assert torch.equal(a, pick_windows(w, 2, 10, 4, seed=3))
    assert not torch.equal(a, pick_windows(w, 2, 10, 4, seed=4))
    rows = {tuple(r.tolist()) for r in a}
    pool = {tuple(r.tolist()) for r in w[2:12]}
    assert rows <= pool and len(rows) == 4
    assert torch.equal(pick_windows(w, 12, None, None, 0, "first"), w[12:])
    with pytest.raises(DataError, match="holds only 2"):
        pick_windows(w, 12, None, 5, 0)
    with pytest.raises(DataError, match="fewer than one window"):
        token_windows(_CharTokenizer(), "abc", 7)
    assert fingerprint_tokens(a) == fingerprint_tokens(a.clone()) != fingerprint_tokens(w[:4])


def test_windows_start_with_bos_only_for_tokenizers_that_add_it(smollm_folder):
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(smollm_folder)  # SmolLM2 adds no BOS
    text = "The quick brown fox jumps over the lazy dog. " * 40
    windows = token_windows(plain, text, 16)
    assert windows[0, 0].item() != plain.bos_token_id
    with_bos = AutoTokenizer.from_pretrained(smollm_folder)  # the same vocabulary, made to add BOS like Gemma's
    with_bos.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{with_bos.bos_token} $A", special_tokens=[(with_bos.bos_token, with_bos.bos_token_id)])
    bos_windows = token_windows(with_bos, text, 16)
    assert bos_windows.shape[1] == 16 and (bos_windows[:, 0] == with_bos.bos_token_id).all()
    assert bos_windows[0, 1:].tolist() == windows.flatten()[:15].tolist()  # then the text, 15 tokens per window
