"""Pick representative texts: deduplicate, describe each text by cheap features, and select a stratified,
well-spread subset. Pure (numpy only); ``requestlogs`` applies it to parsed request logs.

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

import math
import re
import unicodedata
from collections import Counter

import numpy as np

SELECT_METHODS = ("k-center", "stratified", "random", "first")
LENGTH_EDGES = (256, 1024, 4096)  # UTF-8 bytes
LENGTH_BUCKETS = ("<256B", "256B-1KiB", "1-4KiB", ">=4KiB")
DIM = 512
LENGTH_WEIGHT = 0.1
_CODE_SYMBOLS = frozenset("{}[]()=;<>_#*/\\|&+-%\"'`:.,")
_CODE_WORDS = re.compile(r"\b(def|return|import|class|self|elif|lambda|None|True|False|function|const|var|let|"
                         r"include|printf|void|int|public|static)\b|[{};]\s*$|==|!=|->|\(\)|__\w+__", re.M)


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
