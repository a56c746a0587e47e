"""What a TIFF holds beyond its tile tables, checked at open: that its first image is its
largest, that it holds one plane, that its samples are 8- or 16-bit and that three or four of
them are red, green, blue (and alpha). Each was read without a word, wrongly: a pyramid stored
smallest first as its thumbnail, an OME-TIFF of three fluorescence channels as its first channel
in gray, four channels as RGBA (the fourth taken for transparency), three gray channels as RGB.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpubatch.core.errors import InputError
from gpubatch.sources.slides.backends import MINISBLACK
from gpubatch.sources.slides.omero import FIX as FIX_CHANNELS

#: TIFF ExtraSamples values that say alpha (associated, unassociated)
ALPHA_SAMPLES = (1, 2)
#: axes of a tifffile series that a slide's one plane is made of (S: samples of a pixel)
PLANE_AXES = set("YXS")


#: tifffile's series kinds of TIFFs without a vendor's layout (tifffile's own shaped metadata)
PLAIN_SERIES = ("generic", "shaped", "uniform")


class SmallestFirst(TypeError):
    """A TIFF whose first image is not its largest: a pyramid stored smallest first (or a vendor
    layout with a label first). tifffile takes the first image for the slide; openslide reads a
    vendor's layout right, but a generic TIFF's levels with the first image's resolution."""


def check_first_is_largest(tif: Any) -> None:
    """Raise :class:`SmallestFirst` where a later image of a plain TIFF has more pixels than the
    first: the slide would be read as its thumbnail, silently at a quarter of its resolution.
    Vendor layouts (SVS, NDPI, SCN, OME...) are left alone: their slide is named, and a small
    slide's macro image may well be larger."""
    if tif.series[0].kind.lower() not in PLAIN_SERIES:
        return

    def size(series: Any) -> tuple[int, int]:
        page = series.levels[0].keyframe
        return int(page.imagewidth), int(page.imagelength)

    first = size(tif.series[0])
    largest = max(enumerate(tif.series), key=lambda item: size(item[1])[0] * size(item[1])[1])
    if largest[0] and size(largest[1])[0] * size(largest[1])[1] > first[0] * first[1]:
        w, h = size(largest[1])
        raise SmallestFirst(f"its first image ({first[0]}x{first[1]} px) is not its largest (image {largest[0] + 1}, "
                            f"{w}x{h} px): a pyramid stored smallest first")


def check_samples(page: Any, level: int, path: str) -> None:
    """Refuse samples no reader here makes a slide of: float, or integers wider than 16 bits.
    Left to openslide, such a file opened (so ``inspect`` described it) and failed at the first
    read with libtiff's 'Sorry, can not handle images with 32-bit samples', naming neither the
    sample type nor the fix. 16-bit integers go on to openslide, which scales them to 8 bits."""
    dtype = np.dtype(page.dtype) if page.dtype is not None else None
    if dtype is not None and (dtype.kind == "f" or dtype.itemsize > 2):
        kind = "floating-point" if dtype.kind == "f" else "integer"
        raise InputError(path, f"level {level} stores {dtype.itemsize * 8}-bit {kind} samples ({dtype}); slides "
                               "are read as 8-bit (or 16-bit integer) RGB or gray, as a scanner writes them: "
                               "export the image as 8-bit (rescaled to 0-255) to read it")


def check_planes(series: Any, path: str) -> None:
    """Refuse an image of several planes (channels stored apart, a z-stack, a time series): its
    pages hold one plane each, and the first alone was read (an OME-TIFF of DAPI, FITC, TRITC
    read as its DAPI in gray)."""
    level0 = series.levels[0]
    extra = {axis: int(size) for axis, size in zip(level0.axes, level0.shape, strict=True)
             if axis not in PLANE_AXES and int(size) > 1}
    if not extra:
        return
    named = ", ".join(f"{axis} {size}" for axis, size in extra.items())
    channels = "C" in extra
    raise InputError(path, f"its image has {level0.axes} axes of {'x'.join(map(str, level0.shape))} ({named}): "
                           + (f"{extra['C']} channels stored as planes of their own (a fluorescence image?), "
                              f"of which the first would be read as gray; {FIX_CHANNELS}" if channels else
                              "several planes (a z-stack, a time series or a stack of images), where a slide "
                              "has one; save the plane to read as a TIFF of its own"))


def check_channels(page: Any, level: int, path: str) -> None:
    """Refuse 3 or 4 samples that the page does not call red, green, blue (and alpha): gray
    channels side by side (MINISBLACK), or a fourth sample its ExtraSamples tag does not call
    alpha. Read as RGB(A), they reached the model as colours, the fourth composited away."""
    samples = int(page.samplesperpixel)
    if samples < 3:
        return
    if int(page.photometric) == MINISBLACK:
        raise InputError(path, f"level {level} stores {samples} gray samples per pixel (photometric "
                               f"MINISBLACK): channels of a multichannel image, not red, green, blue; "
                               + FIX_CHANNELS)
    extra = [int(e) for e in page.extrasamples]
    if samples == 4 and extra and extra[-1] not in ALPHA_SAMPLES:
        raise InputError(path, f"level {level} stores 4 samples per pixel, the fourth not alpha (ExtraSamples "
                               f"{extra[-1]}, unspecified): read as RGBA it would be taken for transparency, "
                               "where it may be a fourth channel; if the image is RGB, save it without the "
                               "fourth sample (or with it tagged as alpha); if it is fluorescence, "
                               + FIX_CHANNELS.split(": ", 1)[1])
