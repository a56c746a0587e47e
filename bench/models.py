"""Benchmark-only models: a ResNet-18-sized CNN for the compute-bound workload."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _block(cin: int, cout: int, stride: int) -> Any:
    from torch import nn

    class Basic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: Any) -> Any:
            y = self.b2(self.c2(self.b1(self.c1(x)).relu()))
            return (y + self.down(x)).relu()

    return Basic()


def make_resnet18_like(path: str | Path, classes: int = 2) -> Path:
    """ResNet-18's layout (64-128-256-512, two basic blocks each): about 1.8 GFLOPs at 224 px."""
    import torch
    from torch import nn

    from gpubatch.cli.demo import _export

    path = Path(path)
    if path.exists():
        return path
    torch.manual_seed(0)
    layers: list[Any] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [_block(cin, cout, stride), _block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes), nn.Softmax(dim=1)]
    return _export(nn.Sequential(*layers), torch.rand(2, 3, 224, 224), path, ["probs"])


def make_light_model(path: str | Path, classes: int = 2) -> Path:
    """A very light CNN (two strided convs, about 2 MMACs per 224-px tile): decode dominates."""
    import torch
    from torch import nn

    from gpubatch.cli.demo import _export

    path = Path(path)
    if path.exists():
        return path
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), nn.ReLU(), nn.Conv2d(8, 16, 4, stride=4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes), nn.Softmax(dim=1))
    return _export(net, torch.rand(2, 3, 224, 224), path, ["probs"], spatial=True)


def make_track_model(path: str | Path, length: int, tracks: int, bins: int = 896, bin_size: int = 128,
                     channels: int = 64) -> Path:
    """An Enformer-shaped track model with a small conv trunk: (N, length, 4) one-hot in,
    (N, bins, tracks) non-negative out.

    conv(4 -> 32, k 15) -> ReLU -> max-pool 16 -> conv(32 -> ``channels``, k 5) -> ReLU -> max-pool
    ``bin_size // 16`` -> the central ``bins`` bins (Enformer crops 320 of 1536 at each end) ->
    a 1x1 conv to ``tracks`` -> softplus. About 4 GFLOP per 196,608-bp window with 1,000 tracks:
    the trunk is small, the head and the output are the size users meet.
    """
    import torch
    from torch import nn

    from gpubatch.cli.demo import _export

    path = Path(path)
    if path.exists():
        return path
    if length % bin_size or bin_size % 16:
        raise ValueError(f"length {length} must be a multiple of bin_size {bin_size}, itself of 16")
    crop = (length // bin_size - bins) // 2
    if crop < 0:
        raise ValueError(f"{length} bp in bins of {bin_size} make fewer than {bins} bins")

    class TrackNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Sequential(
                nn.Conv1d(4, 32, 15, padding=7), nn.ReLU(), nn.MaxPool1d(16),
                nn.Conv1d(32, channels, 5, padding=2), nn.ReLU(), nn.MaxPool1d(bin_size // 16))
            self.head = nn.Sequential(nn.Conv1d(channels, tracks, 1), nn.Softplus())

        def forward(self, x: Any) -> Any:
            h = self.trunk(x.transpose(1, 2))
            return self.head(h[:, :, crop : crop + bins]).transpose(1, 2)

    torch.manual_seed(0)
    return _export(TrackNet(), torch.zeros(2, length, 4), path, ["tracks"])
