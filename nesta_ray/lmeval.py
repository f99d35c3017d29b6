"""CLI: ``python -m nesta_ray.lmeval [lm-eval arguments]``: lm-evaluation-harness's own command line with the
``nesta`` model registered, e.g. ``--model nesta --model_args pretrained=out/smollm2-135m --tasks ... --include_path
DIR``. Arguments are the harness's (``lm-eval --help``); a NestaError while loading, and the harness refusing its
input (an unknown task, a missing file: the ValueError, KeyError or FileNotFoundError it raises), become one line
(redacted) and exit 2.
"""

from __future__ import annotations

import sys

from nesta_ray.cli import fail
from nesta_ray.errors import ConfigError, NestaError


def main() -> int:
    """Run the harness's command line (it reads sys.argv) with the ``nesta`` model registered."""
    try:
        from lm_eval.__main__ import cli_evaluate

        import nesta_ray.ops.lmeval  # noqa: F401 - registers the model
    except ImportError as err:
        print(f"error: lm-evaluation-harness is not installed ({err}): pip install 'nesta_ray[lmeval]'",
              file=sys.stderr)
        return 2
    try:
        cli_evaluate()
    except NestaError as err:
        return fail(err)
    except (ValueError, KeyError, FileNotFoundError) as err:  # the harness refusing its arguments or files
        return fail(ConfigError(f"lm-evaluation-harness stopped: {type(err).__name__}: {err} (its arguments: "
                                "lm-eval --help; its tasks: lm-eval ls tasks)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
