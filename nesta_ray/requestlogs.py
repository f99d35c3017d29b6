"""Calibration from production request logs: read JSON-lines logs, parse, deduplicate, pick a representative
subset, render it for the model and pack it into token windows.

Log lines (one JSON object per line; blank lines are skipped) come in four shapes:
``{"messages": [{"role", "content"}, ...]}`` (chat), ``{"request": {"messages": [...]}, "response": {"choices":
[{"message": {...}}]}}`` (an OpenAI-style exchange: the reply, when present, is appended as the last message),
``{"prompt", "completion"}`` (rendered as prompt + completion, the text a completion endpoint sees) and
``{<text_field>: "..."}``. A message ``content`` may be a string or a list of ``{"type": "text", "text": ...}`` parts.
Any other line is malformed and counted by reason; only a log with no valid line is an error.

Selection (``select``): requests are deduplicated first (exact, then after NFKC + casefold + whitespace collapse;
the first occurrence is kept), then described by cheap features: a script/language bucket from Unicode blocks
(``ja``: kana present, ``zh``: Han without kana, ``other``: mostly non-Latin letters, ``code``: Latin text dense in
code symbols, keywords or indentation, ``latin``: the rest), a length bucket on UTF-8 bytes, and a vector of hashed
character 3-grams (sqrt counts, unit L2 norm, 512 dims) plus one length coordinate ``0.1·log2(1 + bytes)``.

- ``k-center``: quotas per language bucket proportional to its unique requests, but at least
  ``min(size, ceil(language_floor·n))`` for every bucket (water-filling: buckets whose proportional share falls
  below their floor are fixed at the floor and the rest is shared out again; integer parts by largest remainder;
  when the floors alone exceed n every bucket's floor becomes ``min(size, n // buckets)``). Each language's quota
  is split over its length buckets in proportion to their sizes (no floor). Inside each (language, length)
  stratum a greedy farthest-point k-center picks the requests, starting from a seeded random request.
- ``stratified``: the same quotas, a seeded random draw inside each stratum (the baseline that isolates the quotas).
- ``random``: a seeded uniform draw from the unique requests; ``first``: the first unique requests in log order.

Picks of the stratified methods are interleaved by ``(rank in stratum + 0.5) / stratum quota``, so any prefix of the
selection keeps the quotas' proportions; packing relies on that when the token budget ends part-way.
"""

from __future__ import annotations

import datetime
import json
import math
import re
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

from nesta_ray.errors import DataError

SELECT_METHODS = ("k-center", "stratified", "random", "first")
RENDERINGS = ("auto", "template", "plain")
LENGTH_EDGES = (256, 1024, 4096)  # UTF-8 bytes
LENGTH_BUCKETS = ("<256B", "256B-1KiB", "1-4KiB", ">=4KiB")
DIM = 512
LENGTH_WEIGHT = 0.1
LOG_SUFFIXES = (".jsonl", ".ndjson", ".json", ".jsonl.gz", ".ndjson.gz")
_CODE_SYMBOLS = frozenset("{}[]()=;<>_#*/\\|&+-%\"'`:.,")
_CODE_WORDS = re.compile(r"\b(def|return|import|class|self|elif|lambda|None|True|False|function|const|var|let|"
                         r"include|printf|void|int|public|static)\b|[{};]\s*$|==|!=|->|\(\)|__\w+__", re.M)


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
        return self.text if self.messages is None else "\n".join(f"{r}: {c}" for r, c in self.messages)


@dataclass
class LogSelection:
    """What the log source held and what was picked from it (written into the job report)."""

    files: int = 0
    files_before_since: int = 0
    lines: int = 0
    malformed: dict[str, int] = field(default_factory=dict)
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

def read_log_files(uri: str, storage_options: dict | None = None, since: float | None = None
                   ) -> tuple[list[LogFile], int]:
    """The log files ``uri`` names (a file, a folder: its *.jsonl/.ndjson/.json[.gz] files at any depth, or a glob),
    in name order, and how many were skipped as last modified before ``since`` (unix seconds). ``.gz`` files are
    decompressed. Raises DataError when ``uri`` matches no file."""
    from nesta_ray.storage import url_to_fs

    fs, path = url_to_fs(uri, storage_options)
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
    for f in files:
        report.files += 1
        for number, raw in enumerate(f.data.split(b"\n"), 1):
            if not raw.strip():
                continue
            report.lines += 1
            try:
                obj = _json(raw)
                req = _record(obj, text_field)
                if since is not None and isinstance(obj, dict) and obj.get(timestamp_field) is not None:
                    if _timestamp(obj[timestamp_field]) < since:
                        report.records_before_since += 1
                        continue
            except _Bad as bad:
                malformed[str(bad)] += 1
                report.first_error = report.first_error or f"{f.name} line {number}: {bad}"
                continue
            requests.append(req)
    report.malformed = dict(sorted(malformed.items()))
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


def _record(obj: Any, text_field: str) -> Request:
    if not isinstance(obj, dict):
        raise _Bad("not a JSON object")
    if "messages" in obj:
        return Request("messages", messages=_messages(obj["messages"]))
    if isinstance(obj.get("request"), dict) and "messages" in obj["request"]:
        reply = _reply(obj.get("response"))
        return Request("openai", messages=_messages(obj["request"]["messages"]) + reply)
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
    return Request(shape, text=text)


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


def _reply(response: Any) -> tuple[tuple[str, str], ...]:
    try:
        message = response["choices"][0]["message"]
        return ((message.get("role") or "assistant", _content(message["content"])),) if message["content"] else ()
    except (KeyError, IndexError, TypeError, AttributeError):
        return ()


def _timestamp(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value / 1000.0 if value > 1e11 else float(value)
    try:
        stamp = datetime.datetime.fromisoformat(str(value))
    except ValueError:
        raise _Bad("bad timestamp") from None
    return (stamp if stamp.tzinfo else stamp.replace(tzinfo=datetime.timezone.utc)).timestamp()


# ---- dedup and features (pure) ----------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """NFKC, casefolded, whitespace collapsed: the key of near-duplicate detection."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def dedup(texts: list[str]) -> tuple[list[int], int, int]:
    """Indices of the first occurrence of each normalised text, and the counts of exact and near duplicates."""
    exact, near, keep = set(), {}, []
    n_exact = n_near = 0
    for i, t in enumerate(texts):
        if t in exact:
            n_exact += 1
            continue
        exact.add(t)
        key = normalise(t)
        if key in near:
            n_near += 1
            continue
        near[key] = i
        keep.append(i)
    return keep, n_exact, n_near


def language(text: str) -> str:
    """Script bucket from Unicode blocks: 'ja', 'zh', 'other', 'code' or 'latin' (see the module docstring)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    kana = int(np.count_nonzero(((cp >= 0x3040) & (cp <= 0x30FF)) | ((cp >= 0xFF66) & (cp <= 0xFF9F))))
    han = int(np.count_nonzero(((cp >= 0x3400) & (cp <= 0x4DBF)) | ((cp >= 0x4E00) & (cp <= 0x9FFF))))
    latin = int(np.count_nonzero(((cp | 0x20) >= 0x61) & ((cp | 0x20) <= 0x7A) | ((cp >= 0xC0) & (cp <= 0x24F))))
    other = int(np.count_nonzero(((cp >= 0x370) & (cp < 0x2000)) | ((cp >= 0xAC00) & (cp <= 0xD7AF))))
    letters = max(1, kana + han + latin + other)
    if kana + han >= 0.3 * letters:
        return "ja" if kana > 0.05 * (kana + han) else "zh"
    if other >= 0.3 * letters:
        return "other"
    return "code" if _code_like(text) else "latin"


def _code_like(text: str) -> bool:
    chars = [c for c in text if not c.isspace()]
    symbols = sum(c in _CODE_SYMBOLS for c in chars) / max(1, len(chars))
    lines = text.splitlines() or [text]
    words = len(_CODE_WORDS.findall(text)) / len(lines)
    indented = sum(line.startswith(("    ", "\t")) for line in lines) / len(lines)
    return symbols >= 0.2 or (symbols >= 0.06 and (words >= 0.25 or indented >= 0.4))


def length_bucket(text: str) -> str:
    """Length bucket of the text's UTF-8 size (bytes track tokens across scripts better than characters)."""
    size = len(text.encode("utf-8"))
    return LENGTH_BUCKETS[sum(size >= e for e in LENGTH_EDGES)]


def features(texts: list[str]) -> np.ndarray:
    """(len(texts), DIM + 1) float32: hashed character 3-gram vector (sqrt counts, unit norm) of the normalised
    text, then ``LENGTH_WEIGHT·log2(1 + UTF-8 bytes)``."""
    X = np.zeros((len(texts), DIM + 1), dtype=np.float32)
    for i, t in enumerate(texts):
        cp = np.frombuffer(f" {normalise(t)} ".encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        h = ((cp[:-2] * np.uint64(1000003)) ^ cp[1:-1]) * np.uint64(1000003) ^ cp[2:]
        h = (h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(40)
        counts = np.sqrt(np.bincount((h % np.uint64(DIM)).astype(np.int64), minlength=DIM))
        X[i, :DIM] = counts / max(float(np.linalg.norm(counts)), 1e-12)
        X[i, DIM] = LENGTH_WEIGHT * math.log2(1 + len(t.encode("utf-8")))
    return X


# ---- selection (pure) -------------------------------------------------------------------------------------------

def quotas(sizes: dict[str, int], n: int, floor: float) -> dict[str, int]:
    """Picks per bucket summing to min(n, total): proportional to ``sizes`` with a floor of
    ``min(size, ceil(floor·n))`` per bucket (water-filling, then largest remainder; see the module docstring)."""
    keys = sorted((k for k in sizes if sizes[k] > 0), key=lambda k: (-sizes[k], k))
    n = min(n, sum(sizes[k] for k in keys))
    low = {k: min(sizes[k], math.ceil(floor * n)) for k in keys}
    if sum(low.values()) > n:
        low = {k: min(sizes[k], n // len(keys)) for k in keys}
    fixed: dict[str, int] = {}
    while True:
        free = [k for k in keys if k not in fixed]
        left, total = n - sum(fixed.values()), sum(sizes[k] for k in free)
        share = {k: left * sizes[k] / total for k in free} if total else {}
        moved = {k: low[k] for k in free if share[k] < low[k]} | {k: sizes[k] for k in free if share[k] > sizes[k]}
        if not moved:
            break
        fixed |= moved
    out = fixed | {k: math.floor(share[k]) for k in free}
    rest = n - sum(out.values())
    for k in sorted(free, key=lambda k: -(share[k] - math.floor(share[k])))[:rest]:
        out[k] += 1
    return {k: out[k] for k in keys if out[k] > 0}


def k_center(X: np.ndarray, k: int, rng: np.random.Generator) -> list[int]:
    """Greedy farthest-point k-center on rows of X (m, d) from a seeded random first row; picks in order."""
    X = X.astype(np.float64)
    sq = np.einsum("ij,ij->i", X, X)
    chosen = [int(rng.integers(len(X)))]
    dist = np.maximum(sq + sq[chosen[0]] - 2 * X @ X[chosen[0]], 0)
    dist[chosen[0]] = -1
    while len(chosen) < min(k, len(X)):
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.maximum(sq + sq[i] - 2 * X @ X[i], 0))
        dist[chosen] = -1
    return chosen


def select(X: np.ndarray, langs: list[str], lengths: list[str], n: int, method: str, seed: int,
           language_floor: float) -> list[int]:
    """Indices of min(n, len(X)) rows of X (m, d) picked by ``method`` (SELECT_METHODS), ordered so that every
    prefix keeps the stratum proportions. Raises ValueError for an unknown method."""
    rng = np.random.default_rng(seed)
    if method == "first":
        return list(range(min(n, len(X))))
    if method == "random":
        return [int(i) for i in rng.permutation(len(X))[:n]]
    if method not in ("k-center", "stratified"):
        raise ValueError(f"select must be one of {SELECT_METHODS}, got {method!r}")
    keyed = []
    per_lang = quotas(Counter(langs), n, language_floor)
    for lang, q_lang in per_lang.items():
        rows = [i for i, g in enumerate(langs) if g == lang]
        for bucket, q in quotas(Counter(lengths[i] for i in rows), q_lang, 0.0).items():
            members = np.array([i for i in rows if lengths[i] == bucket])
            picks = k_center(X[members], q, rng) if method == "k-center" else rng.permutation(len(members))[:q]
            keyed += [((rank + 0.5) / q, lang, bucket, int(members[p])) for rank, p in enumerate(picks)]
    return [i for *_, i in sorted(keyed)]


def coverage(X: np.ndarray, chosen: list[int], chunk: int = 4096) -> np.ndarray:
    """Euclidean distance (m,) from every row of X (m, d) to its nearest chosen row."""
    X = X.astype(np.float64)
    C = X[chosen]
    cc = np.einsum("ij,ij->i", C, C)
    out = np.empty(len(X), dtype=np.float64)
    for s in range(0, len(X), chunk):
        B = X[s:s + chunk]
        d2 = np.einsum("ij,ij->i", B, B)[:, None] + cc[None, :] - 2 * B @ C.T
        out[s:s + chunk] = np.sqrt(np.maximum(d2.min(axis=1), 0))
    return out


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


def log_calibration_ids(uri: str, tokenizer: Any, *, num_sequences: int, seq_len: int, seed: int = 0,
                        select_method: str = "k-center", requests: int | None = None,
                        storage_options: dict | None = None, since: datetime.datetime | float | None = None,
                        text_field: str = "text", timestamp_field: str = "timestamp", rendering: str = "auto",
                        language_floor: float = 0.05) -> tuple[torch.Tensor, LogSelection]:
    """Calibration windows (num_sequences, seq_len) from request logs, and the LogSelection report.

    ``requests`` picks that many requests; None starts at num_sequences and doubles until the picked requests
    fill the windows. Each picked request is rendered (``render``), tokenised without special tokens, followed by
    the EOS token when rendered plain (a chat template closes its own turns), cut to seq_len tokens (one request
    never fills more than one window's worth), and the requests are packed back to back in selection order;
    requests past the budget are left out (``used`` < ``selected``). A naive ``since`` is UTC. Raises DataError
    when the logs hold no valid request or, after dedup, too few tokens for the windows.
    """
    if isinstance(since, datetime.datetime):
        since = (since if since.tzinfo else since.replace(tzinfo=datetime.timezone.utc)).timestamp()
    report = LogSelection(method=select_method, seed=seed, language_floor=language_floor)
    files, report.files_before_since = read_log_files(uri, storage_options, since)
    parsed = parse_files(files, report, text_field, timestamp_field, since)
    keep, report.exact_duplicates, report.near_duplicates = dedup([r.plain() for r in parsed])
    unique = [parsed[i] for i in keep]
    plains = [r.plain() for r in unique]
    langs, lengths = [language(t) for t in plains], [length_bucket(t) for t in plains]
    report.unique, report.languages_before, report.lengths_before = len(unique), _counts(langs), _counts(lengths)
    if not unique:
        raise DataError(f"no log request is at or after since ({report.records_before_since} records and "
                        f"{report.files_before_since} files are older); move calibration.logs.since back")
    X = features(plains)
    eos = getattr(tokenizer, "eos_token_id", None)
    n = requests or num_sequences
    while True:
        chosen = select(X, langs, lengths, n, select_method, seed, language_floor)
        counts: Counter = Counter()
        token_lists = []
        for i in chosen:
            text, templated = render(unique[i], tokenizer, rendering, counts)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            token_lists.append(ids if templated or eos is None else ids + [eos])
        windows, placed = pack(token_lists, num_sequences, seq_len)
        if windows is not None or requests is not None or len(chosen) >= len(unique):
            break
        n *= 2
    report.selected, report.used, report.rendering = len(chosen), len(placed), dict(sorted(counts.items()))
    if windows is None:
        raise DataError(f"the {len(chosen)} picked log requests hold {sum(placed)} tokens (each cut to seq_len), "
                        f"fewer than num_sequences x seq_len = {num_sequences * seq_len}; lower "
                        "calibration.num_sequences or seq_len"
                        + (", or raise calibration.logs.requests" if requests is not None else ""))
    used = chosen[:len(placed)]
    report.languages_after, report.lengths_after = _counts(langs[i] for i in used), _counts(lengths[i] for i in used)
    tokens: Counter = Counter()
    for i, count in zip(used, placed):
        tokens[langs[i]] += count
    report.tokens_per_language = dict(sorted(tokens.items()))
    dist = coverage(X, used)
    report.coverage_mean, report.coverage_p95 = float(dist.mean()), float(np.quantile(dist, 0.95))
    return windows, report


def _counts(values: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))
