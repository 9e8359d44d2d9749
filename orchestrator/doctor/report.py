"""What a doctor check returns and how the CLI prints it: ``PASS|WARN|FAIL  name  explanation``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal["PASS", "WARN", "FAIL"]


@dataclass(frozen=True)
class Check:
    """One result: a status, a short name (``device``, ``loss at init``, ...) and a plain explanation
    that says what was measured and, for WARN/FAIL, what to change."""

    status: Status
    name: str
    message: str

    def line(self, width: int = 15) -> str:
        return f"{self.status:<5} {self.name:<{width}} {self.message}"


def summary(checks: list[Check], seconds: float) -> str:
    counts = {s: sum(c.status == s for c in checks) for s in ("PASS", "WARN", "FAIL")}
    verdict = "not ready: fix every FAIL before a long run" if counts["FAIL"] else "ready"
    return (f"{counts['PASS']} PASS, {counts['WARN']} WARN, {counts['FAIL']} FAIL in {seconds:.1f} s: {verdict}")


def exit_code(checks: list[Check]) -> int:
    """1 when any check FAILed, else 0 (spec errors exit 2 before any check runs)."""
    return 1 if any(c.status == "FAIL" for c in checks) else 0


def fmt_count(n: float) -> str:
    """1234567 -> '1.23M'; small numbers as they are."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"
