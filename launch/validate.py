"""The memory fit check that `dtrain check` and `dtrain submit` add to dtrain.preflight when the hardware is known."""

from __future__ import annotations

from dtrain.config import Config
from dtrain.layout import BatchLayout
from dtrain.plan.hardware import Hardware


def fit_report(cfg: Config, layout: BatchLayout, hardware: Hardware | None) -> list[str]:
    """["fits"] or ["does NOT fit", problem, ...]; [] when the hardware is not known."""
    if hardware is None:
        return []
    from dtrain.plan.report import fit_problems

    problems = fit_problems(cfg, layout, hardware)
    return ["fits"] if not problems else ["does NOT fit", *problems]
