"""CLI: ``python -m nesta_ray.nightly --config FILE [--set key=value ...]``: one night of drift-driven recompression.

Only argument handling lives here (the night is ``pipeline.nightly.run_night``); exit code 0 for a skip or a
published run, 3 when the new run failed its gate (nothing published), 2 for any error.
"""

from __future__ import annotations

import argparse
import json
import sys

from nesta_ray.config.loading import load_config
from nesta_ray.errors import NestaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nesta_ray.nightly", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML job config with a nightly section (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--dry-run", action="store_true", help="print what a night costs, phase by phase, and exit")
    parser.add_argument("--rates", metavar="FILE", help="a rates file for the time estimate (runtime.rates)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set + ([f"runtime.rates={args.rates}"] if args.rates else []))
        if args.dry_run:
            from nesta_ray.pipeline.dry_run import night_dry_run

            print(night_dry_run(cfg))
            return 0
        from nesta_ray.pipeline.nightly import run_night

        record = run_night(cfg)
    except NestaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2, sort_keys=True))
    print(f"night: {record['decision']} ({record['reason']})", file=sys.stderr)
    return 3 if record.get("published") is False else 0


if __name__ == "__main__":
    sys.exit(main())
