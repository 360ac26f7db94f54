"""Gates: minimum (or maximum) metric values a checkpoint must reach before it is published.

A gate is one line, `<metric> <op> <number>`, e.g. `gsm8k.exact_match,strict-match >= 0.3` or
`corpus.perplexity < 20`. Metric names are those of the results table: `<task>.<metric>` as
lm-eval names them (with `,<filter>` when the task has filters), `<label>.perplexity` and
`<label>.bits_per_byte` for perplexity sets.
"""

from __future__ import annotations

import difflib
import operator
import re
from dataclasses import dataclass

from trellis.core.errors import TrellisError

OPERATORS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq}
_GATE = re.compile(r"^\s*(\S+)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


class GateError(TrellisError):
    """A gate is malformed, names an unknown metric, or failed."""


@dataclass(frozen=True)
class Gate:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"

    def passes(self, value: float) -> bool:
        return OPERATORS[self.op](value, self.threshold)


def parse_gate(text: str) -> Gate:
    match = _GATE.match(text)
    if match is None:
        raise GateError(
            f"gate {text!r}: expected '<metric> <op> <number>' with op one of {', '.join(OPERATORS)}, "
            "e.g. 'tiny_qa_form.acc >= 0.5'"
        )
    return Gate(match.group(1), match.group(2), float(match.group(3)))


def check_gates(gates: list[str], metrics: dict[str, float], checkpoint: str) -> list[str]:
    """Lines saying how each gate went; raises GateError naming every failed gate."""
    lines, failed = gate_results(gates, metrics, checkpoint)
    if failed:
        raise GateError(
            f"checkpoint {checkpoint!r} failed {len(failed)} gate(s): " + "; ".join(failed) + ". "
            "It should not be published; improve the model or, if the bar is wrong, edit 'gates' in the recipe."
        )
    return lines


def select_candidate(
    gates: list[str], per_checkpoint: dict[str, dict], names: list[str], metric: str
) -> tuple[str, dict[str, float]]:
    """Of the checkpoints `names`, the one with the best `metric` among those that pass every gate (when
    none does, among all: its gates then fail as a fixed candidate's would), ties to the first listed;
    and every listed checkpoint's value of `metric`."""
    values = {}
    for name in names:
        metrics = per_checkpoint[name]["metrics"]
        if metric not in metrics:
            raise GateError(
                f"select_by: no metric {metric!r} in the results of {name!r}; "
                f"available: {', '.join(sorted(metrics))}"
            )
        values[name] = metrics[metric]
    passing = [name for name in names if not gate_results(gates, per_checkpoint[name]["metrics"], name)[1]]
    higher = per_checkpoint[names[0]].get("higher_is_better", {}).get(metric, True)
    return max(passing or names, key=lambda name: values[name] if higher else -values[name]), values


def gate_results(gates: list[str], metrics: dict[str, float], checkpoint: str) -> tuple[list[str], list[str]]:
    """(a line per gate saying how it went, the failed ones); raises GateError for an unknown metric."""
    lines, failed = [], []
    for gate in map(parse_gate, gates):
        if gate.metric not in metrics:
            close = difflib.get_close_matches(gate.metric, list(metrics), n=3, cutoff=0.5)
            hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
            raise GateError(
                f"gate '{gate}': no metric {gate.metric!r} in the results of {checkpoint!r}{hint}; "
                f"available: {', '.join(sorted(metrics))}"
            )
        value = metrics[gate.metric]
        ok = gate.passes(value)
        lines.append(f"{'pass' if ok else 'FAIL'} {gate} ({checkpoint}: {value:.4g})")
        if not ok:
            failed.append(f"{gate.metric} = {value:.4g}, required {gate.op} {gate.threshold:g}")
    return lines, failed
