"""Where tests find the repository and the text corpora.

``corpus(name)`` is the one place tests get text from: ``../shared/corpora/<name>.txt`` beside the checkout when
it is there (our machines and CI), else the same bytes from the registry text of that name
(``nesta_ray.data.corpora``: fetched and extracted once into the nesta_ray cache). A text that can be had neither
way skips the test that asked for it, saying why. ``C4`` (the en_web_c4_owt file) is resolved when a test module
imports it.
"""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "corpora"


def corpus(name: str) -> str:
    """Path of the text file ``name`` (e.g. "en_wikipedia"): the shared copy, else the registry text's cached
    file. Skips the calling test (or module, at import) when neither is available."""
    shared = SHARED / f"{name}.txt"
    if shared.is_file():
        return str(shared)
    from nesta_ray.data.corpora import BY_NAME, registry_text
    from nesta_ray.errors import DataError

    try:
        return str(registry_text(BY_NAME[name].uri).path)
    except DataError as err:
        pytest.skip(f"text {name}: no {shared} and {err}", allow_module_level=True)


def __getattr__(attr: str) -> str:
    if attr == "C4":  # resolved when a test module imports it, not when paths is imported for REPO
        return corpus("en_web_c4_owt")
    raise AttributeError(attr)
