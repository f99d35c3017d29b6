"""CLI: ``python -m nesta_ray.compress --config FILE [--set k=v ...] [--dry-run] [--rates FILE] [--export-dense]``

Only argument handling lives here; every ``NestaError`` becomes one line on stderr and exit code 2; a run that
fails its quality gate is kept but not published, and exits with code 3.
"""

from __future__ import annotations

import argparse
import sys

from nesta_ray.config.loading import load_config
from nesta_ray.errors import NestaError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nesta_ray.compress", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML job config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set method.ratio=0.3 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--export-dense", action="store_true", help="also write a plain HF folder under dense/")
    parser.add_argument("--rates", metavar="FILE", help="a rates file for the time estimate (runtime.rates)")
    args = parser.parse_args(argv)
    overrides = args.set + (["output.export_dense=true"] if args.export_dense else []) + (
        [f"runtime.rates={args.rates}"] if args.rates else [])
    try:
        cfg = load_config(args.config, overrides)
        if args.dry_run:
            from nesta_ray.pipeline.dry_run import dry_run

            print(dry_run(cfg))
            return 0
        from nesta_ray.pipeline.job import run_job
        from nesta_ray.report.markdown import run_markdown

        report = run_job(cfg)
    except NestaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(run_markdown(report))
    print(f"checkpoint: {report['run_uri']}")
    if not report["published"]:
        print(f"gate {report['gate_summary']}: the run is kept at {report['run_uri']}, latest was not moved",
              file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
