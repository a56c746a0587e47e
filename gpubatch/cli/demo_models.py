"""Tiny ONNX sequence models for the demo and the tests, exported from torch.

Why these: ``make_genome_model`` is a realistic shape (conv1d, pooling, linear head) for exercising
the pipeline and its timings; ``make_identity_onehot_model`` is an oracle whose output is the base
count of each window (the one-hot input summed over length), so a test can check every
prediction against the true bases and catch any mix-up of windows, strands or ref/alt order;
``make_bin_fraction_model`` is the same oracle for track models: per bin, the fraction of each
base (or fixed integer mixtures of them), an (N, bins, tracks) output whose every reduction and
variant score can be computed from the sequence alone.

Both take one-hot input (N, L, 4) for layout NLC or (N, 4, L) for NCL; batch and length are dynamic.
torch is only needed to *make* the files (``pip install 'gpubatch[torch]'``).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from gpubatch.core.errors import MissingExtraError

INPUT_NAME = "sequence"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingExtraError("making the demo genome models", "torch", "torch") from None
    return torch


def _export(module: Any, path: str | Path, length: int, layout: str, output: str,
            output_axes: dict[int, str] | None = None) -> Path:
    """Export with dynamic batch and length axes via the TorchScript exporter.

    ``length`` only shapes the example input: the graph accepts any window length, so one demo
    model serves jobs with different ``windows.length``.

    The TorchScript exporter (``dynamo=False``) needs no onnxscript and takes a fraction of a
    second for these tiny graphs; the dynamo exporter would add seconds to every test session.
    """
    torch = _torch()
    if layout not in ("NLC", "NCL"):
        raise ValueError(f"layout must be 'NLC' or 'NCL', got {layout!r}")
    shape = (2, length, 4) if layout == "NLC" else (2, 4, length)
    axis = 1 if layout == "NLC" else 2
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deliberate
        torch.onnx.export(
            module, (torch.zeros(shape),), str(out), input_names=[INPUT_NAME], output_names=[output],
            dynamic_axes={INPUT_NAME: {0: "batch", axis: "length"}, output: {0: "batch", **(output_axes or {})}},
            opset_version=17,
            dynamo=False,
        )
    return out


def make_genome_model(path: str | Path, length: int, layout: str = "NLC", n_outputs: int = 3) -> Path:
    """A small conv1d -> ReLU -> mean-pool -> linear net; output "scores" (N, n_outputs).

    Weights are seeded, so the same arguments always give the same model.
    """
    torch = _torch()
    nn = torch.nn

    class SeqNet(nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(4, 16, kernel_size=min(9, length), padding="same")
            self.head = nn.Linear(16, n_outputs)

        def forward(self, x: Any) -> Any:
            if layout == "NLC":
                x = x.transpose(1, 2)
            h = torch.relu(self.conv(x)).mean(dim=2)
            return self.head(h)

    torch.manual_seed(0)
    return _export(SeqNet(), path, length, layout, "scores")


def make_identity_onehot_model(path: str | Path, length: int, layout: str = "NLC") -> Path:
    """Oracle model: output "counts" (N, 4) = one-hot input summed over length (A, C, G, T counts).

    With ``n_value: 0`` an N contributes nothing, so counts equal the window's true base counts.
    """
    torch = _torch()

    class BaseCounts(torch.nn.Module):  # type: ignore[misc, name-defined]
        def forward(self, x: Any) -> Any:
            return x.sum(dim=1 if layout == "NLC" else 2)

    return _export(BaseCounts(), path, length, layout, "counts")


def make_bin_fraction_model(path: str | Path, length: int, bin_size: int, layout: str = "NLC",
                            mix: Any = None, crop: int = 0, tracks_last: bool = True) -> Path:
    """Oracle track model: output "tracks" (N, bins, T), per bin the fraction of A, C, G, T.

    ``mix`` (4, T) makes T tracks as fixed combinations of the four fractions (identity by
    default); ``crop`` bins are dropped at each end, as Enformer crops its edges, so bin ``i``
    covers bases [(crop + i) * bin_size, (crop + i + 1) * bin_size) of the window. With
    ``tracks_last`` False the output is (N, T, bins), gReLU's and Borzoi's torch layout. The
    window length must be a multiple of ``bin_size``; with a power-of-two ``bin_size`` and an
    integer ``mix`` every value is exact in float32.
    """
    torch = _torch()
    weights = torch.eye(4) if mix is None else torch.as_tensor(mix, dtype=torch.float32)

    class BinFractions(torch.nn.Module):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mix", weights)

        def forward(self, x: Any) -> Any:
            if layout == "NCL":
                x = x.transpose(1, 2)
            bins = x.reshape(x.shape[0], -1, bin_size, 4).mean(dim=2)
            if crop:
                bins = bins[:, crop : bins.shape[1] - crop]
            tracks = bins @ self.mix
            return tracks if tracks_last else tracks.transpose(1, 2)

    return _export(BinFractions(), path, length, layout, "tracks", {1 if tracks_last else 2: "bins"})
