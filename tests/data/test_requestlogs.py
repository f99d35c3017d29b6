"""Request-log calibration: real JSON-lines files (local and on moto S3), real SmolLM2 tokenizer, no mocks."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter

import numpy as np
import pytest
import torch

from nesta_ray.config.schema import LogsSource
from nesta_ray.data import requestlogs as rl
from nesta_ray.data import selection as sel
from nesta_ray.errors import DataError

TOPICS = ["invoices", "rockets", "gardening", "chess openings", "tax law", "bread baking", "jazz", "volcanoes"]
JA = ["東京の天気を教えてください。明日は雨が降りますか？", "このファイルを削除する方法を説明してください。",
      "日本語の文章を要約してほしいです。", "新しいプログラムをインストールしたいのですが、手順はどうなりますか。"]
ZH = ["请告诉我明天北京的天气。", "如何删除这个目录中的所有文件？", "请把这段中文翻译成英文。", "这个命令的参数是什么意思？"]
CODE = ["def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
        "for (int i = 0; i < n; i++) {\n    total += x[i];\n}",
        "import os\nclass Walker:\n    def __init__(self, root):\n        self.root = root",
        "const f = (x) => { return x * 2; };\nconsole.log(f(3));"]


def _traffic(n_en: int = 160) -> list[dict]:
    """Requests of every shape: English text and chat, Japanese prompt/completion, Chinese chat, code text."""
    rows: list[dict] = []
    for i in range(n_en):
        topic = TOPICS[i % len(TOPICS)]
        words = " ".join(f"{topic.split()[0]}{j}" for j in range(i % 7 * 9))
        body = f"Request {i}: please explain {topic} in simple words. {words}"
        rows.append({"text": body} if i % 2 else {"messages": [{"role": "user", "content": body}]})
    for i in range(13):
        rows.append({"prompt": JA[i % 4], "completion": f" 第{i}版の回答です。"})
        rows.append({"messages": [{"role": "system", "content": "你是助手。"},
                                  {"role": "user", "content": f"{ZH[i % 4]} 第{i}个问题。"}]})
        rows.append({"text": f"# snippet {i}\n{CODE[i % 4]}\nvalue_{i} = compute({i}); result[{i}] = value_{i}"})
    return rows


MALFORMED = [b"{not json", b"[1, 2]", b'{"foo": 1}', b'{"messages": "hi"}', b'{"messages": [{"content": "x"}]}',
             b'{"prompt": 3}', b'{"text": "   "}', b"\xff\xfe{}"]


def _write(path, rows: list[dict], extra: list[bytes] = ()) -> None:
    lines = [json.dumps(r, ensure_ascii=False).encode() for r in rows] + list(extra)
    path.write_bytes(b"\n".join(lines) + b"\n\n")


@pytest.fixture(scope="module")
def tokenizer(smollm_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_folder)


@pytest.fixture()
def logs(tmp_path):
    """A folder of two daily logs (one gzipped) with all shapes, duplicates and malformed lines."""
    rows = _traffic()
    dups = [rows[0], rows[3], {"text": "  " + rows[1]["text"].upper() + " "}]  # 2 exact, 1 after normalising
    folder = tmp_path / "logs"
    folder.mkdir()
    _write(folder / "2024-06-01.jsonl", rows[:100], MALFORMED[:4])
    half = rows[100:] + dups
    (folder / "2024-06-02.jsonl.gz").write_bytes(gzip.compress(b"\n".join(
        [json.dumps(r, ensure_ascii=False).encode() for r in half] + MALFORMED[4:])))
    (folder / "notes.txt").write_text("not a log")
    return folder, rows


def test_parse_counts_lines_shapes_and_malformed_by_reason(logs):
    folder, rows = logs
    files, old = rl.read_log_files(str(folder))
    assert [os.path.basename(f.name) for f in files] == ["2024-06-01.jsonl", "2024-06-02.jsonl.gz"] and old == 0
    report = rl.LogSelection()
    requests = rl.parse_files(files, report)
    assert report.lines == len(rows) + 3 + len(MALFORMED) and report.records == len(rows) + 3 == len(requests)
    assert report.malformed == {"empty text": 1, "invalid json": 1, "invalid utf-8": 1, "message without a role": 1,
                                "messages not a list": 1, "not a JSON object": 1, "prompt/completion not strings": 1,
                                "unknown shape": 1}
    assert report.first_error.endswith("2024-06-01.jsonl line 101: invalid json")
    assert report.shapes == {"messages": 80 + 13 + 1, "prompt_completion": 13, "text": 80 + 13 + 2}
    keep, exact, near = sel.dedup([r.plain() for r in requests])
    assert (exact, near, len(keep)) == (2, 1, len(rows))


def test_openai_shape_and_content_parts():
    line = {"request": {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi "},
                                                                  {"type": "image_url", "image_url": {}},
                                                                  {"type": "text", "text": "there"}]}]},
            "response": {"choices": [{"message": {"role": "assistant", "content": "Hello!"}}]}}
    report = rl.LogSelection()
    [req] = rl.parse_files([rl.LogFile("x", None, json.dumps(line).encode())], report)
    assert req.shape == "openai" and req.messages == (("user", "Hi there"), ("assistant", "Hello!"))
    assert req.plain() == "user: Hi there\nassistant: Hello!"


def test_language_and_length_buckets():
    assert [sel.language(t) for t in (JA[0], ZH[0], CODE[0], CODE[1], "Please explain jazz to me.",
                                     "Привет, как дела? Расскажи о погоде.")] == ["ja", "zh", "code", "code", "latin",
                                                                                  "other"]
    assert [sel.length_bucket(t) for t in ("a" * 10, "a" * 300, "語" * 400, "a" * 5000)] == list(sel.LENGTH_BUCKETS)


def test_quotas_are_proportional_with_a_floor_and_capped_by_size():
    sizes = {"latin": 800, "code": 40, "ja": 40, "zh": 40}
    assert sel.quotas(sizes, 64, 0.05) == {"latin": 52, "code": 4, "ja": 4, "zh": 4}  # floor ceil(3.2) = 4
    assert sel.quotas(sizes, 64, 0.0) == {"latin": 55, "code": 3, "ja": 3, "zh": 3}  # 55.65 / 2.78: largest remainder
    assert sel.quotas({"a": 2, "b": 100}, 50, 0.5) == {"b": 48, "a": 2}  # floor 25 capped at a's size
    assert sel.quotas(sizes, 3, 0.05) == {"latin": 3}  # floors (4 x 1) exceed n: n // 4 = 0 each
    assert sel.quotas({"a": 3, "b": 2}, 10, 0.1) == {"a": 3, "b": 2}


def test_selection_keeps_every_language_and_is_deterministic_under_the_seed():
    texts = [r.get("text") or r.get("prompt") or r["messages"][-1]["content"] for r in _traffic()]
    langs, lengths = [sel.language(t) for t in texts], [sel.length_bucket(t) for t in texts]
    assert Counter(langs) == {"latin": 160, "ja": 13, "zh": 13, "code": 13}
    X = sel.features(texts)
    assert X.shape == (len(texts), sel.DIM + 1) and np.allclose(np.linalg.norm(X[:, :sel.DIM], axis=1), 1, atol=1e-5)
    picks = sel.select(X, langs, lengths, 40, "k-center", 0, 0.1)
    assert len(set(picks)) == 40 and picks == sel.select(X, langs, lengths, 40, "k-center", 0, 0.1)
    assert picks != sel.select(X, langs, lengths, 40, "k-center", 1, 0.1)
    assert Counter(langs[i] for i in picks) == {"latin": 28, "ja": 4, "zh": 4, "code": 4}
    assert {langs[i] for i in picks[:8]} == {"latin", "ja", "zh", "code"}  # interleaved: a prefix keeps every language
    assert sel.select(X, langs, lengths, 5, "first", 0, 0.1) == [0, 1, 2, 3, 4]
    dist_k = sel.coverage(X, picks)
    dist_r = sel.coverage(X, sel.select(X, langs, lengths, 40, "random", 0, 0.1))
    assert dist_k.max() < dist_r.max() and dist_k[picks].max() < 1e-3
    with pytest.raises(ValueError, match="select must be one of"):
        sel.select(X, langs, lengths, 5, "best", 0, 0.1)


def test_windows_from_a_folder_render_chats_with_the_chat_template(logs, tokenizer):
    folder, rows = logs
    ids, report = rl.log_calibration_ids(LogsSource(uri=str(folder), language_floor=0.1), tokenizer,
                                         num_sequences=4, seq_len=64, seed=3)
    assert ids.shape == (4, 64) and ids.dtype == torch.long
    again, _ = rl.log_calibration_ids(LogsSource(uri=str(folder), language_floor=0.1), tokenizer, num_sequences=4,
                                      seq_len=64, seed=3)
    assert torch.equal(ids, again)
    assert report.unique == len(rows) and report.exact_duplicates == 2 and report.near_duplicates == 1
    assert report.rendering["template"] > 0 and report.rendering["plain"] > 0 and "template_failed" not in report.rendering
    assert 0 < report.used <= report.selected and sum(report.languages_after.values()) == report.used
    assert sum(report.tokens_per_language.values()) == 4 * 64
    text = tokenizer.decode(ids.flatten())
    assert "<|im_start|>user\n" in text and "<|im_end|>" in text
    assert 0 < report.coverage_mean <= report.coverage_p95


def test_plain_rendering_without_a_chat_template(tokenizer):
    chat = rl.Request("messages", messages=(("user", "hello"), ("assistant", "hi")))
    counts: Counter = Counter()
    assert rl.render(chat, tokenizer, "plain", counts) == ("user: hello\nassistant: hi", False)
    bare = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    assert rl.render(chat, bare, "auto", counts) == ("user: hello\nassistant: hi", False)
    assert counts == {"plain": 2}
    with pytest.raises(DataError, match="has no chat template; use rendering: auto or plain"):
        rl.render(chat, bare, "template", counts)


def test_logs_on_s3_glob_match_the_local_folder(logs, tokenizer, s3_server):
    folder, _ = logs
    import s3fs

    bucket = s3_server.make_bucket("request-logs")
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    for name in ("2024-06-01.jsonl", "2024-06-02.jsonl.gz"):
        fs.pipe(f"{bucket}/prod/{name}", (folder / name).read_bytes())
    kwargs = dict(num_sequences=2, seq_len=32, seed=0)
    remote, rep = rl.log_calibration_ids(LogsSource(uri=f"{bucket}/prod/*.jsonl*",
                                                    storage_options=s3_server.storage_options), tokenizer, **kwargs)
    local, _ = rl.log_calibration_ids(LogsSource(uri=str(folder / "*.jsonl*")), tokenizer, **kwargs)
    assert rep.files == 2 and torch.equal(remote, local)
    with pytest.raises(DataError, match="matches no log file"):
        rl.read_log_files(f"{bucket}/nothing/*.jsonl", s3_server.storage_options)


def test_since_filters_records_by_timestamp_and_files_by_modification_time(tmp_path):
    old, new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    _write(old, [{"text": "from last week"}])
    os.utime(old, (1_700_000_000, 1_700_000_000))
    _write(new, [{"text": "a", "timestamp": "2024-05-31T23:59:59Z"}, {"text": "b", "timestamp": 1717200000},
                 {"text": "c", "timestamp": 1717200000500}, {"text": "d"}, {"text": "e", "timestamp": "yesterday"}])
    files, skipped = rl.read_log_files(str(tmp_path), since=1717200000.0)  # 2024-06-01T00:00:00Z
    report = rl.LogSelection()
    kept = rl.parse_files(files, report, since=1717200000.0)
    assert skipped == 1 and [r.text for r in kept] == ["b", "c", "d"]
    assert report.records_before_since == 1 and report.malformed == {"bad timestamp": 1}


def test_all_bad_lines_or_no_match_raise_one_line_data_errors(tmp_path, tokenizer):
    bad = tmp_path / "bad.jsonl"
    _write(bad, [], MALFORMED[:3])
    with pytest.raises(DataError, match=r"no valid request in the logs \(3 lines, 1 files\); first error: .*bad.jsonl "
                                        r"line 1: invalid json"):
        rl.log_calibration_ids(LogsSource(uri=str(bad)), tokenizer, num_sequences=1, seq_len=8)
    with pytest.raises(DataError, match="matches no log file"):
        rl.log_calibration_ids(LogsSource(uri=str(tmp_path / "missing")), tokenizer, num_sequences=1, seq_len=8)
    small = tmp_path / "small.jsonl"
    _write(small, [{"text": "tiny"}, {"text": "tiny"}])
    with pytest.raises(DataError, match="lower calibration.num_sequences or seq_len"):
        rl.log_calibration_ids(LogsSource(uri=str(small)), tokenizer, num_sequences=2, seq_len=64)


def test_a_logs_config_section_drives_the_windows(logs, tokenizer):
    """The call the driver makes: the calibration.logs section is what log_calibration_ids reads."""
    from nesta_ray.config.loading import validate

    folder, _ = logs
    c = validate({"calibration": {"logs": {"uri": str(folder), "since": "2024-01-01", "language_floor": 0.1},
                                  "num_sequences": 4, "seq_len": 64, "seed": 3}, "output": {"uri": "out"}}).calibration
    ids, report = rl.log_calibration_ids(c.logs, tokenizer, num_sequences=c.num_sequences, seq_len=c.seq_len,
                                         seed=c.seed, select_method=c.select)
    direct, _ = rl.log_calibration_ids(LogsSource(uri=str(folder), language_floor=0.1), tokenizer, num_sequences=4,
                                       seq_len=64, seed=3)
    assert report.method == "k-center" and torch.equal(ids, direct)


def test_a_malformed_response_is_counted_and_its_request_kept(tmp_path):
    log = tmp_path / "chat.jsonl"
    ask = {"messages": [{"role": "user", "content": "what is a volcano?"}]}
    _write(log, [{"request": ask, "response": {"choices": "not a list"}},
                 {"request": ask, "response": {"choices": [{"message": {"role": "assistant", "content": "A vent."}}]}},
                 {"request": ask}])
    report = rl.LogSelection()
    parsed = rl.parse_files(rl.read_log_files(str(log))[0], report)
    assert [len(r.messages) for r in parsed] == [1, 2, 1]  # the bad response is dropped, its request is kept
    assert report.replies_dropped == {"malformed response": 1} and report.malformed == {}


def test_files_whose_storage_knows_no_modification_time_are_counted(tmp_path, tokenizer):
    """A zip archive has no per-file mtime: such a file cannot be skipped by ``since``; its records still are,
    by timestamp, and the report says how many files ``since`` could not judge."""
    import zipfile

    rows = [{"text": f"request number {i} about {TOPICS[i % 8]} " * 3, "timestamp": 1717200000 + i} for i in range(40)]
    rows += [{"text": "from last year", "timestamp": 1600000000}]
    archive = tmp_path / "logs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("day1.jsonl", "\n".join(json.dumps(r) for r in rows))
    logs = LogsSource(uri=f"zip://*.jsonl::{archive}", since="2024-06-01T00:00:00Z")
    _, report = rl.log_calibration_ids(logs, tokenizer, num_sequences=2, seq_len=32)
    assert report.files == 1 and report.files_unknown_mtime == 1 and report.files_before_since == 0
    assert report.records_before_since == 1
