"""The quality gate: a compressed run is published only when it passes.

Two kinds of check, both against limits the user writes down:

* perplexity: per evaluation set, the compressed perplexity may exceed the dense one by at most a relative
  ``max_increase`` (0.10 = +10%); a set with non-finite windows fails.
* critical cases: prompts whose greedy continuation must contain an expected substring (``expect``) or start with
  an expected text (``continuation``), read from a JSON-lines file, one case per line.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from nesta_ray.data.text import read_file, utf8
from nesta_ray.errors import DataError
from nesta_ray.ops.evaluation import NextToken, generate


@dataclass(frozen=True)
class Case:
    """A critical prompt; exactly one of ``expect`` (substring) or ``continuation`` (prefix) is set."""

    name: str
    prompt: str
    expect: str | None = None
    continuation: str | None = None


@dataclass(frozen=True)
class Failure:
    """One failed check: ``kind`` "perplexity" or "case", what failed and by how much."""

    kind: str
    name: str
    detail: str
    value: float | None = None
    limit: float | None = None


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: list[Failure] = field(default_factory=list)
    checks: int = 0
    outputs: dict[str, str] = field(default_factory=dict)  # case name -> greedy continuation

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line: "passed (5 checks)" or "failed: <first failure>; (+N more)"."""
        if self.passed:
            return f"passed ({self.checks} checks)"
        more = f" (+{len(self.failures) - 1} more)" if len(self.failures) > 1 else ""
        f = self.failures[0]
        return f"failed: {f.kind} {f.name}: {f.detail}{more}"


def parse_cases(text: str, source: str) -> list[Case]:
    """Cases from JSON lines ``{"prompt": ..., "expect": ...}`` or ``{"prompt": ..., "continuation": ...}`` with an
    optional ``"name"``. Blank lines are skipped. Raises DataError naming the line for anything else: the gate
    must not silently check less than the user wrote."""
    cases: list[Case] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {number}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: not JSON ({err.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
            raise DataError(f'{where}: a case needs a non-empty "prompt" string')
        unknown = set(obj) - {"name", "prompt", "expect", "continuation"}
        if unknown:
            raise DataError(f"{where}: unknown keys {sorted(unknown)}; a case has name, prompt, expect or continuation")
        kinds = [k for k in ("expect", "continuation") if k in obj]
        if len(kinds) != 1 or not isinstance(obj[kinds[0]], str) or not obj[kinds[0]]:
            raise DataError(f'{where}: give exactly one of "expect" (a substring) or "continuation" (a prefix), '
                            "as a non-empty string")
        cases.append(Case(str(obj.get("name", f"case{len(cases) + 1}")), obj["prompt"], obj.get("expect"),
                          obj.get("continuation")))
    if not cases:
        raise DataError(f"{source}: no critical cases in the file")
    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise DataError(f"{source}: case names must be unique, {sorted({n for n in names if names.count(n) > 1})} "
                        f"repeat")
    return cases


def read_cases(uri: str, storage_options: dict | None = None) -> list[Case]:
    """Cases from a JSON-lines file (local path or fsspec URI). Raises DataError for a missing, unreadable or binary
    file or a malformed case; StorageError for storage faults."""
    return parse_cases(utf8(read_file(uri, storage_options, "critical cases file"), uri), uri)


def run_cases(next_token: NextToken, tokenizer: Any, cases: list[Case], max_new_tokens: int) -> dict[str, str]:
    """Greedy continuation of every case's prompt, by case name."""
    return {c.name: generate(next_token, tokenizer, c.prompt, max_new_tokens) for c in cases}


def check_gate(perplexity: dict[str, dict], max_increase: dict[str, float], cases: list[Case],
               outputs: dict[str, str]) -> GateResult:
    """Apply the limits. ``perplexity`` maps set -> {"dense": {...}, "compressed": {...}} as the run report holds
    it (each with "perplexity" and "nonfinite_windows"); ``outputs`` the greedy continuation per case name.
    Raises DataError when a limit names a set that was not evaluated (with its dense baseline)."""
    failures: list[Failure] = []
    for name, limit in max_increase.items():
        entry = perplexity.get(name) or {}
        dense, comp = entry.get("dense"), entry.get("compressed")
        if dense is None or comp is None:
            raise DataError(f"gate.max_increase.{name}: no dense and compressed perplexity for set {name!r}; "
                            f"evaluated sets: {sorted(perplexity)}")
        increase = comp["perplexity"] / dense["perplexity"] - 1.0
        if comp["nonfinite_windows"] or not math.isfinite(increase):
            failures.append(Failure("perplexity", name, f"{comp['nonfinite_windows']} non-finite windows "
                                    f"(perplexity {comp['perplexity']})", increase, limit))
        elif increase > limit:
            failures.append(Failure("perplexity", name, f"+{increase:.1%} over dense ({dense['perplexity']:.2f} -> "
                                    f"{comp['perplexity']:.2f}), limit +{limit:.1%}", increase, limit))
    for case in cases:
        text = outputs[case.name]
        if case.expect is not None and case.expect not in text:
            failures.append(Failure("case", case.name, f"{case.expect!r} not in the continuation {text!r}"))
        if case.continuation is not None and not text.lstrip().startswith(case.continuation.lstrip()):
            agree = _common_prefix(text.lstrip(), case.continuation.lstrip())
            failures.append(Failure("case", case.name, f"continuation {text!r} matches {agree} of "
                                    f"{len(case.continuation.lstrip())} expected characters",
                                    float(agree), float(len(case.continuation.lstrip()))))
    return GateResult(not failures, failures, len(max_increase) + len(cases), dict(outputs))


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
