"""Which matched paths are slides: an OME-Zarr image and a DICOM-WSI series are one input each.

A glob matches files, but two slide formats are folders of files: an OME-Zarr image (thousands
of chunk objects under ``image.zarr/``) and a DICOM-WSI series (one ``.dcm`` per pyramid level,
plus label and overview images). Each must become one shard, never one per chunk or per level.

* A folder a recursive glob (``**``) also matched entries of stands for nothing itself.
* Paths inside a ``.zarr`` folder, or inside a folder whose zarr metadata (``zarr.json``,
  ``.zgroup``, ``.zattrs``, ``.zarray``) was matched, collapse to that folder.
* DICOM files collapse per folder and series, read from their headers (SOP class, series UID and
  image type only, no pixel data): a folder holding one whole-slide series becomes the folder; a
  folder holding several gives one input per series (its first file, from which the reader finds
  the rest); a DICOM file that is not a slide stays an input of its own, to be refused by its SOP
  class rather than silently skipped. Only pyramid levels (ImageType VOLUME) make a series a
  slide: label, overview and thumbnail images, which scanners may write as a series of their
  own, are never an input.

The order of the first appearance of each input is kept (plan order is output order).
"""

from __future__ import annotations

import posixpath
from typing import Any

from gpubatch.sources.slides.dicom import DICOM_SUFFIXES, folder_headers
from gpubatch.sources.slides.omezarr import ZARR_METADATA, ZARR_SUFFIXES

ZARR_NODE_FILES = (*ZARR_METADATA, ".zarray")


def slide_inputs(found: list[str], options: dict[str, Any] | None = None) -> list[str]:
    """The slide inputs among the matched paths ``found`` (see the module docstring)."""
    zarr_roots = _zarr_roots(found)
    descended = {_parent(uri) for uri in found}  # folders a recursive glob also listed inside
    slots: list[str] = []
    dicom: dict[str, list[str]] = {}
    for uri in found:
        root = _inside_zarr(uri, zarr_roots)
        if root is not None:
            _add(slots, root)
        elif uri.rstrip("/") in descended:
            continue  # a folder whose own entries were matched: they say what it holds
        elif uri.lower().endswith(DICOM_SUFFIXES):
            folder = _parent(uri)
            if folder not in dicom:
                _add(slots, _dicom_slot(folder))
            dicom.setdefault(folder, []).append(uri)
        else:
            _add(slots, uri)
    out: list[str] = []
    for slot in slots:
        if slot.startswith("\0dicom:"):
            folder = slot[len("\0dicom:"):]
            for uri in dicom_series_inputs(folder, dicom[folder], options):
                _add(out, uri)
        else:
            _add(out, slot)
    return out


def _add(items: list[str], item: str) -> None:
    if item not in items:
        items.append(item)


def _dicom_slot(folder: str) -> str:
    return f"\0dicom:{folder}"


def _parent(uri: str) -> str:
    return posixpath.dirname(uri.rstrip("/"))


def _zarr_roots(found: list[str]) -> list[str]:
    """Folders a matched path names as zarr nodes: ``*.zarr`` components, or zarr metadata files."""
    roots = set()
    for uri in found:
        parts = uri.rstrip("/").split("/")
        for i, part in enumerate(parts):
            if part.lower().endswith(ZARR_SUFFIXES):
                roots.add("/".join(parts[: i + 1]))
                break
        else:
            if parts[-1] in ZARR_NODE_FILES:
                roots.add("/".join(parts[:-1]))
    return sorted(roots, key=len)


def _inside_zarr(uri: str, roots: list[str]) -> str | None:
    """The outermost zarr folder ``uri`` is, or lies inside."""
    stripped = uri.rstrip("/")
    for root in roots:  # shortest first: a group's arrays collapse to the group
        if stripped == root or stripped.startswith(root + "/"):
            return root
    return None


def dicom_series_inputs(folder: str, files: list[str], options: dict[str, Any] | None) -> list[str]:
    """One input per DICOM-WSI series among ``files`` (all in ``folder``), see the module docstring.

    Without pydicom the headers cannot be read: the folder's first file stands for the folder, and
    opening it says which extra to install.
    """
    try:
        import pydicom  # noqa: F401
    except ImportError:
        return [sorted(files)[0]]
    from gpubatch.io.retry import RetryPolicy
    from gpubatch.io.storage import retried_fs

    fs, path = retried_fs(folder or ".", options, RetryPolicy(attempts=10))  # at plan time: patient
    headers = folder_headers(fs, path)
    everything = {_name(h.path): h for h in headers}
    listed = sorted(files)
    matched = [everything.get(_name(f)) for f in listed]
    series = {h.series_uid for h in everything.values() if h.is_level and not h.cut}
    inputs: list[str] = []
    for uri, header in zip(listed, matched, strict=True):
        if header is not None and header.cut:
            _add(inputs, folder if len(series) <= 1 else uri)  # refused as cut short when opened
        elif header is None or not header.is_wsi:
            _add(inputs, uri)  # not a slide: refused by name when opened
        elif len(series) <= 1:
            _add(inputs, folder)  # one slide (or only its label and overview: refused by name)
        elif header.is_level:
            _add(inputs, min(f for f, h in zip(listed, matched, strict=True)
                             if h is not None and h.is_level and h.series_uid == header.series_uid))
        # else: the label, overview or thumbnail of one of the slides, in whichever series: no input
    return inputs


def _name(path: str) -> str:
    return posixpath.basename(str(path).rstrip("/"))
