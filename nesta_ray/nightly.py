"""CLI: ``python -m nesta_ray.nightly --config FILE [--set key=value ...]``: one night of drift-driven recompression.

Only argument handling lives here (the night is ``pipeline.nightly.run_night``); exit code 0 for a skip or a
published run, 3 when the new run failed its gate (nothing published), 2 for any error (one line, ``cli``). What it
prints is redacted (URI userinfo, storage_options values, secrets in the environment).
"""

from __future__ import annotations

import json
import sys

from nesta_ray.cli import Parser, emit, fail
from nesta_ray.config.loading import load_config
from nesta_ray.redaction import redact_obj


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m nesta_ray.nightly", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML job config with a nightly section (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--dry-run", action="store_true", help="check what a night reads and writes, print what it "
                        "costs, phase by phase, and exit")
    parser.add_argument("--rates", metavar="FILE", help="a rates file for the time estimate (runtime.rates)")
    args = parser.parse_args(argv)
    secrets: set[str] = set()
    try:
        overrides = args.set + ([f"runtime.rates={args.rates}"] if args.rates else [])
        cfg = load_config(args.config, overrides, secrets)
        from nesta_ray.io.sources import quiet_loading

        quiet_loading()
        if args.dry_run:
            from nesta_ray.pipeline.dry_run import night_dry_run

            emit(night_dry_run(cfg), secrets)
            return 0
        from nesta_ray.pipeline.nightly import run_night

        record = run_night(cfg)
    except Exception as err:  # noqa: BLE001 - every failure is one line (cli.fail)
        return fail(err, secrets)
    emit(json.dumps(redact_obj(record), indent=2, sort_keys=True), secrets)
    emit(f"night: {record['decision']} ({record['reason']})", secrets, err=True)
    return 3 if record.get("published") is False else 0


if __name__ == "__main__":
    sys.exit(main())
