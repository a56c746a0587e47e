"""What staging slides costs in CPU: gpubatch's download (client), the S3 server and the proxy.

    python bench/bench_stage_cost.py [--slides 16] [--size 8192x8192] [--repeats 3] [--out F]

Staging a slide downloads all of it (every level, background tiles too) before its shard reads
it from local disk. On a machine whose cores also run the S3 server and the latency proxy, every
CPU second of the download, on either side, comes off the shards' decode and model time: this
sets the staged rows' ceiling in bench/bench_remote.py. The slides are uploaded to SeaweedFS
once; each round downloads all of them with gpubatch's stage cache (``StageCache._fetch_file``:
8 MB range requests, 8 in flight, written with pwrite), straight from the server and through
bench/latency_proxy.py at 0 ms, alternating, one slide after another. Reported per path: the
median seconds, this process's CPU (getrusage), the server's and the proxy's (psutil), and MB
per CPU second of each. The process's first download pays obstore's start and is not timed.
"""

from __future__ import annotations

import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_remote import BUCKET, KEY, SECRET, start_proxy, start_seaweedfs, stop_seaweedfs, upload  # noqa: E402
from bench_slides import make_workload  # noqa: E402
from common import WORK, publish, slides_bench_args  # noqa: E402


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    times = proc.cpu_times()
    return float(times.user + times.system)


def _download_all(slides: list[Path], port: int, into: Path) -> None:
    from gpubatch.core.clocks import StageClocks
    from gpubatch.io.retry import RetryPolicy
    from gpubatch.io.stage_cache import StageCache

    storage = {"endpoint_url": f"http://127.0.0.1:{port}", "key": KEY, "secret": SECRET,
               "client_kwargs": {"region_name": "us-east-1"}}
    cache = StageCache(str(into / "cache"), 1 << 40)
    for slide in slides:
        cache._fetch_file(f"s3://{BUCKET}/{slide.name}", str(into / "dl" / slide.name), slide.stat().st_size,
                          storage, RetryPolicy(), StageClocks())
    shutil.rmtree(into / "dl", ignore_errors=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args, (w, h) = slides_bench_args(__doc__, argv, slides=16, repeats=3)
    slides = make_workload("decode", args.slides, (w, h))["slides"]
    mb = sum(p.stat().st_size for p in slides) / 1e6
    tmp = Path(tempfile.mkdtemp(prefix="bench-stage-cost-", dir=WORK))
    weed, port = start_seaweedfs(tmp / "weed")
    proxy: subprocess.Popen | None = None
    runs: dict[str, list[tuple[float, float, float, float]]] = {"direct": [], "through the proxy": []}
    try:
        upload(port, slides)
        proxy, proxy_port = start_proxy(port, 0)
        server, relay = psutil.Process(weed.pid), psutil.Process(proxy.pid)
        _download_all(slides[:1], port, tmp)  # untimed: obstore's start
        paths = {"direct": (port, None), "through the proxy": (proxy_port, relay)}
        for r in range(args.repeats):
            for name in list(paths)[r % 2:] + list(paths)[: r % 2]:
                target, watched = paths[name]
                c0, s0, p0, t0 = _own_cpu(), _cpu(server), _cpu(watched), time.perf_counter()
                _download_all(slides, target, tmp)
                runs[name].append((time.perf_counter() - t0, _own_cpu() - c0, _cpu(server) - s0, _cpu(watched) - p0))
                print(f"  round {r + 1} {name}: {mb:.0f} MB in {runs[name][-1][0]:.2f} s, client cpu {runs[name][-1][1]:.2f} s", flush=True)
    finally:
        if proxy is not None:
            proxy.kill()
            proxy.wait()
        stop_seaweedfs(weed)
        shutil.rmtree(tmp, ignore_errors=True)
    rows = []
    for name, values in runs.items():
        wall, client, server_s, proxy_s = (statistics.median(v[i] for v in values) for i in range(4))
        rows.append({"path": name, "MB": mb, "median s": wall, "client cpu s": client, "server cpu s": server_s,
                     "proxy cpu s": proxy_s if name != "direct" else None,
                     "MB per client cpu s": mb / client if client else None,
                     "cpu ms per MB, all": 1e3 * (client + server_s + proxy_s) / mb})
    return publish("bench_stage_cost.py", rows, list(rows[0]), args.out, argv)


if __name__ == "__main__":
    main()
