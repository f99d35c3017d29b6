"""The token windows a job's config selects: calibration, evaluation sets and held-out drift baselines.

Text is read and tokenised once per (source, seq_len) by a ``TextCache``, which also keeps what its sources
skipped (malformed JSON-lines records), where registry texts came from (packages, licence, NOTICE) and what a
request-log selection picked, for the run report.
"""

from __future__ import annotations

from typing import Any

import torch

from nesta_ray.config.schema import JobConfig, TextSource
from nesta_ray.data.requestlogs import log_calibration_ids
from nesta_ray.data.text import pick_windows, read_dataset, read_text, token_windows


class TextCache:
    """Token windows per (source, seq_len), read and tokenised once per job."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[tuple[str, int], torch.Tensor] = {}
        self.skipped: dict[str, dict[str, int]] = {}  # source -> reason -> records skipped while reading it
        self.sources: dict[str, dict[str, Any]] = {}  # registry text -> its packages, sha256, licence, NOTICE
        self.log_selection: dict[str, Any] | None = None  # what calibration_ids picked from request logs

    def windows(self, src: TextSource, seq_len: int) -> torch.Tensor:
        """All non-overlapping windows (W, seq_len) of the source's tokens. Raises DataError as ``read_text``."""
        key = (src.key(), seq_len)
        if key not in self._cache:
            text = (read_text(src.path, src.text_field) if src.path is not None
                    else read_dataset(str(src.dataset), src.split, src.text_field, src.subset))
            if text.skipped:
                self.skipped[src.key()] = text.skipped
            if text.source:
                self.sources[src.key()] = text.source
            self._cache[key] = token_windows(self.tokenizer, text.text, seq_len)
        return self._cache[key]

    def report(self) -> dict[str, Any]:
        """What the run report says about the text read: skipped records per source, where registry texts came
        from, and the log selection."""
        out: dict[str, Any] = {}
        if self.skipped:
            out["skipped_records"] = self.skipped
        if self.sources:
            out["text_sources"] = self.sources
        if self.log_selection is not None:
            out["log_selection"] = self.log_selection
        return out


def calibration_ids(cfg: JobConfig, texts: TextCache) -> torch.Tensor:
    """The calibration windows (num_sequences, seq_len) the config selects (from request logs: the selection's report
    is kept in ``texts.log_selection``)."""
    c = cfg.calibration
    if c.logs is not None:
        ids, selection = log_calibration_ids(c.logs, texts.tokenizer, num_sequences=c.num_sequences,
                                             seq_len=c.seq_len, seed=c.seed, select_method=c.select)
        texts.log_selection = selection.as_dict()
        return ids
    return pick_windows(texts.windows(c, c.seq_len), c.first_window, c.num_windows, c.num_sequences, c.seed, c.select)


def evaluation_ids(cfg: JobConfig, texts: TextCache) -> dict[str, torch.Tensor]:
    """Evaluation windows per set name."""
    e = cfg.evaluation
    return {s.name: pick_windows(texts.windows(s, e.seq_len), s.first_window, s.num_windows, None, 0, "first")
            for s in e.sets}


def sample_ids(cfg: JobConfig, texts: TextCache, count: int) -> torch.Tensor:
    """``count`` calibration windows drawn as the calibration is (tonight's drift sample)."""
    sample = cfg.model_copy(update={"calibration": cfg.calibration.model_copy(update={"num_sequences": count})})
    return calibration_ids(sample, texts)


def heldout_ids(cfg: JobConfig, texts: TextCache) -> torch.Tensor:
    """Up to ``nightly.sample_sequences`` windows (n, seq_len) of the calibration text's window range that the
    calibration did not use (seeded), for an out-of-sample baseline; (0, seq_len) when there are none. From request
    logs: a seeded random pick of tonight's requests, which may share requests with the calibration selection."""
    c = cfg.calibration
    if c.logs is not None:
        return calibration_ids(cfg.model_copy(update={"calibration": c.model_copy(update={
            "num_sequences": cfg.nightly.sample_sequences, "seed": c.seed + 1, "select": "random"})}), texts)
    pool = pick_windows(texts.windows(c, c.seq_len), c.first_window, c.num_windows, None, c.seed, "first")
    used = {tuple(row.tolist()) for row in calibration_ids(cfg, texts)}
    spare = torch.stack([w for w in pool if tuple(w.tolist()) not in used]) if len(pool) > len(used) else pool[:0]
    order = torch.randperm(len(spare), generator=torch.Generator().manual_seed(c.seed + 1))
    return spare[order[: cfg.nightly.sample_sequences].sort().values]
