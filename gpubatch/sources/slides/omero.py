"""Whether an OME-Zarr image's channels are a brightfield scan's red, green and blue, from its
NGFF ``omero`` metadata: a fluorescence image must not reach an H&E model as if it were RGB.

A 3-channel uint8 fluorescence image (DAPI, FITC, TRITC) has the shape of an RGB slide, and read
as one its nuclear stain becomes the "blue" of an H&E model: predictions without any error. The
arrays cannot tell the two apart; the ``omero`` block, which viewers use to display the image,
usually can. The rule, kept narrow so that no brightfield image is refused on a guess:

* refused: a channel label naming a fluorophore or fluorescent stain (DAPI, Hoechst, FITC,
  TRITC, Cy3, Alexa Fluor 488, GFP, mCherry, Opal 520, an emission wavelength such as '488 nm',
  ...), or colours set on the first three channels, all of them pure hues, that are not red,
  green and blue in that order (0000FF, 00FF00, FF0000 is bioformats2raw's emission-wavelength
  colouring of a DAPI, FITC, TRITC image) unless the labels themselves say R, G, B;
* read with a note: anything else that looks unlike brightfield RGB (colours set that are
  neither R, G, B nor gray, colours against R/G/B labels, display windows stretched over a
  narrow part of 0-255, a single channel named after a fluorophore: read as gray);
* read silently: no ``omero`` block, labels such as 'R', 'Red' or 'Channel 0', colours
  FF0000, 00FF00, 0000FF in order or none (what bioformats2raw and QuPath write for an RGB scan).

Four channels are held to more: read as RGBA, the fourth is taken for alpha and composited away,
where it may as well be the fourth stain of a 4-plex fluorescence image (DAPI, CD3, CD8, PanCK),
and nothing in the arrays tells. They are read only where the ``omero`` block says red, green,
blue (labels R, G, B or colours FF0000, 00FF00, 0000FF on the first three); refused without it.

There is no spec key to choose channels: the fix said is to render the image as RGB, or to save
a channel as a gray image of its own (gray OME-Zarr images are read).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: labels of fluorophores, fluorescent stains and fluorescent proteins (whole words, any case)
FLUOROPHORE = re.compile(
    r"\b(dapi|hoechst|draq ?[57]|fitc|tritc|cy ?[2357](\.5)?|alexa|af ?\d{3}|atto|dylight|opal|"
    r"texas ?red|rhodamine|e?[gyrcb]fp|mcherry|tdtomato|dsred|mneon\w*|autofluorescence|"
    r"(3[5-9]\d|[4-7]\d\d) ?nm|ex ?\d{3}|em ?\d{3})\b", re.IGNORECASE)
RGB_COLOURS = ("FF0000", "00FF00", "0000FF")
RGB_LABELS = (("r", "red"), ("g", "green"), ("b", "blue"))
#: a uint8 display window narrower than this is a stretch of dim signal, not a brightfield view
NARROW_WINDOW = 128
FIX = ("gpubatch reads brightfield RGB, RGBA or gray images, and no spec key picks "
       "channels: render the channels to an 8-bit RGB image (QuPath, napari, bfconvert) to read "
       "that, or save one channel as a gray image of its own")


@dataclass(frozen=True)
class Channel:
    """One ``omero`` channel as displayed: its label, its colour (upper-case hex), its window."""

    label: str
    colour: str
    window: tuple[float, float] | None


def omero_channels(attrs: dict[str, Any]) -> list[Channel]:
    """The ``omero`` channels of an image group's attributes (0.5 under 'ome'), [] without."""
    omero = attrs.get("omero") or (attrs.get("ome") or {}).get("omero") or {}
    raw = omero.get("channels") if isinstance(omero, dict) else None
    return [_channel(c) for c in raw if isinstance(c, dict)] if isinstance(raw, list) else []


def _channel(raw: dict[str, Any]) -> Channel:
    window = raw.get("window")
    span = None
    if isinstance(window, dict) and isinstance(window.get("start"), int | float) \
            and isinstance(window.get("end"), int | float):
        span = (float(window["start"]), float(window["end"]))
    return Channel(str(raw.get("label") or ""), str(raw.get("color") or "").upper().lstrip("#"), span)


def channel_verdict(channels: list[Channel], count: int) -> tuple[str | None, str | None]:
    """(why the image is refused, or None; a note for the report, or None) for an image whose
    c axis holds ``count`` channels described by ``channels`` (its ``omero`` block)."""
    if not channels or len(channels) != count:  # the block does not describe these channels
        return (_unproven_rgba("no omero channel metadata describing them") if count == 4 else None), None
    named = [c.label for c in channels if FLUOROPHORE.search(c.label)]
    if named and count > 1:
        return (f"is a fluorescence image, not brightfield RGB: its omero channel labels {_quoted(named)} "
                f"name fluorescent stains, and read as RGB they would reach the model as red, green and "
                f"blue; {FIX}"), None
    if named:
        return None, (f"its one channel is labelled {_quoted(named)} (a fluorescence channel): read as gray, "
                      "bright on dark; a brightfield model will not make sense of it")
    if count == 4 and not _says_rgb(channels[:3]):
        colours = ", ".join(c.colour or "-" for c in channels)
        return _unproven_rgba(f"omero channels labelled {_quoted([c.label for c in channels])} and "
                                     f"coloured {colours}, not red, green, blue"), None
    return _by_colour(channels[:3]) if count >= 3 else (None, _window_note(channels))


def _says_rgb(first: list[Channel]) -> bool:
    """The first three channels labelled R, G, B (or Red, Green, Blue) or coloured so in order."""
    labelled = all(c.label.strip().lower() in names for c, names in zip(first, RGB_LABELS, strict=True))
    return labelled or tuple(c.colour for c in first) == RGB_COLOURS


def _unproven_rgba(found: str) -> str:
    """Why a 4-channel image is refused: nothing says its fourth channel is alpha."""
    return (f"has 4 channels (uint8) and {found}: read as RGBA its fourth channel would be taken "
            "for transparency, where it may be the fourth stain of a fluorescence image; if it is a "
            "brightfield RGBA scan, say so in its omero metadata (channel labels R, G, B, A, or colours "
            "FF0000, 00FF00, 0000FF on the first three) or save it as RGB; if it is fluorescence, "
            + FIX.split(": ", 1)[1])


def _by_colour(first: list[Channel]) -> tuple[str | None, str | None]:
    """The colour rule on the first three channels (the fourth of RGBA is its alpha)."""
    colours = [c.colour for c in first]
    if all(_pure_hue(c) for c in colours) and tuple(colours) != RGB_COLOURS:
        if not _says_rgb(first):
            return (f"is a fluorescence image, not brightfield RGB: its omero channels are coloured "
                    f"{', '.join(colours)}, where an RGB scan's are FF0000, 00FF00, 0000FF in that order; "
                    f"{FIX}"), None
        return None, (f"its channels are labelled R, G, B but coloured {', '.join(colours)}: read as RGB; "
                      "if it is a fluorescence image its predictions mean nothing")
    if any(c and tuple(colours) != RGB_COLOURS and not _gray(c) for c in colours):
        return None, (f"its omero channel colours {', '.join(c or '-' for c in colours)} are not the red, "
                      "green, blue of a brightfield scan: read as RGB; if it is a fluorescence image "
                      "its predictions mean nothing")
    return None, _window_note(first)


def _window_note(channels: list[Channel]) -> str | None:
    narrow = [c for c in channels if c.window and c.window[1] - c.window[0] < NARROW_WINDOW]
    if not narrow:
        return None
    spans = ", ".join(f"{c.window[0]:g}-{c.window[1]:g}" for c in narrow if c.window)
    return (f"its omero display windows ({spans}) stretch a narrow part of 0-255, as for dim fluorescence "
            "signal: read as brightfield RGB; if it is a fluorescence image its predictions mean nothing")


def _pure_hue(colour: str) -> bool:
    """A colour with every component full or off and not all alike (red, cyan, magenta, ...)."""
    return len(colour) == 6 and {colour[i:i + 2] for i in (0, 2, 4)} == {"FF", "00"}


def _gray(colour: str) -> bool:
    return len(colour) == 6 and colour[0:2] == colour[2:4] == colour[4:6]


def _quoted(labels: list[str]) -> str:
    return ", ".join(repr(label) for label in labels[:6]) + (" ..." if len(labels) > 6 else "")
