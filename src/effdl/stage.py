"""What one stage of ``effdl demo`` hands back, below both ``effdl.demo`` and the stage modules that it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StageReport:
    title: str
    headline: str  # one line for the demo's summary table
    rows: list[tuple[str, str]]  # (metric, value) pairs for the summary table
    markdown: str  # the stage's section of report.md
    images: list[Path] = field(default_factory=list)
    # The numbers behind the headline's claims, by name (e.g. "fpdt_peak_mib"), so tests check the relations.
    metrics: dict[str, float] = field(default_factory=dict)
