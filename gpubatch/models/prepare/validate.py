"""The validation gate: a reduced-precision model against its fp32 original on held-out items.

Speed never ships a silently worse answer (docs/spec.md, `model.validation`). Before any shard runs, the
reduced model and the fp32 model see the same validation items (drawn from the job's own inputs,
disjoint from the calibration items) and are compared:

* classifiers: top-1 agreement (the fraction of items whose arg-max class is unchanged), plus the
  largest probability change;
* regressors: relative error (mean |a - b| / mean |a|) and Pearson correlation; the correlation is
  the figure held against ``min_agreement``, being scale-free and in [-1, 1] like an agreement.

Task ``auto`` calls a model a classifier when its first output has a last dimension > 1 whose rows
sum to about 1 (probabilities); logits need ``task: classifier`` in the spec.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpubatch.core.plural import plural
from gpubatch.models.base import Model

PROB_SUM_TOLERANCE = 1e-3


def run_batches(model: Model, x: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
    """All of ``x`` through ``model`` in batches; outputs concatenated along the batch axis."""
    parts: dict[str, list[np.ndarray]] = {}
    for i in range(0, len(x), max(1, batch_size)):
        for name, value in model.run(x[i : i + batch_size]).items():
            parts.setdefault(name, []).append(np.asarray(value))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def is_probabilities(y: np.ndarray) -> bool:
    """Rows of non-negative numbers summing to 1 along the last axis (a softmax output)."""
    if y.ndim < 2 or y.shape[-1] < 2 or y.size == 0:
        return False
    y = y.astype(np.float64)
    return bool(np.all(y >= -PROB_SUM_TOLERANCE) and np.allclose(y.sum(-1), 1.0, atol=PROB_SUM_TOLERANCE * 10))


def detect_task(reference: dict[str, np.ndarray], task: str = "auto") -> str:
    """``classifier`` or ``regressor``: the spec's word, else judged from the fp32 outputs."""
    if task != "auto":
        return task
    first = next(iter(reference.values()))
    return "classifier" if is_probabilities(first) else "regressor"


def classifier_figures(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    ref2, test2 = ref.reshape(-1, ref.shape[-1]), test.reshape(-1, test.shape[-1])
    agree = float(np.mean(ref2.argmax(-1) == test2.argmax(-1))) if len(ref2) else 1.0
    return {"top1_agreement": agree, "max_abs_diff": float(np.max(np.abs(ref2 - test2), initial=0.0))}


def regressor_figures(ref: np.ndarray, test: np.ndarray) -> dict[str, float]:
    a, b = ref.astype(np.float64).ravel(), test.astype(np.float64).ravel()
    rel = float(np.mean(np.abs(a - b)) / max(float(np.mean(np.abs(a))), 1e-12))
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        pearson = 1.0 if np.allclose(a, b, rtol=1e-3, atol=1e-6) else 0.0
    else:
        pearson = float(np.corrcoef(a, b)[0, 1])
    return {"relative_error": rel, "pearson": pearson, "max_abs_diff": float(np.max(np.abs(a - b), initial=0.0))}


def compare_outputs(ref: dict[str, np.ndarray], test: dict[str, np.ndarray], task: str) -> dict[str, Any]:
    """Figures per output, and the overall ``agreement``: the worst output's gated figure."""
    per_output: dict[str, dict[str, float]] = {}
    for name, r in ref.items():
        t = test[name] if name in test else test[list(test)[list(ref).index(name)]]
        if task == "classifier" and r.ndim >= 2 and r.shape[-1] > 1:
            per_output[name] = classifier_figures(r, t)
        else:
            per_output[name] = regressor_figures(r, t)
    gated = [f.get("top1_agreement", f.get("pearson", 0.0)) for f in per_output.values()]
    return {"task": task, "agreement": float(min(gated)) if gated else 1.0, "outputs": per_output}


@dataclass
class GateResult:
    """The gate's verdict and the figures behind it (they go into report.json and audit.jsonl)."""

    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)

    def message(self) -> str:
        f = self.figures
        metric = "top-1 agreement" if f.get("task") == "classifier" else "Pearson correlation"
        lines = [f"validation gate: {f.get('precision')} {metric} with fp32 is {f.get('agreement', 0):.4f} "
                 f"on {f.get('items')} {plural(f.get('items'), 'held-out item')}, below min_agreement {f.get('min_agreement')}"]
        for name, figs in f.get("outputs", {}).items():
            lines.append(f"  {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in figs.items()))
        lines.append("  set model.validation.on_fail: fp32 to run in fp32 instead, or use fp32 / more "
                     "calibration.items")
        return "\n".join(lines)


def gate(reference: Model, reduced: Model, x: np.ndarray, *, precision: str, min_agreement: float,
         task: str = "auto", batch_size: int = 32) -> GateResult:
    """Run both models on ``x`` and hold the agreement against ``min_agreement``."""
    t0 = time.perf_counter()
    ref = run_batches(reference, x, batch_size)
    t1 = time.perf_counter()
    test = run_batches(reduced, x, batch_size)
    t2 = time.perf_counter()
    figures = compare_outputs(ref, test, detect_task(ref, task))
    figures.update({"precision": precision, "items": len(x), "min_agreement": min_agreement,
                    "fp32_items_per_s": len(x) / max(t1 - t0, 1e-9),
                    "reduced_items_per_s": len(x) / max(t2 - t1, 1e-9)})
    return GateResult(figures["agreement"] >= min_agreement, figures)


def top_probability(outputs: dict[str, np.ndarray]) -> np.ndarray | None:
    """Each item's top class probability from the first 2-D output with > 1 column, else None.

    Rows that are not already probabilities (logits) go through a softmax first, so the threshold
    means the same thing for either kind of classifier head.
    """
    for value in outputs.values():
        y = np.asarray(value)
        if y.ndim == 2 and y.shape[1] > 1:
            y = y.astype(np.float64)
            if not (np.all(y >= 0) and np.allclose(y.sum(1), 1.0, atol=1e-2)):
                e = np.exp(y - y.max(1, keepdims=True))
                y = e / e.sum(1, keepdims=True)
            return y.max(1)
    return None
