"""Calibration from production request logs: read JSON-lines logs, parse, deduplicate, pick a representative
subset, render it for the model and pack it into token windows.

Log lines (one JSON object per line; blank lines are skipped) come in four shapes:
``{"messages": [{"role", "content"}, ...]}`` (chat), ``{"request": {"messages": [...]}, "response": {"choices":
[{"message": {...}}]}}`` (an OpenAI-style exchange: the reply, when present, is appended as the last message),
``{"prompt", "completion"}`` (rendered as prompt + completion, the text a completion endpoint sees) and
``{<text_field>: "..."}``. A message ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts.
Any other line is malformed and counted by reason; only a log with no valid line is an error.

Selection is ``nesta_ray.selection`` (deduplication, features, stratified k-center).
"""

from __future__ import annotations

import datetime
import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from nesta_ray.config.schema import LogsSource
from nesta_ray.data.selection import coverage, dedup, features, language, length_bucket, select
from nesta_ray.errors import DataError

RENDERINGS = ("auto", "template", "plain")
LOG_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz")


@dataclass(frozen=True)
class LogFile:
    """One log file's raw bytes; ``mtime`` is its modification time (unix seconds) where the storage knows it."""

    name: str
    mtime: float | None
    data: bytes


@dataclass(frozen=True)
class Request:
    """One parsed log line: chat ``messages`` ((role, content) pairs) or a plain ``text``."""

    shape: str
    messages: tuple[tuple[str, str], ...] | None = None
    text: str | None = None

    def plain(self) -> str:
        """Chat as "role: content" lines; other shapes as their text."""
        if self.messages is None:
            return self.text or ""
        return "\n".join(f"{r}: {c}" for r, c in self.messages)


@dataclass
class LogSelection:
    """What the log source held and what was picked from it (written into the job report)."""

    files: int = 0
    files_before_since: int = 0
    files_unknown_mtime: int = 0  # the storage gives no modification time: ``since`` filters their records only
    lines: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
    replies_dropped: dict[str, int] = field(default_factory=dict)  # request kept, its unreadable response dropped
    first_error: str | None = None
    records_before_since: int = 0
    records: int = 0
    shapes: dict[str, int] = field(default_factory=dict)
    exact_duplicates: int = 0
    near_duplicates: int = 0
    unique: int = 0
    languages_before: dict[str, int] = field(default_factory=dict)
    lengths_before: dict[str, int] = field(default_factory=dict)
    method: str = "k-center"
    seed: int = 0
    language_floor: float = 0.0
    selected: int = 0
    used: int = 0
    languages_after: dict[str, int] = field(default_factory=dict)
    lengths_after: dict[str, int] = field(default_factory=dict)
    rendering: dict[str, int] = field(default_factory=dict)
    tokens_per_language: dict[str, int] = field(default_factory=dict)
    coverage_mean: float = 0.0
    coverage_p95: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Bad(Exception):
    """A malformed log line; the message is the reason it is counted under."""


# ---- reading (the only I/O) -------------------------------------------------------------------------------------

def list_log_files(uri: str, storage_options: dict | None = None) -> tuple[Any, list[str]]:
    """(filesystem, paths) of the log files ``uri`` names, as ``read_log_files`` takes them (nothing read)."""
    from nesta_ray.io.storage import guard, url_to_fs

    fs, path = url_to_fs(uri, storage_options)
    with guard(uri, storage_options, write=False):
        try:
            if any(c in path for c in "*?["):
                names = [p for p in fs.glob(path) if fs.isfile(p)]
            elif fs.isdir(path):
                names = [p for p in fs.find(path) if p.lower().endswith(LOG_SUFFIXES)]
            else:
                names = [path] if fs.isfile(path) else []
        except FileNotFoundError:
            names = []
    if not names:
        raise DataError(f"calibration.logs.uri {uri} matches no log file (a .jsonl file, a folder of them or a glob)")
    return fs, names


def read_log_files(uri: str, storage_options: dict | None = None, since: float | None = None
                   ) -> tuple[list[LogFile], int]:
    """The log files ``uri`` names (a file, a folder: its *.jsonl/.ndjson/.json[.gz] files at any depth, or a glob),
    in name order, and how many were skipped as last modified before ``since`` (unix seconds). ``.gz`` files are
    decompressed. Raises DataError when ``uri`` matches no file."""
    fs, names = list_log_files(uri, storage_options)
    files, old = [], 0
    for name in sorted(names):
        try:
            mtime = fs.modified(name).timestamp()
        except (NotImplementedError, FileNotFoundError, OSError):
            mtime = None
        if since is not None and mtime is not None and mtime < since:
            old += 1
            continue
        with fs.open(name, "rb", compression="infer") as f:
            files.append(LogFile(name, mtime, f.read()))
    return files, old


# ---- parsing ----------------------------------------------------------------------------------------------------

def parse_files(files: Iterable[LogFile], report: LogSelection, text_field: str = "text",
                timestamp_field: str = "timestamp", since: float | None = None) -> list[Request]:
    """Valid requests of all files in order; fills ``report``'s line, malformed, shape and since counts. With
    ``since``, a record whose ``timestamp_field`` (unix seconds, milliseconds above 1e11, or ISO 8601; naive is
    UTC) is earlier is dropped; a record without that field is kept (its file changed after ``since``).
    Raises DataError when no line of any file is valid, naming the file, line and reason of the first error."""
    requests: list[Request] = []
    malformed: Counter = Counter()
    replies: Counter = Counter()
    for f in files:
        report.files += 1
        for number, raw in enumerate(f.data.split(b"\n"), 1):
            if not raw.strip():
                continue
            report.lines += 1
            try:
                obj = _json(raw)
                req, dropped = _record(obj, text_field)
                stamp = obj.get(timestamp_field) if since is not None and isinstance(obj, dict) else None
                if since is not None and stamp is not None and _timestamp(stamp) < since:
                    report.records_before_since += 1
                    continue
            except _Bad as bad:
                malformed[str(bad)] += 1
                report.first_error = report.first_error or f"{f.name} line {number}: {bad}"
                continue
            requests.append(req)
            if dropped:
                replies[dropped] += 1
    report.malformed = dict(sorted(malformed.items()))
    report.replies_dropped = dict(sorted(replies.items()))
    report.records = len(requests)
    report.shapes = dict(sorted(Counter(r.shape for r in requests).items()))
    if not requests and not report.records_before_since:
        where = report.first_error or "the files hold no non-blank line"
        raise DataError(f"no valid request in the logs ({report.lines} lines, {report.files} files); first error: "
                        f"{where}")
    return requests


def _json(raw: bytes) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad("invalid utf-8") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        raise _Bad("invalid json") from None


def _record(obj: Any, text_field: str) -> tuple[Request, str]:
    """The request a log record holds, and the reason its response was dropped ("" when none was)."""
    if not isinstance(obj, dict):
        raise _Bad("not a JSON object")
    if "messages" in obj:
        return Request("messages", messages=_messages(obj["messages"])), ""
    if isinstance(obj.get("request"), dict) and "messages" in obj["request"]:
        reply, dropped = _reply(obj.get("response"))
        return Request("openai", messages=_messages(obj["request"]["messages"]) + reply), dropped
    if "prompt" in obj:
        prompt, completion = obj["prompt"], obj.get("completion") or ""
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise _Bad("prompt/completion not strings")
        text, shape = prompt + completion, "prompt_completion"
    elif text_field in obj:
        text, shape = obj[text_field], "text"
        if not isinstance(text, str):
            raise _Bad(f"{text_field} not a string")
    else:
        raise _Bad("unknown shape")
    if not text.strip():
        raise _Bad("empty text")
    return Request(shape, text=text), ""


def _messages(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list):
        raise _Bad("messages not a list")
    out = []
    for m in value:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _Bad("message without a role")
        content = _content(m.get("content"))
        if content.strip():
            out.append((m["role"], content))
    if not out:
        raise _Bad("empty text")
    return tuple(out)


def _content(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, list):
        return "".join(p["text"] for p in value if isinstance(p, dict) and isinstance(p.get("text"), str))
    raise _Bad("message content not text")


def _reply(response: Any) -> tuple[tuple[tuple[str, str], ...], str]:
    """The assistant reply of an OpenAI-style response ((), "" without a response or with an empty one), and the
    reason a present but unreadable response is dropped."""
    if response is None:
        return (), ""
    try:
        message = response["choices"][0]["message"]
        content = _content(message.get("content"))
        role = message.get("role") or "assistant"
    except (KeyError, IndexError, TypeError, AttributeError, _Bad):
        return (), "malformed response"
    if not isinstance(role, str):
        return (), "malformed response"
    return (((role, content),) if content else ()), ""


def _timestamp(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 1000.0 if value > 1e11 else float(value)
    try:
        stamp = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise _Bad("bad timestamp") from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)).timestamp()


# ---- rendering, packing and the whole source --------------------------------------------------------------------

def render(request: Request, tokenizer: Any, rendering: str, counts: Counter) -> tuple[str, bool]:
    """The text the model sees for one request, and whether the chat template made it: chat goes through the
    tokenizer's chat template (``auto``: when it has one; ``template``: required), else plain "role: content" lines.
    Counts 'template', 'plain' and 'template_failed' (a template that rejects the chat under ``auto``, e.g. an
    unsupported role) in ``counts``. Raises DataError under ``template`` when the tokenizer has no chat template or
    it rejects a chat."""
    if request.messages is not None and rendering != "plain" and getattr(tokenizer, "chat_template", None):
        chat = [{"role": r, "content": c} for r, c in request.messages]
        try:
            text = tokenizer.apply_chat_template(chat, tokenize=False)
            counts["template"] += 1
            return text, True
        except Exception as err:  # jinja2 raises TemplateError or the template's own raise_exception message
            if rendering == "template":
                raise DataError(f"the chat template rejects a logged chat ({err}); use calibration.logs.rendering: "
                                "auto to render such chats as plain text") from None
            counts["template_failed"] += 1
    elif request.messages is not None and rendering == "template":
        raise DataError("calibration.logs.rendering is 'template' but the tokenizer has no chat template; "
                        "use rendering: auto or plain")
    counts["plain"] += 1
    return request.plain(), False


def pack(token_lists: list[list[int]], num_sequences: int, seq_len: int) -> tuple[torch.Tensor | None, list[int]]:
    """Windows (num_sequences, seq_len): the requests' tokens, each cut to seq_len, concatenated in order and cut
    into windows; and the tokens each request placed in them (requests past the budget are not listed). None for
    the windows when the requests hold fewer than num_sequences·seq_len tokens."""
    budget = num_sequences * seq_len
    stream: list[int] = []
    placed: list[int] = []
    for ids in token_lists:
        if len(stream) >= budget:
            break
        placed.append(min(len(ids), seq_len, budget - len(stream)))
        stream += ids[:seq_len]
    if len(stream) < budget:
        return None, placed
    return torch.tensor(stream[:budget], dtype=torch.long).view(num_sequences, seq_len), placed


class _Pool:
    """The unique requests of a log source with their features, ready to be picked and packed into windows."""

    def __init__(self, unique: list[Request], tokenizer: Any, rendering: str) -> None:
        self.unique, self.tokenizer, self.rendering = unique, tokenizer, rendering
        plains = [r.plain() for r in unique]
        self.langs, self.lengths = [language(t) for t in plains], [length_bucket(t) for t in plains]
        self.X = features(plains)
        self.eos = getattr(tokenizer, "eos_token_id", None)

    def tokens(self, chosen: list[int], counts: Counter) -> list[list[int]]:
        """Each chosen request rendered and tokenised (plus EOS when rendered plain)."""
        out = []
        for i in chosen:
            text, templated = render(self.unique[i], self.tokenizer, self.rendering, counts)
            ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            out.append(ids if templated or self.eos is None else ids + [self.eos])
        return out

    def fill(self, logs: LogsSource, report: LogSelection, num_sequences: int,
             seq_len: int) -> tuple[torch.Tensor | None, list[int], list[int]]:
        """(windows or None, the chosen requests, the tokens each placed): ``logs.requests`` picks, or from
        num_sequences doubling until the picks fill the windows."""
        n = logs.requests or num_sequences
        while True:
            chosen = select(self.X, self.langs, self.lengths, n, report.method, report.seed, logs.language_floor)
            counts: Counter = Counter()
            windows, placed = pack(self.tokens(chosen, counts), num_sequences, seq_len)
            if windows is not None or logs.requests is not None or len(chosen) >= len(self.unique):
                report.rendering = dict(sorted(counts.items()))
                return windows, chosen, placed
            n *= 2

    def describe(self, report: LogSelection, used: list[int], placed: list[int]) -> None:
        """Fill the report's after-selection fields for the requests ``used`` and the tokens each ``placed``."""
        report.languages_after = _counts(self.langs[i] for i in used)
        report.lengths_after = _counts(self.lengths[i] for i in used)
        tokens: Counter = Counter()
        for i, count in zip(used, placed):
            tokens[self.langs[i]] += count
        report.tokens_per_language = dict(sorted(tokens.items()))
        dist = coverage(self.X, used)
        report.coverage_mean, report.coverage_p95 = float(dist.mean()), float(np.quantile(dist, 0.95))


def _unique_requests(logs: LogsSource, report: LogSelection, since: float | None) -> list[Request]:
    """The valid, deduplicated requests of the log source (read, parsed, counted in ``report``)."""
    files, report.files_before_since = read_log_files(logs.uri, logs.storage_options, since)
    report.files_unknown_mtime = sum(f.mtime is None for f in files)
    parsed = parse_files(files, report, logs.text_field, logs.timestamp_field, since)
    keep, report.exact_duplicates, report.near_duplicates = dedup([r.plain() for r in parsed])
    unique = [parsed[i] for i in keep]
    if not unique:
        raise DataError(f"no log request is at or after since ({report.records_before_since} records and "
                        f"{report.files_before_since} files are older); move calibration.logs.since back")
    return unique


def log_calibration_ids(logs: LogsSource, tokenizer: Any, *, num_sequences: int, seq_len: int, seed: int = 0,
                        select_method: str = "k-center") -> tuple[torch.Tensor, LogSelection]:
    """Calibration windows (num_sequences, seq_len) from the request logs ``logs`` names, and the LogSelection
    report.

    ``logs.requests`` picks that many requests; None starts at num_sequences and doubles until the picked requests
    fill the windows. Each picked request is rendered (``render``), tokenised without special tokens, followed by
    the EOS token when rendered plain (a chat template closes its own turns), cut to seq_len tokens (one request
    never fills more than one window's worth), and the requests are packed back to back in selection order;
    requests past the budget are left out (``used`` < ``selected``). A naive ``since`` is UTC. Raises DataError
    when the logs hold no valid request or, after dedup, too few tokens for the windows.
    """
    since = logs.since
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=datetime.timezone.utc)
    stamp = None if since is None else since.timestamp()
    report = LogSelection(method=select_method, seed=seed, language_floor=logs.language_floor)
    pool = _Pool(_unique_requests(logs, report, stamp), tokenizer, logs.rendering)
    report.unique, report.languages_before = len(pool.unique), _counts(pool.langs)
    report.lengths_before = _counts(pool.lengths)
    windows, chosen, placed = pool.fill(logs, report, num_sequences, seq_len)
    report.selected, report.used = len(chosen), len(placed)
    if windows is None:
        raise DataError(f"the {len(chosen)} picked log requests hold {sum(placed)} tokens (each cut to seq_len), "
                        f"fewer than num_sequences x seq_len = {num_sequences * seq_len}; lower "
                        "calibration.num_sequences or seq_len"
                        + (", or raise calibration.logs.requests" if logs.requests is not None else ""))
    pool.describe(report, chosen[:len(placed)], placed)
    return windows, report


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))
