"""Save the plots embedded in a self-contained HTML report (a run's report.html or a night's page) as PNG files.

    python scripts/export_report_plots.py out/smollm2-135m/runs/<run id>/report.html results/operations/run

writes ``<prefix>-1.png``, ``<prefix>-2.png``, ... (in page order, named after each image's alt text) and prints
the paths. Accepts a local path or an fsspec URI.
"""

from __future__ import annotations

import argparse
import base64
import re
import sys
from pathlib import Path

from nesta_ray.io.storage import read_bytes

IMG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"')  # as html_report writes it


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html", help="report.html (path or URI)")
    p.add_argument("prefix", help="output path prefix, e.g. results/operations/run")
    args = p.parse_args(argv)
    page = read_bytes(args.html).decode("utf-8")
    images = IMG.findall(page)
    if not images:
        print(f"no embedded PNG in {args.html}", file=sys.stderr)
        return 1
    Path(args.prefix).parent.mkdir(parents=True, exist_ok=True)
    for i, (alt, data) in enumerate(images, 1):
        slug = re.sub(r"[^a-z0-9]+", "-", alt.lower()).strip("-") or "plot"
        out = Path(f"{args.prefix}-{i}-{slug}.png")
        out.write_bytes(base64.b64decode(data))
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
