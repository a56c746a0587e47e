"""Figures in words, as the verdict, the terminal summary, report.html and status say them: a
share in percent, milliseconds, the starvation band, the workers' cores."""

from __future__ import annotations

from typing import Any

BAND_LOW, BAND_HIGH = 0.05, 0.20
#: verdict["band"] where there is no verdict: a band is a judgement of the model's starvation,
#: and an empty run's model (starved, never busy) read "100% input-bound"
BAND_NOT_MEASURED, BAND_NOT_JUDGED = "not measured: the model ran no batch", "too little work to judge"


def pct(share: float) -> str:
    """A share in percent, never rounded to 0% or 100% when it is neither: whole percents in
    between, one decimal under 10% and over 99% (a 4.6% starvation read "5%", the band's edge,
    and a data path costing 0.4% of the model's speed "0%")."""
    if share <= 0 or share >= 1:
        return f"{max(0.0, min(share, 1.0)):.0%}"
    if 0.1 <= share <= 0.99:
        return f"{share:.0%}"
    text = f"{share:.1%}"
    return "<0.1%" if text == "0.0%" else ">99.9%" if text == "100.0%" else text


def ms_words(ms: float) -> str:
    """Milliseconds in three figures, whole ones from a second up: a 3.7 s p99 read "3.67e+03 ms"."""
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def starvation_words(starvation: float, v: dict[str, Any]) -> tuple[str, str]:
    """(the starvation as shown, its band as said): a dash where no batch was measured."""
    shown = "–" if v.get("band") == BAND_NOT_MEASURED else f"{starvation:.1%}"
    return shown, str(v.get("band", ""))


def band(starvation: float) -> str:
    """The TensorFlow profiler's band for a starvation fraction."""
    if starvation < BAND_LOW:
        return "not input-bound"
    if starvation < BAND_HIGH:
        return "moderately input-bound"
    return "input-bound"


def cores_sentence(cpu: dict[str, Any]) -> str:
    """The report's ``host_cpu`` in words, as the verdict's evidence and the terminal say it."""
    cores = cpu.get("cores")
    counted = f"{cores:g} cores" if cores else "cores"
    return f"the workers' {counted}{quota_words(cpu)} were {pct(cpu['busy'])} busy while shards ran"


def quota_words(cpu: dict[str, Any]) -> str:
    """" (a CPU quota, throttled in X% of its periods)" where a quota limited the workers, else ""."""
    return f" (a CPU quota, throttled in {pct(cpu.get('throttled', 0.0))} of its periods)" if cpu.get("quota") else ""
