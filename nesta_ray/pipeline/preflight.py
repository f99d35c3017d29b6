"""The pre-flight check: what a job will read is opened (never read whole), what it will write is probed, and the
config is checked against the model, before any compute. The job runs it first; ``--dry-run`` prints it as part of
the plan.

- storage options that an S3 filesystem would silently ignore are refused (``io.storage.unknown_options``);
- the model: its safetensors headers against the files' sizes (a truncated file is refused) and every planned
  linear's weight present, of the shape its config.json gives;
- text: each calibration and evaluation file opened and its first 64 KiB checked (``data.text.probe_text``:
  missing, binary, a folder, a text file named .parquet), request logs listed, the gate's critical cases parsed;
- the output: the job writes and deletes a probe object; a dry run probes a remote output the same way and, for a
  local one, checks that the nearest existing folder is writable (nothing is created);
- the model's context: ``calibration.seq_len`` and ``evaluation.seq_len`` within ``max_position_embeddings``;
- the calibration size: the tokens each Gram sees against its width, a warning below ``TOKENS_PER_DIMENSION``.

A plan made from ``model.config_json`` reaches neither the source nor any remote storage (that is what the field is
for): those checks are listed as not done. Every failure raises the NestaError of its kind naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nesta_ray.checkpoint.layout import weight_key
from nesta_ray.config.schema import JobConfig
from nesta_ray.data.requestlogs import list_log_files
from nesta_ray.data.text import probe_text
from nesta_ray.errors import ConfigError, DataError, ModelError, StorageError
from nesta_ray.io.sources import ModelSource, open_source
from nesta_ray.io.storage import check_local_output, check_protocol, check_storage, unknown_options
from nesta_ray.ops.gate import read_cases
from nesta_ray.plan.linears import Plan
from nesta_ray.report.markdown import table

TOKENS_PER_DIMENSION = 8  # below this many calibration tokens per Gram dimension the plan warns
_OFFLINE = "not reached (model.config_json: the plan is made offline)"


@dataclass
class Preflight:
    """What was checked (rows of field, target, result) and the warnings found."""

    rows: list[list[str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def add(self, name: str, target: str, result: str) -> None:
        self.rows.append([name, target, result])

    def text(self) -> str:
        """The checks as a table, then one ``warning:`` line per warning."""
        return "\n".join([table(["pre-flight", "checked", "result"], self.rows),
                          *(f"warning: {w}" for w in self.warnings)])


def _remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def preflight(cfg: JobConfig, hf_config: Any, plan: Plan, *, dry: bool, source: ModelSource | None = None) -> Preflight:
    """Check ``cfg`` before any compute (``dry``: without creating anything; ``source``: the resolved source, else it
    is resolved here). Returns the checks and warnings. Raises ConfigError, DataError, ModelError or StorageError
    naming the field."""
    checks = Preflight()
    offline = cfg.model.config_json is not None
    _options(cfg)
    _context(cfg, hf_config)
    _model(cfg, plan, checks, None if offline else source or open_source(cfg.model.source, cfg.model.cache_dir,
                                                                            cfg.model.storage_options))
    _texts(cfg, checks, offline)
    _gram_size(cfg, plan, checks)
    try:
        _output(cfg, checks, dry=dry, offline=offline)
    except StorageError as err:
        raise StorageError(f"output.uri: {err}") from None
    return checks


def _options(cfg: JobConfig) -> None:
    """ConfigError for storage options an S3 filesystem would ignore."""
    fields = [("model", cfg.model.source, cfg.model.storage_options),
              ("output", cfg.output.uri, cfg.output.storage_options)]
    if cfg.calibration.logs is not None:
        fields.append(("calibration.logs", cfg.calibration.logs.uri, cfg.calibration.logs.storage_options))
    if cfg.gate is not None and cfg.gate.cases:
        fields.append(("gate", cfg.gate.cases, cfg.gate.storage_options))
    for where, uri, options in fields:
        if unknown := unknown_options(uri, options):
            raise ConfigError(f"{where}.storage_options: {unknown[0][:40]!r} is not an option of the S3 filesystem, "
                              "which would ignore it: check its spelling (e.g. key, secret, client_kwargs, "
                              "config_kwargs)")


def _context(cfg: JobConfig, hf_config: Any) -> None:
    """ConfigError for windows longer than the model's context."""
    context = getattr(hf_config, "max_position_embeddings", None)
    lengths = [("calibration.seq_len", cfg.calibration.seq_len)]
    if cfg.evaluation.sets:
        lengths.append(("evaluation.seq_len", cfg.evaluation.seq_len))
    for where, seq_len in lengths:
        if isinstance(context, int) and seq_len > context:
            raise ConfigError(f"{where}: {seq_len} tokens exceed the model's context of {context} "
                              f"(max_position_embeddings in its config.json): use at most {context}")


def _model(cfg: JobConfig, plan: Plan, checks: Preflight, source: ModelSource | None) -> None:
    """The source's weights: headers against sizes, and every planned linear's weight present with the shape its
    config.json gives."""
    if source is None:
        checks.add("model.source", cfg.model.source, _OFFLINE)
        return
    store = source.weights()
    missing = [weight_key(p.name) for p in plan.modules if weight_key(p.name) not in store.entries]
    if missing:
        raise ModelError(f"model.source {cfg.model.source}: its weights lack {missing[0]}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
                         + " that the plan compresses: the folder is incomplete; copy it again")
    shapes = [(k, store.entries[k].shape, (p.m, p.n)) for p in plan.modules if (k := weight_key(p.name))]
    if wrong := [s for s in shapes if tuple(s[1]) != s[2]]:
        raise ModelError(f"model.source {cfg.model.source}: {wrong[0][0]} has shape {list(wrong[0][1])}, its "
                         f"config.json says {list(wrong[0][2])}: the weights do not fit the config; copy them again")
    size = sum(e.nbytes for e in store.entries.values())
    checks.add("model.source", cfg.model.source, f"{len(store.headers)} safetensors files, {len(store.entries)} "
               f"tensors, {size / 2**30:.2f} GiB: headers match the files' sizes; every planned weight present")


def _text(checks: Preflight, where: str, path: str, text_field: str, offline: bool) -> None:
    if offline and _remote(path):
        checks.add(where, path, _OFFLINE)
        return
    try:
        checks.add(where, path, probe_text(path, text_field))
    except DataError as err:
        raise DataError(f"{where}: {err}") from None


def _texts(cfg: JobConfig, checks: Preflight, offline: bool) -> None:
    """Calibration text or logs, evaluation texts and the gate's cases: opened, checked at their start."""
    cal = cfg.calibration
    sources = [("calibration", cal)] + [(f"evaluation.sets.{i}", s) for i, s in enumerate(cfg.evaluation.sets)]
    for where, src in sources:
        if src.path is not None:
            _text(checks, f"{where}.path", src.path, src.text_field, offline)
        elif src.dataset is not None:
            checks.add(f"{where}.dataset", src.dataset, "a datasets name: loaded when the job runs, not checked here")
    if cal.logs is not None:
        if offline and _remote(cal.logs.uri):
            checks.add("calibration.logs.uri", cal.logs.uri, _OFFLINE)
        else:
            checks.add("calibration.logs.uri", cal.logs.uri,
                       f"{len(list_log_files(cal.logs.uri, cal.logs.storage_options)[1])} log files")
    gate = cfg.gate
    if gate is not None and gate.cases:
        if offline and _remote(gate.cases):
            checks.add("gate.cases", gate.cases, _OFFLINE)
            return
        try:
            checks.add("gate.cases", gate.cases, f"{len(read_cases(gate.cases, gate.storage_options))} critical cases")
        except DataError as err:
            raise DataError(f"gate.cases: {err}") from None


def _gram_size(cfg: JobConfig, plan: Plan, checks: Preflight) -> None:
    """The tokens each Gram sees against the widest Gram's width; a warning below the floor."""
    if not plan.modules:
        return
    cal = cfg.calibration
    tokens = cal.num_sequences * cal.seq_len
    widest = max(plan.modules, key=lambda p: p.n)
    per = tokens / widest.n
    proj = widest.name.rsplit(".", 1)[-1]
    checks.add("calibration tokens per Gram", f"{cal.num_sequences} windows x {cal.seq_len} tokens",
               f"{tokens:,} tokens; widest Gram {widest.n} ({proj} inputs): {per:.1f} tokens per dimension")
    if per < TOKENS_PER_DIMENSION:
        checks.warnings.append(
            f"calibration.num_sequences: each Gram sees {tokens:,} tokens, {per:.1f} per dimension of the widest "
            f"({widest.n}, {proj} inputs), below the floor of {TOKENS_PER_DIMENSION}: statistics from so few tokens "
            f"{'are singular and ' if tokens < widest.n else ''}overfit the calibration text; raise "
            f"calibration.num_sequences or seq_len to at least {TOKENS_PER_DIMENSION * widest.n:,} tokens")


def _output(cfg: JobConfig, checks: Preflight, *, dry: bool, offline: bool) -> None:
    """The job writes and deletes a probe; a dry run probes remote outputs and checks local ones without writing."""
    uri, opts = cfg.output.uri, cfg.output.storage_options
    if not _remote(uri):
        result = check_local_output(uri) if dry else None
        if not dry:
            check_storage(uri, opts, write=True)
        checks.add("output.uri", uri, result or "probe object written and deleted")
    elif offline:
        check_protocol(uri)
        checks.add("output.uri", uri, _OFFLINE)
    else:
        check_storage(uri, opts, write=True)
        checks.add("output.uri", uri, "probe object written and deleted")
