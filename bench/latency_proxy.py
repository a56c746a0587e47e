"""A TCP proxy on loopback that adds a fixed latency to every request, in its own process.

    python bench/latency_proxy.py UPSTREAM_PORT --latency-ms 80     (prints "PORT <n>" once listening)

Bytes from the client are held for the latency before they go upstream (each chunk on its own
clock, so requests pipelined or sent on many connections each wait the latency once, not one
after another); bytes from the server go straight back. Every request therefore waits one added
round trip, as it would from a worker to a distant object store, while the proxy itself parses
nothing: one asyncio loop copying bytes, so its CPU (reported by the benchmark) stays small.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

CHUNK = 1 << 20


async def _upstream_delayed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency_s: float) -> None:
    """Client -> server: every chunk leaves ``latency_s`` after it arrived, in order."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(CHUNK)
            await queue.put((time.monotonic() + latency_s, data))
            if not data:
                break
        await sender
    except (ConnectionError, OSError):
        sender.cancel()


async def _downstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Server -> client, as it comes."""
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def _handler(upstream_port: int, latency_s: float):  # type: ignore[no-untyped-def]
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_upstream_delayed(client_r, server_w, latency_s), _downstream(server_r, client_w),
                             return_exceptions=True)
        server_w.close()

    return handle


async def _serve(upstream_port: int, latency_s: float, port: int) -> None:
    server = await asyncio.start_server(_handler(upstream_port, latency_s), "127.0.0.1", port)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("upstream_port", type=int)
    ap.add_argument("--latency-ms", type=float, default=0.0)
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    asyncio.run(_serve(args.upstream_port, args.latency_ms / 1000, args.port))


if __name__ == "__main__":
    sys.exit(main())
