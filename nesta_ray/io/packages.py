"""Registry packages: fetched once with the registry's ordinary client, checked against a pinned sha256, cached.

A ``Package`` pins one file on a package registry: a PyPI distribution, fetched by ``python -m pip download
--no-deps`` (so pip's own configuration applies: index mirrors, proxies, certificates), or a Debian binary
package, fetched by ``apt-get download`` (a Debian-family machine with its apt lists). ``fetch`` downloads it
once into ``<cache>/packages/<registry>/<file name>`` (into a temporary folder, checked, then renamed, so a
failed or interrupted fetch leaves nothing behind) and checks the size and sha256 of the cached file on every
use. Every failure is one ``PackageError`` line naming the package and why.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from nesta_ray.errors import PackageError
from nesta_ray.io.sources import default_cache_dir

FETCH_TIMEOUT_S = 600.0  # one package download, start to finish
_REGISTRY_NAMES = {"pypi": "PyPI", "debian": "the Debian archive"}
# What a client prints when the registry cannot be reached (pip retries quietly, then reports "no version").
_UNREACHABLE = re.compile(r"Failed to establish a new connection: [^\"')]+|Temporary failure in name resolution|"
                          r"Name or service not known|Network is unreachable|timed out|ProxyError")


@dataclass(frozen=True)
class Package:
    """One pinned file of a registry: ``name`` (a Debian name may carry an architecture, ``pkg:amd64``) at
    ``version``, saved by the client as ``filename`` with ``size`` bytes and this ``sha256``; ``licence`` is a
    short statement and ``licence_file`` the path inside the package of its licence text."""

    registry: Literal["pypi", "debian"]
    name: str
    version: str
    filename: str
    size: int
    sha256: str
    licence: str
    licence_file: str

    @property
    def requirement(self) -> str:
        """``name==version`` (pip) or ``name=version`` (apt)."""
        return f"{self.name}=={self.version}" if self.registry == "pypi" else f"{self.name}={self.version}"

    def command(self) -> list[str]:
        """The client command that downloads this file into the current directory, without dependencies."""
        if self.registry == "pypi":
            return [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--only-binary=:all:",
                    "--disable-pip-version-check", "--dest", ".", self.requirement]
        return ["apt-get", "download", "--quiet", self.requirement]

    def describe(self) -> str:
        """One line: registry, requirement, file and pinned sha256 (shortened)."""
        return f"{self.registry}:{self.requirement} ({self.filename}, {self.size:,} B, sha256 {self.sha256[:12]}...)"


def fetch(package: Package, cache_dir: str | None = None, timeout_s: float = FETCH_TIMEOUT_S) -> Path:
    """The cached, verified file of ``package``; downloads it first when the cache (``cache_dir``, default
    ``$NESTA_RAY_CACHE`` or ``~/.cache/nesta_ray``) lacks it.

    Raises PackageError when the client is missing, fails (offline, version gone), runs past ``timeout_s``, saves a
    different file, or the file's size or sha256 differs from the pin.
    """
    target = Path(cache_dir or default_cache_dir()) / "packages" / package.registry / package.filename
    if target.is_file():
        verify(package, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        _download(package, tmp, timeout_s)
        got = Path(tmp) / package.filename
        if not got.is_file():
            saved = sorted(p.name for p in Path(tmp).iterdir())
            raise PackageError(f"fetching {package.requirement} saved {saved or 'nothing'}, not {package.filename}")
        verify(package, got)
        os.replace(got, target)
    return target


def _download(package: Package, folder: str, timeout_s: float) -> None:
    """Run the client in ``folder``; PackageError with its last error line when it fails."""
    cmd = package.command()
    tool = "pip" if package.registry == "pypi" else "apt-get"
    where = _REGISTRY_NAMES[package.registry]
    if package.registry == "debian" and shutil.which("apt-get") is None:
        raise PackageError(f"{package.requirement} comes from {where} through apt-get, which this machine lacks")
    try:
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise PackageError(f"{tool} did not fetch {package.requirement} from {where} within {timeout_s:g} s") from None
    if proc.returncode != 0:
        raise PackageError(f"{tool} could not fetch {package.requirement} from {where} "
                           f"({_reason(proc.stderr, proc.returncode)})")


def _reason(stderr: str, code: int) -> str:
    """The client's last error line (pip: ``ERROR: ...``, apt: ``E: ...``), else its last line, else the code;
    preceded by why the registry was unreachable when the client said so."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("ERROR:", "E:"))]
    line = (errors or lines or [f"exit code {code}"])[-1].removeprefix("ERROR:").removeprefix("E:").strip()
    unreachable = _UNREACHABLE.search(stderr)
    return f"registry unreachable: {unreachable.group(0).strip()}; {line}" if unreachable else line


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify(package: Package, path: Path) -> None:
    """Raise PackageError when ``path``'s size or sha256 differs from the pin (a different or damaged file)."""
    size = path.stat().st_size
    digest = file_sha256(path) if size == package.size else ""
    if digest != package.sha256:
        found = f"sha256 {digest[:12]}..." if digest else f"{size:,} B"
        raise PackageError(f"{path} ({package.requirement}) has {found}, pinned {package.sha256[:12]}... and "
                           f"{package.size:,} B: not the pinned file; delete it to fetch it again")


def unpack_deb(path: Path, folder: Path) -> None:
    """Extract a Debian package's files into ``folder`` with ``dpkg -x``. Raises PackageError when dpkg is missing
    or fails."""
    if shutil.which("dpkg") is None:
        raise PackageError(f"unpacking {path.name} needs dpkg, which this machine lacks")
    proc = subprocess.run(["dpkg", "-x", str(path), str(folder)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise PackageError(f"dpkg -x {path.name} failed ({_reason(proc.stderr, proc.returncode)})")
