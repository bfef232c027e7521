"""A Markdown table of proportions with 95% Wilson intervals, for the bench scripts that split a
model's recorded results into groups (``tb_box.py``, ``split_twins.py``)."""

from __future__ import annotations

from medlens.evaluation.paired import wilson


def print_rates(groups: dict[str, list[bool]], what: str, rate: str) -> None:
    """One row per group: its size, the share of True and that share's interval."""
    print(f"| {what} | n | {rate} | 95% CI |")
    print("|---|---|---|---|")
    for name, hits in groups.items():
        k, n = sum(hits), len(hits)
        lo, hi = wilson(k, n)
        print(f"| {name} | {n} | {k / n if n else float('nan'):.3f} | {lo:.3f} - {hi:.3f} |")
