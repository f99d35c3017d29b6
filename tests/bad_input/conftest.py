"""What every bad-input case shares: planted secrets, a valid base job, and ``refused``, the one check of a refusal.

A refusal is: the exit code (2 unless said), the first line of stderr starts with ``error:`` and names the field or
file, no traceback anywhere, nothing under the watched folders changed (the output root, the run), and neither
planted secret (one in the environment, one in ``storage_options``) in stdout or stderr.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from bad_input.planted import ENV_SECRET, SECRETS

from paths import C4


def snapshot(*roots: str | Path) -> dict[str, tuple[int, str] | None]:
    """Every file under ``roots`` (relative path -> size, sha256), None for a root that does not exist."""
    state: dict[str, tuple[int, str] | None] = {}
    for root in map(Path, roots):
        if not root.exists():
            state[str(root)] = None
            continue
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            state[str(path)] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
        state.update({str(d): (0, "dir") for d in root.rglob("*") if d.is_dir()})
    return state


def assert_clean(text: str) -> None:
    """No traceback and no planted secret in ``text``."""
    assert "Traceback" not in text, text
    for secret in SECRETS:
        assert secret not in text, f"secret {secret} echoed: {text}"


@pytest.fixture(autouse=True)
def planted(monkeypatch):
    """A secret in the environment under a name that says it is one."""
    monkeypatch.setenv("NESTA_PLANTED_TOKEN", ENV_SECRET)


@pytest.fixture
def refused(capsys) -> Callable[..., str]:
    """``refused(call, names, watch=(...), code=2)``: run ``call()`` (a CLI ``main``), check the refusal, return
    the first stderr line."""

    def check(call: Callable[[], int], names: str | tuple[str, ...], watch: tuple = (), code: int = 2) -> str:
        before = snapshot(*watch)
        try:
            rc = call()
        except SystemExit as exit_:  # argparse's own exit, as on the command line
            rc = exit_.code
        out, err = capsys.readouterr()
        first = err.splitlines()[0] if err.strip() else ""
        assert rc == code, f"exit {rc}: {out}{err}"
        assert first.startswith("error:"), err
        for name in (names,) if isinstance(names, str) else names:
            assert name in first, f"{name!r} not in {first!r}"
        assert len(first) <= 2200, f"{len(first)} characters"
        assert_clean(out + err)
        assert snapshot(*watch) == before, "a refused command changed what it watches"
        return first

    return check


@pytest.fixture(scope="session")
def texts(tmp_path_factory) -> dict[str, str]:
    """Text files good and bad, by name: text (real C4 text), binary, utf16, parquet_named (text called .parquet),
    folder, csv, empty, jsonl_nofield, jsonl_garbage, parquet_nocol, short, cases_bad, cases_binary, logs_empty."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path_factory.mktemp("texts")
    (d / "text.txt").write_text(Path(C4).read_text()[:400_000])
    (d / "binary.txt").write_bytes(bytes(range(256)) * 64)
    (d / "utf16.txt").write_text("some text " * 200, encoding="utf-16")
    (d / "parquet_named.parquet").write_text("plain text, not parquet\n" * 50)
    (d / "folder").mkdir()
    (d / "folder" / "a.txt").write_text("text")
    (d / "table.csv").write_text("text\nhello\n")
    (d / "empty.txt").write_bytes(b"")
    (d / "nofield.jsonl").write_text('{"body": "x"}\n' * 20)
    (d / "garbage.jsonl").write_text("{not json\n" * 20)
    pq.write_table(pa.table({"body": ["a", "b"]}), d / "nocol.parquet")
    (d / "short.txt").write_text("too short")
    (d / "cases_bad.jsonl").write_text('{"prompt": "x"}\n')
    (d / "cases_binary.jsonl").write_bytes(b"\xff\xfe\x00" * 100)
    (d / "logs_empty").mkdir()
    return {p.stem: str(p) for p in d.iterdir()}


@pytest.fixture
def job(tmp_path, tiny3_folder, texts):
    """A valid job on the tiny model (its dry run passes): ``job.write(raw)`` writes a config, ``job.raw`` is the
    base, ``job.out`` the output root (it holds a file that no refusal may touch)."""

    class Job:
        out = tmp_path / "out"
        raw = {
            "model": {"source": tiny3_folder, "cache_dir": str(tmp_path / "cache")},
            "method": {"name": "nsvd1", "ratio": 0.3},
            "calibration": {"path": texts["text"], "seq_len": 64, "num_windows": 100, "num_sequences": 16},
            "evaluation": {"seq_len": 64, "sets": [{"name": "held", "path": texts["text"], "first_window": 100,
                                                    "num_windows": 2}]},
            "output": {"uri": str(tmp_path / "out")},
            "runtime": {"progress": False},
        }

        def write(self, raw: dict | None = None, text: str | None = None) -> str:
            path = tmp_path / f"job-{os.urandom(3).hex()}.yaml"
            path.write_text(text if text is not None else yaml.safe_dump(raw if raw is not None else self.raw))
            return str(path)

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("written before")
    return Job()


@pytest.fixture(scope="session")
def pristine_run(tmp_path_factory, tiny3_folder) -> str:
    """A committed compressed run of the tiny model (plain SVD), never modified: cases copy it."""
    from tiny import write_tiny_run

    return write_tiny_run(str(tmp_path_factory.mktemp("runs") / "root"), tiny3_folder)


@pytest.fixture
def run_copy(tmp_path, pristine_run) -> Path:
    """A fresh copy of the pristine run, for one case to damage."""
    target = tmp_path / "run"
    shutil.copytree(pristine_run, target)
    return target
