"""report.html: self-contained, renders in headless Chromium, and requests nothing outside itself.

The Chromium tests need /usr/bin/chromium (`.ci/install-chromium.sh` installs it in CI); without
it they skip with that reason. The real-run fixture runs a tiny demo job in-process.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gpubatch import report as rp
from gpubatch.core.results import ShardResult
from gpubatch.io.metrics import LATENCY_PREFIX
from gpubatch.report.html import NO_VERDICT_TITLES, render_html, write_html

CHROMIUM = "/usr/bin/chromium"
PLOTS = ("throughput", "starvation", "queue", "breakdown", "stages", "latency")
needs_chromium = pytest.mark.skipif(
    shutil.which(CHROMIUM) is None,
    reason=f"{CHROMIUM} is absent: run .ci/install-chromium.sh (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real small run (2 synthetic slides, inline profile); returns its output folder."""
    import gpubatch
    from gpubatch.cli.demo import prepare_demo

    work = tmp_path_factory.mktemp("demo")
    job = prepare_demo(work, n_slides=2, size=(2048, 1536))
    result = gpubatch.run(job, profile="inline", show_progress=False, model__batch_size=2)
    return Path(result.output_uri)


def _shard(i: int, retries: int) -> dict[str, Any]:
    samples = [{"t": 0.2 * (b + 1), "items": 32, "busy_s": 0.05, "starved_s": 0.15 - 0.01 * b,
                "queue_depth": b % 4} for b in range(12)]
    latencies = {f"{LATENCY_PREFIX}{b:g}": n for b, n in ((8, 4), (11.314, 20), (16, 35), (22.627, 12),
                                                          (64, 3), (724.077, 1))}
    return {
        "shard_id": f"slide-{i}", "input": f"s3://bucket/slides/slide-{i}.svs", "items": 384, "wall_s": 2.4,
        "start": 100.0 + i, "host": "gpu-node", "clocks": {
            "stages": {"read": {"busy_s": 2.0, "starved_s": 0.0, "blocked_s": 0.1},
                       "model": {"busy_s": 0.6, "starved_s": 1.1, "blocked_s": 0.0},
                       "write": {"busy_s": 0.2, "starved_s": 1.4, "blocked_s": 0.0}},
            "parts": {"open": 0.4, "storage": 1.6, "decode": 0.5, "preprocess": 0.1, "transfer": 0.1,
                      "compute": 0.4, "write": 0.2},
            "counters": {"storage.requests": 75.0, "storage.bytes": 4.2e7, "storage.retries": float(retries),
                         **latencies},
            "samples": samples}}


@pytest.fixture(scope="module")
def constructed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A remote-storage run with latency buckets, retries and two quarantined inputs."""
    failed = [{"input": "s3://bucket/slides/broken.svs", "error": "not a slide: truncated TIFF"},
              {"input": "s3://bucket/slides/<odd>.svs", "error": "storage error (SlowDown) after 3 attempts"}]
    run_info = {"name": "remote-wsi", "kind": "slides", "backend": "tensorrt", "precision": "int8",
                "batch_size": 32, "workers": 2, "readers": 4, "gpubatch_version": "0.1.0"}
    shards = [ShardResult.from_dict(_shard(0, 0)), ShardResult.from_dict(_shard(1, 3))]
    summary = rp.summarize(shards, failed, 6.0, run_info).to_dict()
    out = tmp_path_factory.mktemp("constructed")
    rp.write_report(out, summary)
    return out


def _html(outdir: Path) -> str:
    return Path(write_html(str(outdir), rp.load_report(str(outdir)))).read_text()


@pytest.mark.parametrize("which", ["real_run", "constructed"])
def test_page_is_self_contained(which: str, request: pytest.FixtureRequest) -> None:
    html = _html(request.getfixturevalue(which))
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", html, re.I), "an outside URL in the page"
    # Heatmaps are inline PNGs (issue 18): a data: source is no request; any other source would be.
    assert not re.search(r"\b(src|href)\s*=(?!\"data:image/png;base64,)", html, re.I)
    assert "@import" not in html and "url(" not in html
    assert "Content-Security-Policy" in html and "default-src 'none'" in html
    for name in PLOTS:
        assert f'data-plot="{name}"' in html
    assert html.count("<svg") == len(PLOTS) and 'id="verdict"' in html


def test_constructed_page_content(constructed: Path) -> None:
    report = rp.load_report(constructed)
    html = render_html(report)
    latency = re.search(r'<svg[^>]*data-plot="latency".*?</svg>', html, re.S)
    assert latency and latency.group(0).count('class="bar"') == 6
    assert "no remote storage requests" not in html
    assert "not a slide: truncated TIFF" in html and "&lt;odd&gt;" in html and "<odd>" not in html
    assert 'class="failed"' in html and ">3<" in html  # the retries column
    assert f"Limited by {report['verdict']['limiting_layer']}" in html
    assert "items/s model-only" in html and "of model speed lost" in html


def test_five_thousand_failures_draw_their_errors_and_a_bounded_table(constructed: Path) -> None:
    """5,000 quarantined inputs drew 5,000 rows; now the first 200, with the errors above them
    by count (each input stays in report.json's failed)."""
    kinds = ["InputError: not a TIFF file (byte {n})", "SlideOpenError: truncated JPEG tile {n} at level 0"]
    failed = [{"input": f"/data/s{n:05d}.tif", "error": kinds[n % 2].format(n=n)} for n in range(5000)]
    html = render_html({**rp.load_report(constructed), "failed": failed})
    assert html.count('<tr class="failed">') == 200 + 2  # 200 inputs, two errors
    failures = re.search(r'<table id="failures">.*?</table>', html, re.S)
    assert failures and "<td>2,500</td>" in failures.group(0) and "not a TIFF file (byte 0)" in failures.group(0)
    assert "5,000 inputs quarantined, 2 distinct errors" in html and "/data/s04999.tif" not in html
    assert len(html) < 300_000


def test_real_run_without_remote_storage_says_so(real_run: Path) -> None:
    html = _html(real_run)
    assert "no remote storage requests" in html
    assert (real_run / "report.html").exists()


def test_cli_report_html(real_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gpubatch.cli.main import main

    (real_run / "report.html").unlink(missing_ok=True)
    assert main(["report", str(real_run), "--html"]) == 0
    out = capsys.readouterr().out
    # 12 tiles in a handful of batches: too little work to judge, and the summary says so
    assert "verdict: none (too little work for a verdict" in out and "report.html" in out
    assert (real_run / "report.html").stat().st_size > 5000


def _chromium(page: Path, profile: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", *extra, page.resolve().as_uri()]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)


def _page_requests(netlog: Path) -> list[str]:
    """Network URLs the page asked for. Chromium's own background fetches (updates, accounts)
    carry the initiator "not an origin"; anything a file:// page asks for carries "null"."""
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"]
            if e["type"] == start_job and "url" in e.get("params", {})
            and e["params"].get("initiator") != "not an origin"]


@needs_chromium
@pytest.mark.parametrize("which", ["real_run", "constructed"])
def test_renders_in_headless_chromium_offline(which: str, request: pytest.FixtureRequest,
                                              tmp_path: Path) -> None:
    outdir: Path = request.getfixturevalue(which)
    _html(outdir)
    netlog = tmp_path / "netlog.json"
    dom = _chromium(outdir / "report.html", tmp_path / "profile", f"--log-net-log={netlog}", "--dump-dom").stdout
    assert f'data-plots-rendered="{len(PLOTS)}/{len(PLOTS)}"' in dom, "the page's self-check found an unrendered plot"
    assert dom.count('data-rendered="yes"') == len(PLOTS)
    verdict = rp.load_report(outdir)["verdict"]
    if verdict.get("state", "verdict") == "verdict":
        assert f"Limited by {verdict['limiting_layer']}" in dom and "Next move:" in dom
    else:  # the real run's dozen tiles are too little work: the page says why, and gives no advice
        assert f'data-state="{verdict["state"]}"' in dom and NO_VERDICT_TITLES[verdict["state"]] in dom
        assert "Limited by" not in dom and "Next move:" not in dom
    assert _page_requests(netlog) == []


@needs_chromium
def test_request_check_sees_an_outside_request(tmp_path: Path) -> None:
    """The control for the test above: a page that does fetch from outside is caught."""
    page = tmp_path / "leaky.html"
    page.write_text('<!DOCTYPE html><html><body><img src="http://127.0.0.1:9/probe.png"></body></html>')
    netlog = tmp_path / "netlog.json"
    _chromium(page, tmp_path / "profile", f"--log-net-log={netlog}", "--dump-dom")
    assert _page_requests(netlog) == ["http://127.0.0.1:9/probe.png"]


@needs_chromium
def test_screenshot(constructed: Path, tmp_path: Path) -> None:
    _html(constructed)
    shot = tmp_path / "report.png"
    _chromium(constructed / "report.html", tmp_path / "profile", "--hide-scrollbars",
              "--window-size=1280,1800", f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_report_reads_only_the_heatmaps_it_shows(tmp_path: Path) -> None:
    """report.html inlines MAX_HEATMAPS pictures; it read every listed slide's (up to 2,000) to
    show them. Now it reads as many as it still wants, and slides without a picture are passed
    over, not shown short."""
    import io

    from PIL import Image

    from gpubatch.outputs.layout import HEATMAPS_DIR, heatmap_name
    from gpubatch.outputs.store import OutputStore
    from gpubatch.report.html import MAX_HEATMAPS, read_heatmaps

    store = OutputStore(str(tmp_path))
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    shards = [{"shard_id": f"s{i:04d}", "input": f"slide{i:04d}.tif"} for i in range(20 * MAX_HEATMAPS)]
    for shard in shards[5:]:  # the first five slides have none (quarantined)
        store.write_bytes(f"{HEATMAPS_DIR}/{heatmap_name(shard['shard_id'])}", png.getvalue())
    asked: list[str] = []
    real = store.read_many
    store.read_many = lambda names: asked.extend(names) or real(names)  # type: ignore[method-assign]
    found = read_heatmaps(store, {"shards": shards})
    assert [h.slide for h in found] == [f"slide{i:04d}.tif" for i in range(5, 5 + MAX_HEATMAPS)]
    assert len(asked) == MAX_HEATMAPS + 5
