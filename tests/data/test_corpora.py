"""Registry texts: each recipe reproduces the shared corpus file byte for byte, the cache is checked on every read,
the licence travels with the text into the run report, and failures are one line naming the local-file
alternative."""

import hashlib
import shutil
from pathlib import Path

import pytest

from nesta_ray.config.schema import EvalSet
from nesta_ray.data.corpora import BY_NAME, registry_text
from nesta_ray.data.text import read_text
from nesta_ray.data.windows import TextCache
from nesta_ray.errors import DataError

from paths import SHARED

WIKI = BY_NAME["en_wikipedia"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_the_pins_are_the_shared_files(name):
    shared = SHARED / f"{name}.txt"
    if not shared.is_file():
        pytest.skip(f"no {shared} to compare the pin with")
    data = shared.read_bytes()
    assert (len(data), _sha256(data)) == (BY_NAME[name].size, BY_NAME[name].sha256)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if c.tools else n
                                  for n, c in sorted(BY_NAME.items())])
def test_each_recipe_extracts_the_pinned_bytes_with_its_licence(name):
    """Into the default cache: extracted on a machine's first run (the man pages ~20 s, marked slow), read back
    after."""
    corpus = BY_NAME[name]
    tools = ("apt-get", "dpkg", *corpus.tools) if corpus.packages[0].registry == "debian" else ()
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{name} comes from a Debian package and needs {', '.join(missing)}")
    cached = registry_text(corpus.uri)
    data = cached.path.read_bytes()
    assert (len(data), _sha256(data)) == (corpus.size, corpus.sha256)
    shared = SHARED / f"{name}.txt"
    if shared.is_file():
        assert data == shared.read_bytes()
    notice = cached.notice.read_text()
    assert corpus.uri in notice and corpus.licence in notice and corpus.sha256 in notice
    for package in corpus.packages:
        assert f"==== {package.requirement}: {package.licence}; {package.licence_file} ====" in notice


def test_the_text_names_its_source_and_licence_in_the_report(smollm_folder):
    from transformers import AutoTokenizer

    text = read_text(WIKI.uri)
    assert text.text.encode() == registry_text(WIKI.uri).path.read_bytes()
    assert text.source["licence"].startswith("Wikipedia passages CC BY-SA 3.0 and GFDL")
    texts = TextCache(AutoTokenizer.from_pretrained(smollm_folder))
    windows = texts.windows(EvalSet(name="wiki", path=WIKI.uri), 512)
    assert windows.shape[1] == 512 and windows.shape[0] > 300
    source = texts.report()["text_sources"][WIKI.uri]
    assert source["sha256"] == WIKI.sha256 and source["packages"][0].startswith("pypi:evals==3.0.1.post1 (")
    assert "MIT License" in Path(source["notice"]).read_text()


def test_a_damaged_cached_text_is_refused(tmp_path):
    folder = tmp_path / "corpora" / f"en_wikipedia-{WIKI.sha256[:12]}"
    folder.mkdir(parents=True)
    (folder / "en_wikipedia.txt").write_bytes(b"not the text\n")
    with pytest.raises(DataError, match=r"the cached .*en_wikipedia.txt has 13 B, .*delete its folder"):
        registry_text(WIKI.uri, str(tmp_path))


def test_offline_is_one_line_that_names_the_local_file_alternative(tmp_path, offline_pip):
    offline_pip()
    with pytest.raises(DataError) as err:
        registry_text(WIKI.uri, str(tmp_path))
    message = str(err.value)
    assert message.startswith("pypi:evals==3.0.1.post1/en_wikipedia: pip could not fetch evals==3.0.1.post1 from "
                              "PyPI (registry unreachable")
    assert message.endswith("use a local .txt file instead (calibration.path, evaluation.sets[].path)")
    assert "\n" not in message and not (tmp_path / "corpora").exists()


def test_an_unknown_registry_text_lists_the_known_ones():
    with pytest.raises(DataError, match=r"unknown registry text 'pypi:evals==3.0.1.post1/en_web'; known: "
                                         r"pypi:evals==3.0.1.post1/en_web_c4_owt, "):
        read_text("pypi:evals==3.0.1.post1/en_web")
