"""Generators of hostile inputs for tests/test_hostile.py, each made with real tools from a good file.

An adversarial user's inputs: slides whose JPEG tiles or IFDs are corrupted, whose description is
garbage, that claim a million pixels a side; FASTA indexes with shifted offsets and wrong lengths;
YAML alias bombs and deep nesting; names with control characters; URLs that carry credentials,
served by a real HTTP server that checks them (``AuthRangeServer``).
"""

from __future__ import annotations

import base64
import os
import re
import struct
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np


class AuthRangeServer:
    """A loopback HTTP/1.1 file server with byte ranges and Basic authentication.

    Serves ``root``; every request must carry ``user:password`` (401 otherwise), so a job that
    reads from ``http://user:password@127.0.0.1:port/...`` proves the credentials were used.
    """

    def __init__(self, root: Path, user: str, password: str):
        self.root, self.requests = Path(root), 0
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.expected = f"Basic {token}"
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _range_handler(self))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.user, self.password = user, password
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, name: str) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.port}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _range_handler(owner: AuthRangeServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _serve(self) -> None:
            owner.requests += 1
            if self.headers.get("Authorization") != owner.expected:
                return self._answer(401, b"unauthorized", {"WWW-Authenticate": 'Basic realm="x"'})
            path = owner.root / self.path.split("?", 1)[0].lstrip("/")
            if not path.is_file():
                return self._answer(404, b"not found")
            data = path.read_bytes()
            m = re.match(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
            if m is None:
                return self._answer(200, data, {"Accept-Ranges": "bytes"})
            lo = int(m.group(1))
            hi = min(int(m.group(2)) + 1 if m.group(2) else len(data), len(data))
            return self._answer(206, data[lo:hi], {"Content-Range": f"bytes {lo}-{hi - 1}/{len(data)}",
                                                   "Accept-Ranges": "bytes"})

        def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = _serve

    return Handler


def output_text(outdir: Path) -> Iterator[tuple[Path, bytes]]:
    """Every file under ``outdir`` as raw bytes, and decoded where compression could hide text:
    parquet tables and zarr arrays are read back and rendered as text too."""
    import pyarrow.parquet as pq

    for path in sorted(p for p in Path(outdir).rglob("*") if p.is_file()):
        yield path, path.read_bytes()
        if path.suffix == ".parquet" and path.stat().st_size:
            yield path, repr(pq.read_table(path).to_pylist()).encode()
    zroot = Path(outdir) / "predictions.zarr"
    if zroot.is_dir():
        import zarr

        def walk(group: Any, where: Path) -> Iterator[tuple[Path, bytes]]:
            yield where, repr(dict(group.attrs)).encode()
            for name, arr in group.arrays():
                yield where / name, repr(arr[:].tolist()).encode() + repr(dict(arr.attrs)).encode()
            for name, sub in group.groups():
                yield from walk(sub, where / name)

        yield from walk(zarr.open_group(str(zroot), mode="r"), zroot)


# -- slides -------------------------------------------------------------------------------------


def tile_spans(path: Path, level: int = 0) -> list[tuple[int, int]]:
    """(offset, byte count) of each stored tile at a pyramid level, as tifffile reads them."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.series[0].levels[level].keyframe
        return list(zip(map(int, page.dataoffsets), map(int, page.databytecounts), strict=True))


def flip_tile_bytes(src: Path, dst: Path, n_bytes: int = 10, level: int = 0, seed: int = 0) -> Path:
    """``src`` with ``n_bytes`` bytes XOR-ed inside the entropy-coded data of level tiles.

    The bytes are flipped in the middle of tiles (past their headers, before their end markers),
    the silent corruption a bad disk or transfer causes: the file still opens and every tile
    still decodes, to wrong pixels.
    """
    data = bytearray(Path(src).read_bytes())
    rng = np.random.default_rng(seed)
    spans = tile_spans(src, level)
    for i in rng.choice(len(spans), size=min(n_bytes, len(spans)), replace=False):
        off, count = spans[int(i)]
        pos = off + count // 2 + int(rng.integers(-count // 8, count // 8 + 1))
        data[pos] ^= 0x5A if data[pos] not in (0xFF, 0x5A ^ 0xFF) else 0x33
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def truncate_tile(src: Path, dst: Path, level: int = 0, index: int = 0) -> Path:
    """``src`` with one tile's byte count halved: the decoder meets a premature end of data."""
    import tifffile

    data = bytearray(Path(src).read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.series[0].levels[level].keyframe
        tag = page.tags["TileByteCounts"]
        fmt = {3: "H", 4: "I", 16: "Q"}[tag.dtype]
        bo = tif.byteorder
        count = int(page.databytecounts[index])
        at = tag.valueoffset + index * struct.calcsize(fmt)
        struct.pack_into(bo + fmt, data, at, count // 2)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def zero_tile_bytes(src: Path, dst: Path, level: int = 0, index: int = 0, length: int | None = 64) -> Path:
    """``src`` with ``length`` bytes of one tile's entropy-coded data zeroed from its middle on
    (``None``: to the tile's end, its EOI marker included): the zero-filled blocks a bad disk or
    an interrupted copy leaves, in a tile whose byte count still says it is whole."""
    data = bytearray(Path(src).read_bytes())
    off, count = tile_spans(src, level)[index]
    start = off + count // 2
    end = off + count if length is None else start + length
    data[start:end] = bytes(end - start)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def oversized_tile(src: Path, dst: Path, index: int = 0, scale: int = 2) -> Path:
    """``src`` whose level-0 tile ``index`` holds a valid JPEG ``scale`` times the level's tile size
    (appended to the file, the tile's offset and byte count pointed at it): it decodes cleanly,
    to more pixels than the tile has."""
    import simplejpeg
    import tifffile

    data = bytearray(Path(src).read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        h, w = page.tilelength * scale, page.tilewidth * scale
        picture = np.random.default_rng(index).integers(0, 256, (h, w, 3), dtype=np.uint8)
        blob = simplejpeg.encode_jpeg(picture, quality=80, colorspace="RGB")
        bo = tif.byteorder
        for name, value in (("TileOffsets", len(data)), ("TileByteCounts", len(blob))):
            tag = page.tags[name]
            fmt = {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
            struct.pack_into(bo + fmt, data, tag.valueoffset + index * struct.calcsize(fmt), value)
    Path(dst).write_bytes(bytes(data) + blob)
    return Path(dst)


def lying_dimensions(src: Path, dst: Path, width: int, height: int) -> Path:
    """``src`` whose first page claims ``width`` x ``height`` pixels while its tile tables still
    hold the real image's tiles (its ImageWidth and ImageLength tags rewritten)."""
    import tifffile

    data = bytearray(Path(src).read_bytes())
    with tifffile.TiffFile(src) as tif:
        page, bo = tif.pages[0], tif.byteorder
        for name, value in (("ImageWidth", width), ("ImageLength", height)):
            tag = page.tags[name]
            struct.pack_into(bo + {3: "H", 4: "I"}[int(tag.dtype)], data, tag.valueoffset, value)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def shorten_tile_offsets(src: Path, dst: Path) -> Path:
    """``src`` whose first IFD's TileOffsets count is cut to 3: tifffile then holds fewer offsets
    than the tile grid has tiles (a malformed IFD)."""
    import tifffile

    data = bytearray(Path(src).read_bytes())
    with tifffile.TiffFile(src) as tif:
        page = tif.pages[0]
        tag = page.tags["TileOffsets"]
        bo = tif.byteorder
        count_fmt = "Q" if tif.is_bigtiff else "I"
        # the entry: tag (H), type (H), count, value/offset; count sits 4 bytes into it
        struct.pack_into(bo + count_fmt, data, tag.offset + 4, 3)
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def garble_description(src: Path, dst: Path) -> Path:
    """``src`` whose ImageDescription holds bytes no codec decodes as text, ANSI escape included."""
    import tifffile

    data = bytearray(Path(src).read_bytes())
    with tifffile.TiffFile(src) as tif:
        tag = tif.pages[0].tags["ImageDescription"]
        off, n = tag.valueoffset, tag.count
    junk = (b"Aperio Ima" + b"\x81\x1b[31mEVIL\x9d" * n)[: n - 1]
    data[off : off + n - 1] = junk
    Path(dst).write_bytes(bytes(data))
    return Path(dst)


def huge_claim_tiff(path: Path, side: int = 1_000_000, tile: int = 1024) -> Path:
    """A 7.6 MB BigTIFF claiming ``side`` x ``side`` RGB pixels: every tile empty (sparse)."""
    n_tiles = ((side + tile - 1) // tile) ** 2
    with open(path, "wb") as f:
        bo = "<"
        # BigTIFF header, one IFD right after it, tile tables after the IFD
        ifd_at = 16
        n_entries = 10
        tables_at = ifd_at + 8 + n_entries * 20 + 8
        offsets_at = tables_at
        counts_at = offsets_at + 4 * n_tiles

        def entry(tag: int, typ: int, count: int, value: int) -> bytes:
            return struct.pack(bo + "HHQQ", tag, typ, count, value)

        bits = struct.unpack(bo + "Q", struct.pack(bo + "HHHH", 8, 8, 8, 0))[0]  # inline: 6 bytes
        entries = [entry(256, 4, 1, side), entry(257, 4, 1, side),
                   entry(258, 3, 3, bits), entry(259, 3, 1, 1), entry(262, 3, 1, 2),
                   entry(277, 3, 1, 3), entry(322, 3, 1, tile), entry(323, 3, 1, tile),
                   entry(324, 4, n_tiles, offsets_at), entry(325, 4, n_tiles, counts_at)]
        f.write(b"II" + struct.pack(bo + "HHHQ", 43, 8, 0, ifd_at))
        f.write(struct.pack(bo + "Q", n_entries) + b"".join(entries) + struct.pack(bo + "Q", 0))
        f.seek(counts_at + 4 * n_tiles - 1)
        f.write(b"\0")
    return Path(path)


# -- genome -------------------------------------------------------------------------------------


def write_fasta(path: Path, contigs: dict[str, str], width: int = 60) -> Path:
    """A FASTA with ``width`` bases per line and its .fai written by pysam (samtools faidx)."""
    import pysam

    with open(path, "w") as f:
        for name, seq in contigs.items():
            f.write(f">{name}\n")
            for i in range(0, len(seq), width):
                f.write(seq[i : i + width] + "\n")
    pysam.faidx(str(path))
    return Path(path)


def edit_fai(path: Path, contig: str, **changes: int) -> None:
    """Change fields (length, offset, line_bases, line_width) of one contig's .fai line."""
    fai = Path(f"{path}.fai")
    fields = ("length", "offset", "line_bases", "line_width")
    lines = []
    for line in fai.read_text().splitlines():
        cols = line.split("\t")
        if cols[0] == contig:
            for key, value in changes.items():
                cols[1 + fields.index(key)] = str(value)
        lines.append("\t".join(cols))
    fai.write_text("\n".join(lines) + "\n")


def random_sequence(n: int, seed: int = 0) -> str:
    return "".join(np.random.default_rng(seed).choice(list("ACGT"), n))


# -- specs --------------------------------------------------------------------------------------


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """The billion-laughs YAML: each level is ``width`` aliases of the one before (about 800 bytes)."""
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, levels):
        refs = ",".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + "\n"


def deep_yaml(depth: int = 100_000) -> str:
    """A flow sequence nested ``depth`` deep: ``[[[[...]]]]``."""
    return "name: " + "[" * depth + "]" * depth + "\n"


CONTROL_NAME = "evil\n2026-01-01 gpubatch INFO all fine\x1b[31m\u202egnp.tif"


def environ_without_aws() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}


def svs_with_label_and_macro(path: Path, width: int = 2048, height: int = 1536, seed: int = 3,
                             mpp: str = "0.25") -> Path:
    """A synthetic Aperio SVS (OpenSlide reads it as ``aperio``): one tiled JPEG level at 0.25 mpp,
    a thumbnail, a random-noise label and a two-colour macro image, and a private scanner field
    (``aperio.ScannerSecret``) in its description."""
    import tifffile

    from gpubatch.cli.demo import _TissueScene

    rng = np.random.default_rng(seed)
    lib = "Aperio Image Library v12.0.15\r\n"
    label = rng.integers(0, 256, (300, 280, 3), dtype=np.uint8)
    macro = np.zeros((400, 1000, 3), np.uint8)
    macro[:, :500], macro[:, 500:] = (200, 30, 30), (20, 200, 90)
    macro[100:300, 100:900] = rng.integers(0, 256, (200, 800, 3), dtype=np.uint8)
    level0 = f"{lib}{width}x{height} [0,0 {width}x{height}] (256x256) JPEG/RGB Q=70|AppMag = 40|MPP = {mpp}" \
             "|ScannerSecret = private-scanner-7"
    with tifffile.TiffWriter(path) as tif:
        tif.write(_TissueScene(width, height, seed).tiles(width, height, 1, 256), shape=(height, width, 3),
                  dtype=np.uint8, tile=(256, 256), compression="jpeg", photometric="rgb", description=level0,
                  metadata=None)
        tif.write(np.full((height // 8, width // 8, 3), 230, np.uint8), photometric="rgb", compression="jpeg",
                  description=f"{lib}{width}x{height} -> {width // 8}x{height // 8} - |AppMag = 40|MPP = {mpp}",
                  metadata=None)
        tif.write(label, photometric="rgb", compression="lzw", description=f"{lib}label 280x300", subfiletype=1,
                  metadata=None)
        tif.write(macro, photometric="rgb", compression="jpeg", description=f"{lib}macro 1000x400", subfiletype=9,
                  metadata=None)
    return path
