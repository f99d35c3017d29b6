"""CLI: ``python -m nesta_ray.compress --config FILE [--set k=v ...] [--dry-run] [--rates FILE] [--export-dense]``

Only argument handling lives here; every ``NestaError`` becomes one line on stderr and exit code 2 (``cli``); a run
that fails its quality gate is kept but not published, and exits with code 3. What it prints is redacted (URI
userinfo, storage_options values, secrets in the environment).
"""

from __future__ import annotations

import sys

from nesta_ray.cli import Parser, emit, fail
from nesta_ray.config.loading import load_config


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m nesta_ray.compress", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML job config (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set method.ratio=0.3 (repeatable)")
    parser.add_argument("--dry-run", action="store_true", help="check what the job reads and writes, print the plan "
                        "and exit")
    parser.add_argument("--export-dense", action="store_true", help="also write a plain HF folder under dense/")
    parser.add_argument("--rates", metavar="FILE", help="a rates file for the time estimate (runtime.rates)")
    args = parser.parse_args(argv)
    overrides = args.set + (["output.export_dense=true"] if args.export_dense else []) + (
        [f"runtime.rates={args.rates}"] if args.rates else [])
    secrets: set[str] = set()
    try:
        cfg = load_config(args.config, overrides, secrets)
        from nesta_ray.io.sources import quiet_loading

        quiet_loading()
        if args.dry_run:
            from nesta_ray.pipeline.dry_run import dry_run

            emit(dry_run(cfg), secrets)
            return 0
        from nesta_ray.pipeline.job import run_job
        from nesta_ray.report.markdown import run_markdown

        report = run_job(cfg)
    except Exception as err:  # noqa: BLE001 - every failure is one line (cli.fail)
        return fail(err, secrets)
    for warning in report.get("warnings", []):
        emit(f"warning: {warning}", secrets, err=True)
    emit(run_markdown(report), secrets)
    emit(f"checkpoint: {report['run_uri']}", secrets)
    if not report["published"]:
        emit(f"gate {report['gate_summary']}: the run is kept at {report['run_uri']}, latest was not moved", secrets,
             err=True)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
