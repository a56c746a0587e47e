"""GPU JPEG decode of TIFF tiles: compressed bytes go to the device and are decoded there.

On a GPU run, host-side JPEG decode (about 80 ms per 4096x4096 level with libjpeg-turbo) takes the
host cores that feed the model: nvImageCodec decodes a batch of tile bitstreams with nvJPEG into
device memory instead. The decoded tiles are then copied back to the host
(``TiffBackend._decoded`` yields host arrays, which the tile pipeline batches), so what this
removes is the host's decode, not the host-to-device copy of decoded pixels (3 bytes per pixel
against ~0.3 compressed): keeping pixels on the device up to the model would need a device-side
batch assembly, which the pipeline does not have.

TIFF stores JPEG tiles as *abbreviated* streams: the quantisation and Huffman tables live once in
the JPEGTables tag, not in each tile. Stand-alone decoders (nvJPEG, and imagecodecs without its
``tables`` argument) need full streams, so ``splice_jpeg_tables`` rebuilds one: SOI, the tables'
segments, then the tile's segments. Aperio SVS tiles are a second trap: they are RGB-coded (no
colour transform) but carry no JFIF or Adobe marker, so any decoder that guesses applies a YCbCr
conversion and gets wrong colours. With ``rgb=True`` the splice inserts an Adobe APP14 marker with
transform 0, which tells every conforming decoder "components are RGB", the same thing tifffile
tells libjpeg through ``colorspace``. The splice is pure bytes and tested on the CPU; the GPU
decode itself runs only where nvImageCodec and a device are present.

Three settings of nvImageCodec's Python ``Decoder`` matter here (python/decoder.cpp in
NVIDIA/nvImageCodec): its default ``options=":fancy_upsampling=0"`` upsamples subsampled chroma
(YCbCr 4:2:0 and 4:2:2 tiles, most non-Aperio scanners) by replication where libjpeg-turbo, the host
twin, interpolates, so ``:fancy_upsampling=1`` is asked for; with no ``backends`` it may fall back to
its CPU libjpeg-turbo extension (nvJPEG is an extra: ``nvidia-nvimgcodec-cu12[nvjpeg]``), which would
quietly put the decode back on the host cores this path exists to free, so only GPU backends are
allowed and a probe decode says whether one is there; and one decoder must not be used by two threads
at once (NVIDIA's own concurrency tests give each thread its own), while a shard's reader threads all
decode, so calls take turns on the process's decoder.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

SOI = b"\xff\xd8"
EOI = b"\xff\xd9"
#: APP14 "Adobe" segment, version 100, flags 0/0, transform 0 (components are RGB, not YCbCr)
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
PHOTOMETRIC_RGB = 2
WHITE = 255
#: nvImageCodec decoder options: interpolated chroma upsampling, as libjpeg-turbo (the host twin) does
DECODER_OPTIONS = ":fancy_upsampling=1"
#: nvImageCodec backend kinds that decode on the device (CPU_ONLY is its libjpeg-turbo fallback)
GPU_BACKENDS = ("GPU_ONLY", "HYBRID_CPU_GPU", "HW_GPU_ONLY")
NVJPEG_HINT = "pip install 'nvidia-nvimgcodec-cu12[nvjpeg]'"
#: one decode call at a time on the shared decoder (nvImageCodec decoders are not thread-safe)
_DECODE_LOCK = threading.Lock()


def has_jfif(stream: bytes) -> bool:
    """True when the stream starts with SOI + APP0 JFIF (what tifffile's is_jfif checks)."""
    return stream[:4] == SOI + b"\xff\xe0" and stream[6:10] == b"JFIF"


def needs_rgb_marker(photometric: int, first_tile: bytes) -> bool:
    """RGB-coded JPEG tiles without a JFIF marker (Aperio SVS) must be marked as RGB to decode."""
    return int(photometric) == PHOTOMETRIC_RGB and not has_jfif(first_tile)


def splice_jpeg_tables(tile: bytes, jpegtables: bytes | None, *, rgb: bool = False) -> bytes:
    """Abbreviated TIFF tile + JPEGTables -> one self-contained JPEG stream.

    The tables segment is ``SOI <DQT/DHT segments> EOI``; the result is
    ``SOI [APP14 Adobe RGB] <table segments> <tile segments after its SOI>``. Without tables the
    tile is already complete and only the optional RGB marker is added.
    """
    if tile[:2] != SOI:
        raise ValueError("JPEG tile does not start with SOI")
    body = tile[2:]
    marker = ADOBE_RGB if rgb else b""
    if not jpegtables:
        return SOI + marker + body
    if jpegtables[:2] != SOI or jpegtables[-2:] != EOI:
        raise ValueError("JPEGTables must be an SOI ... EOI stream")
    return SOI + marker + jpegtables[2:-2] + body


def tile_bitstreams(blobs: Sequence[bytes], jpegtables: bytes | None, photometric: int) -> list[bytes]:
    """Full JPEG streams for a TIFF page's tiles, RGB-marked when the page needs it."""
    first = next((b for b in blobs if b), b"")
    rgb = needs_rgb_marker(photometric, first)
    return [splice_jpeg_tables(b, jpegtables, rgb=rgb) if b else b"" for b in blobs]


def decode_jpeg_tiles_cpu(
    blobs: Sequence[bytes], jpegtables: bytes | None, *, photometric: int = PHOTOMETRIC_RGB
) -> np.ndarray:
    """The host twin: the same spliced streams through imagecodecs (libjpeg-turbo), (k, h, w, 3)."""
    import imagecodecs

    streams = tile_bitstreams(blobs, jpegtables, photometric)
    tiles = [imagecodecs.jpeg_decode(s) if s else None for s in streams]
    return _stack(tiles, np.stack, lambda shape: np.full(shape, WHITE, dtype=np.uint8))


@functools.lru_cache(maxsize=1)
def gpu_decode_available() -> tuple[bool, str]:
    """(True, "nvimgcodec") when GPU decode can run, else (False, why not) for logs and reports."""
    from gpubatch.ops.kernels_gpu import gpu_available

    if not gpu_available():
        return False, "no CUDA device visible to CuPy"
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, f"nvImageCodec not importable ({type(exc).__name__}: {exc}); {NVJPEG_HINT}"
    return probe_decoder()


def probe_decoder() -> tuple[bool, str]:
    """Decode one small JPEG with the GPU backends: nvImageCodec imports without nvJPEG, and then
    returns None for every tile, which would fail each slide's first read instead of the job."""
    import imagecodecs

    sample = bytes(imagecodecs.jpeg_encode(np.full((16, 16, 3), 128, dtype=np.uint8), level=90))
    try:
        images = decode_streams([sample])
    except Exception as exc:  # noqa: BLE001 - a decoder that cannot start is "not available"
        return False, f"nvImageCodec could not decode on the GPU ({type(exc).__name__}: {exc}); {NVJPEG_HINT}"
    if not images or images[0] is None:
        return False, f"nvImageCodec has no GPU JPEG decoder here (nvJPEG missing?); {NVJPEG_HINT}"
    return True, "nvimgcodec"


@functools.lru_cache(maxsize=1)
def _decoder() -> Any:
    """The process's decoder: GPU backends only, libjpeg-turbo's chroma upsampling."""
    from nvidia import nvimgcodec

    backends = [nvimgcodec.Backend(getattr(nvimgcodec.BackendKind, kind)) for kind in GPU_BACKENDS]
    return nvimgcodec.Decoder(backends=backends, options=DECODER_OPTIONS)


def decode_streams(streams: Sequence[bytes]) -> list[Any]:
    """nvImageCodec's batch decode of full JPEG streams (an Image, or None where one failed),
    one call at a time on the process's decoder."""
    with _DECODE_LOCK:
        return list(_decoder().decode(list(streams)))


def decode_jpeg_tiles_gpu(
    blobs: Sequence[bytes], jpegtables: bytes | None, *, photometric: int = PHOTOMETRIC_RGB
) -> Any:
    """Decode TIFF JPEG tiles on the GPU with nvImageCodec -> CuPy uint8 (k, h, w, 3).

    Empty blobs (sparse tiles) come back white, as openslide shows them. All tiles of one call
    must share a shape (one pyramid level's tile grid).
    """
    import cupy

    ok, why = gpu_decode_available()
    if not ok:
        raise RuntimeError(f"GPU JPEG decode unavailable: {why}")
    streams = tile_bitstreams(blobs, jpegtables, photometric)
    present = [s for s in streams if s]
    images = decode_streams(present) if present else []
    decoded = iter(images)
    tiles: list[Any] = []
    for index, s in enumerate(streams):
        if not s:
            tiles.append(None)
            continue
        image = next(decoded)
        if image is None:
            raise ValueError(f"nvImageCodec could not decode tile {index} of this batch")
        tiles.append(cupy.asarray(image))
    return _stack(tiles, cupy.stack, lambda shape: cupy.full(shape, WHITE, dtype=cupy.uint8))


def _stack(tiles: list[Any], stack: Any, blank: Any) -> Any:
    """Stack decoded tiles, filling sparse (None) ones with white of the common shape."""
    shapes = {tuple(t.shape) for t in tiles if t is not None}
    if len(shapes) > 1:
        raise ValueError(f"tiles of one batch must share a shape, got {sorted(shapes)}")
    if not shapes:
        raise ValueError("no tile to decode: every blob is empty")
    shape = shapes.pop()
    return stack([t[..., :3] if t is not None else blank(shape)[..., :3] for t in tiles])
