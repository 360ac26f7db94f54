"""What each stage moved: its target metric (trellis.stages) before and after, and whether it improved."""

from __future__ import annotations

from trellis.core.tables import number
from trellis.stages import STAGES, Target


def target_metric(kind: str | None) -> Target | None:
    """The held-out metric a stage kind targets (trellis.stages), or None."""
    return STAGES[kind].target if kind in STAGES else None


def higher_is_better(metric: str) -> bool | None:
    """A metric's direction from its name; None when the name does not say (e.g. a rejected reply's reward)."""
    name = metric.lower()
    if "rejected" in name or name.endswith(("_runtime", "_per_second")):
        return None
    if any(word in name for word in ("loss", "perplexity", "bits_per_byte")):
        return False
    if any(word in name for word in ("accura", "acc", "reward", "margin", "exact_match")):
        return True
    return None


def stage_metrics(record: dict) -> tuple[list[list[str]], dict | None]:
    """Rows (metric, before, after, change) of the held-out metrics recorded before and after training,
    and the target metric's verdict."""
    kind = record.get("stage")
    metrics = record.get("metrics", {})
    before, after = metrics.get("initial", {}), metrics.get("eval", {})
    rows, verdict = [], None
    target = target_metric(kind)
    for name in sorted(set(before) & set(after), key=lambda n: (target is None or n != target.metric, n)):
        higher = higher_is_better(name)
        if higher is None and "logps" not in name:  # counters and timings: not a measure of the model
            continue
        change = after[name] - before[name]
        better = None if higher is None or change == 0 else (change > 0) == higher
        mark = "" if better is None else (" ▲" if better else " ▼")
        rows.append([name, number(before[name]), number(after[name]), f"{change:+.4g}{mark}"])
        if target and name == target.metric:
            verdict = {"metric": name, "before": before[name], "after": after[name], "improved": bool(better)}
    return rows, verdict
