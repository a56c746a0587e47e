"""From a genome model's raw outputs to the outputs a job writes: strands, reductions, scores.

Track models (Enformer, Borzoi, gReLU and baskerville models, CREsted) predict an output of rank 3
per window, (N, bins, tracks). Written whole, a variant run of such a model would be gigabytes per
thousand variants, and flattened into parquet columns, millions of columns; so a worker turns
them into what the job asked for, per batch, before the writer sees them:

* ``reverse_complement: average`` reverses the reverse strand's bins before averaging (its bins
  run the other way along the genome); outputs of any other rank average as they are.
* ``model.reduce.OUTPUT`` (sum | mean | max | center over all bins or the K central ones) makes an
  (N, tracks) output ``OUTPUT`` (parquet columns ``OUTPUT_0`` ...); with ``keep: true`` the whole
  array stays in zarr as ``OUTPUT_bins``.
* variant mode: ``windows.variant_scores`` (sad, log2fc, maxabs) become (N, tracks) outputs
  ``sad_OUTPUT`` ...; ``ref_OUTPUT``, ``alt_OUTPUT`` and ``delta_OUTPUT`` are the reduction of ref
  and alt windows (and their difference) when the output is reduced.

A rank-3 output that is reduced or scored is not written whole unless ``keep: true``; one that is
neither is written whole (zarr only: the writer never flattens rank 3 into columns).
Per-track outputs may have up to ``windows.track_columns`` parquet columns (``column_limit``).
Strand-specific tracks are averaged as they are: a model whose tracks come in +/- pairs would need
the pairs swapped on the reverse strand, which this module does not know about.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from gpubatch.core.errors import GpubatchError
from gpubatch.ops.tracks import reduce_bins, strand_average, variant_scores
from gpubatch.spec import JobSpec, ReduceSpec

PAIR_PREFIXES = ("ref", "alt", "delta")
#: the suffix of a reduced output's whole (N, bins, tracks) array, kept with ``keep: true``
BINS_SUFFIX = "_bins"


@dataclass(frozen=True)
class TrackOutputs:
    """One genome job's rules for its outputs; ``windows`` and ``variants`` apply them to a batch."""

    reduce: dict[str, ReduceSpec]
    scores: tuple[str, ...] = ()
    pseudocount: float = 1.0
    average: bool = False
    tracks_last: bool = True
    columns: int = 1024
    pairs: bool = False  # variant mode: outputs come as ref_, alt_, delta_ and scores

    @classmethod
    def from_job(cls, job: JobSpec) -> TrackOutputs:
        w = job.windows
        assert w is not None
        return cls(dict(job.model.reduce), tuple(w.variant_scores), w.pseudocount,
                   w.reverse_complement == "average", job.model.track_layout == "NLT",
                   w.track_columns, bool(w.variants))

    def column_limit(self, name: str) -> int | None:
        """Parquet columns allowed for ``name`` when it is a per-track output, else None."""
        base: str | None = name
        if self.pairs:
            if any(name.startswith(s + "_") for s in self.scores):
                return self.columns
            base = next((name[len(p) + 1 :] for p in PAIR_PREFIXES if name.startswith(p + "_")), None)
        return self.columns if base is not None and self._rule(base) is not None else None

    def _rule(self, name: str) -> ReduceSpec | None:
        """The output's reduction, None when it has none (absent, or only ``keep``)."""
        rule = self.reduce.get(name)
        return rule if rule is not None and rule.how is not None else None

    def _keep_whole(self, name: str, reduced: bool, scored: bool) -> bool:
        rule = self.reduce.get(name)
        return (rule is not None and rule.keep) or not (reduced or scored)

    def _oriented(self, values: np.ndarray) -> np.ndarray:
        """Rank-3 outputs as (N, bins, tracks), strands averaged (bins flipped on the reverse)."""
        track = values.ndim == 3
        if track and not self.tracks_last:
            values = values.transpose(0, 2, 1)
        return strand_average(values, flip_bins=track) if self.average else values

    def _reduced(self, name: str, values: np.ndarray) -> np.ndarray | None:
        rule = self._rule(name)
        return None if rule is None else reduce_bins(values, str(rule.how), rule.bins)

    def _check(self, outputs: dict[str, np.ndarray]) -> None:
        """What preflight checks in an ONNX file, checked on the outputs of any backend."""
        for name in self.reduce:
            if name not in outputs:
                raise GpubatchError(f"model.reduce.{name}: the model has no output {name!r} "
                                    f"(it has {', '.join(outputs)})")
            if outputs[name].ndim != 3:
                raise GpubatchError(f"model.reduce.{name}: output {name!r} has shape "
                                    f"{outputs[name].shape[1:]} per item, not (bins, tracks)")

    def windows(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Window mode: one row per window."""
        self._check(outputs)
        out: dict[str, np.ndarray] = {}
        for name, raw in outputs.items():
            values = self._oriented(raw)
            reduced = self._reduced(name, values) if values.ndim == 3 else None
            if reduced is not None:
                out[name] = reduced
            if self._keep_whole(name, reduced is not None, scored=False):
                out[name + (BINS_SUFFIX if reduced is not None else "")] = values
        return out

    def variants(self, outputs: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
        """Variant mode: rows are [refs; alts] (each n long); one row per variant comes out."""
        self._check(outputs)
        out: dict[str, np.ndarray] = {}
        for name, raw in outputs.items():
            values = self._oriented(raw)
            ref, alt = values[:n], values[n : 2 * n]
            out |= _pair(name, ref, alt) if values.ndim != 3 else self._variant_tracks(name, ref, alt)
        return out

    def _variant_tracks(self, name: str, ref: np.ndarray, alt: np.ndarray) -> dict[str, np.ndarray]:
        out = {f"{s}_{name}": v for s, v in variant_scores(ref, alt, self.scores, self.pseudocount).items()}
        r_ref, r_alt = self._reduced(name, ref), self._reduced(name, alt)
        if r_ref is not None and r_alt is not None:
            out |= _pair(name, r_ref, r_alt)
        if self._keep_whole(name, r_ref is not None, scored=bool(self.scores)):
            suffix = BINS_SUFFIX if r_ref is not None else ""
            out |= {f"{k}{suffix}": v for k, v in _pair(name, ref, alt).items()}
        return out

    def describe(self) -> dict[str, Any]:
        """For the zarr attributes: how the written outputs were made."""
        return {"track_axes": "(N, bins, tracks)", "variant_scores": list(self.scores),
                "pseudocount": self.pseudocount, "reduce": {k: v.model_dump() for k, v in self.reduce.items()}}


def _pair(name: str, ref: np.ndarray, alt: np.ndarray) -> dict[str, np.ndarray]:
    return {f"ref_{name}": ref, f"alt_{name}": alt, f"delta_{name}": alt - ref}
