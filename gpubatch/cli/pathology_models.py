"""Pathology models of the field in miniature: a ViT patch encoder and a gated-ABMIL slide head.

The commonest pathology workload is patch-feature extraction with a foundation model (UNI2,
Virchow2, H-optimus, CONCH: ViT encoders with 14- or 16-pixel patches, some with register tokens)
followed by an attention-MIL head over each slide's bag of features. These builders make graphs of
the same shape and operators with seeded random weights (no downloads, no torchvision), for the
tests, the benchmark and anyone trying the two-stage flow: ``make_vit`` writes an encoder as ONNX,
TorchScript or an ExportedProgram; ``make_abmil`` writes a slide head as ONNX.

torch is needed to make the files (``pip install 'gpubatch[torch]'``), not to run them. Exports use
the TorchScript-based ONNX exporter (``dynamo=False``): no onnxscript, well under a second each.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

try:
    import torch
    from torch import nn
except ImportError as exc:  # pragma: no cover - the message names the extra
    from gpubatch.core.errors import MissingExtraError

    raise MissingExtraError("making the ViT and ABMIL models", "torch", "torch") from exc

OPSET = 17  # first opset with LayerNormalization as one op
VIT_OUTPUTS = ("cls", "cls_mean", "features")
VIT_FORMATS = ("onnx", "torchscript", "exported_program")


class Attention(nn.Module):
    """Multi-head self-attention written as matmuls: exports to plain MatMul/Softmax on any opset
    and leaves nothing to the exporter's handling of fused attention kernels."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (n, heads, t, head_dim)
        weights = torch.softmax(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(self.head_dim)), dim=-1)
        return self.proj((weights @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """ViT tile encoder: conv patch embedding, cls token, optional registers, learned position
    embedding, pre-norm blocks, final norm.

    Registers follow DINOv2-reg (the layout of UNI2, Virchow2, H-optimus): inserted after the cls
    token, without position embedding, and dropped from every output. ``out`` picks what the
    encoder returns: 'cls' (N, dim); 'cls_mean', cls concatenated with the mean patch token as
    Virchow does (N, 2*dim); 'features', the patch tokens (N, patches, dim) for dense tasks.
    """

    def __init__(self, img: int = 224, patch: int = 16, dim: int = 64, depth: int = 2,
                 heads: int = 2, registers: int = 0, out: str = "cls"):
        super().__init__()
        if img % patch:
            raise ValueError(f"img {img} is not a multiple of patch {patch}")
        if out not in VIT_OUTPUTS:
            raise ValueError(f"out must be one of {VIT_OUTPUTS}, got {out!r}")
        self.out, self.registers = out, registers
        self.patches = (img // patch) ** 2
        self.patch_embed = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.reg_tokens = nn.Parameter(torch.randn(1, registers, dim) * 0.02) if registers else None
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + self.patches, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, patches, dim)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls, tokens], dim=1) + self.pos_embed
        if self.reg_tokens is not None:
            regs = self.reg_tokens.expand(tokens.shape[0], -1, -1)
            x = torch.cat([x[:, :1], regs, x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        patch_tokens = x[:, 1 + self.registers :]
        if self.out == "features":
            return patch_tokens
        if self.out == "cls_mean":
            return torch.cat([x[:, 0], patch_tokens.mean(dim=1)], dim=-1)
        return x[:, 0]


class GatedABMIL(nn.Module):
    """Gated attention MIL (Ilse et al. 2018) over a bag of tile embeddings h (N, dim).

    a = softmax over tiles of w^T (tanh(V h) * sigmoid(U h)); slide embedding z = sum_i a_i h_i;
    logits = Linear(z). Returns (attention (N,), logits (1, classes)); the attention is what a
    pathologist looks at as a heatmap, so it is an output of its own and sums to 1.
    """

    def __init__(self, dim: int = 64, hidden: int = 32, classes: int = 2):
        super().__init__()
        self.attention_v = nn.Linear(dim, hidden)
        self.attention_u = nn.Linear(dim, hidden)
        self.attention_w = nn.Linear(hidden, 1)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, bag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate = torch.tanh(self.attention_v(bag)) * torch.sigmoid(self.attention_u(bag))
        scores = self.attention_w(gate).squeeze(-1)  # (N,)
        attention = torch.softmax(scores, dim=0)
        slide = (attention.unsqueeze(0) @ bag)  # (1, dim)
        return attention, self.classifier(slide)


def build_vit(*, img: int = 224, patch: int = 16, dim: int = 64, depth: int = 2, heads: int = 2,
              registers: int = 0, out: str = "cls", seed: int = 0) -> TinyViT:
    """The seeded, eval-mode ViT that ``make_vit`` exports (for comparing against the export)."""
    torch.manual_seed(seed)
    return TinyViT(img, patch, dim, depth, heads, registers, out).eval()


def build_abmil(*, dim: int = 64, hidden: int = 32, classes: int = 2, seed: int = 0) -> GatedABMIL:
    """The seeded, eval-mode ABMIL head that ``make_abmil`` exports."""
    torch.manual_seed(seed)
    return GatedABMIL(dim, hidden, classes).eval()


def make_vit(path: str | Path, *, img: int = 224, patch: int = 16, dim: int = 64, depth: int = 2,
             heads: int = 2, registers: int = 0, out: str = "cls", seed: int = 0,
             fmt: str = "onnx") -> Path:
    """Write a random-weight ViT taking "tiles" (N, 3, img, img) float32, batch axis dynamic.

    ``fmt``: 'onnx' (output "embedding"), 'torchscript' (torch.jit.trace) or 'exported_program'
    (torch.export with a dynamic batch dimension, saved with torch.export.save).
    """
    model = build_vit(img=img, patch=patch, dim=dim, depth=depth, heads=heads,
                      registers=registers, out=out, seed=seed)
    example = torch.zeros(2, 3, img, img)
    target = _prepare(path)
    if fmt == "onnx":
        _export_onnx(model, (example,), target, ["tiles"], ["embedding"],
                     {"tiles": {0: "batch"}, "embedding": {0: "batch"}})
    elif fmt == "torchscript":
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # deprecated in torch 2.13, still works
            torch.jit.trace(model, example).save(str(target))
    elif fmt == "exported_program":
        batch = torch.export.Dim("batch", min=1, max=4096)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        torch.export.save(program, str(target))
    else:
        raise ValueError(f"fmt must be one of {VIT_FORMATS}, got {fmt!r}")
    return target


def make_abmil(path: str | Path, *, dim: int = 64, hidden: int = 32, classes: int = 2,
               seed: int = 0) -> Path:
    """Write a random-weight gated-ABMIL head to ONNX: input "bag" (N, dim) with N dynamic,
    outputs "attention" (N,) and "logits" (1, classes)."""
    model = build_abmil(dim=dim, hidden=hidden, classes=classes, seed=seed)
    target = _prepare(path)
    _export_onnx(model, (torch.zeros(7, dim),), target, ["bag"], ["attention", "logits"],
                 {"bag": {0: "tiles"}, "attention": {0: "tiles"}})
    return target


def _prepare(path: str | Path) -> Path:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return target


def _export_onnx(model: nn.Module, args: tuple[Any, ...], target: Path, inputs: list[str],
                 outputs: list[str], dynamic_axes: dict[str, dict[int, str]]) -> None:
    """TorchScript-based export at OPSET with the given dynamic axes; the file is checked."""
    import onnx

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice is deliberate
        torch.onnx.export(model, args, str(target), input_names=inputs, output_names=outputs,
                          dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False)
    onnx.checker.check_model(onnx.load(str(target)))
