"""Request logs for tests: days of JSON-lines traffic made from the offline corpora, written to moto's S3."""

from __future__ import annotations

import json
from pathlib import Path

from paths import corpus


def upload_day(opts: dict, prefix: str, name: str, name_of_text: str, start: int,
               chars: int = 60_000) -> None:
    """One day of request logs (the paragraphs of the text ``name_of_text``, e.g. "ja_manpages" in the three request shapes, plus one malformed line)
    written to ``s3://<prefix>/<name>.jsonl``."""
    import s3fs

    text = Path(corpus(name_of_text)).read_text(encoding="utf-8")[start : start + chars]
    paragraphs = [p.strip() for p in text.split("\n") if len(p.strip()) > 40]
    lines = []
    for i, para in enumerate(paragraphs):
        shape = i % 3
        rec = ({"text": para} if shape == 0 else {"prompt": para[: len(para) // 2],
                                                  "completion": para[len(para) // 2 :]}
               if shape == 1 else {"messages": [{"role": "user", "content": para}]})
        lines.append(json.dumps(rec, ensure_ascii=False))
    lines.append("{not json")  # a malformed line is counted, not fatal
    s3fs.S3FileSystem(**opts).pipe(f"{prefix}/{name}.jsonl", ("\n".join(lines) + "\n").encode())
