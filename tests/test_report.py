"""The report: verdict rules per layer on constructed summaries, summarize(), frames, terminal text."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gpubatch import report as rp
from gpubatch.core.results import ShardResult, failure_groups
from gpubatch.io.metrics import LATENCY_PREFIX
from gpubatch.outputs.store import OutputStore
from gpubatch.report.summary import host_cpu


def summary(starvation: float = 0.01, parts: dict[str, float] | None = None, **kw: Any) -> dict[str, Any]:
    """A summary as summarize() would write it, with just the figures the verdict reads."""
    busy = kw.pop("model_busy", 10.0)
    starved = busy * starvation / (1 - starvation)
    base: dict[str, Any] = {
        "items": 10_000, "items_per_s": 400.0, "wall_s": 25.0, "workers": 1, "starvation": starvation,
        "stages": {"model": {"busy_s": busy, "starved_s": starved, "blocked_s": kw.pop("blocked", 0.0)}},
        "parts": parts if parts is not None else {"compute": 9.0, "preprocess": 0.5, "storage": 1.0, "decode": 1.0},
        "batch_fill": 0.98, "batch_size": 64, "precision": "fp32", "readers": 4,
        "model_only_items_per_s": 1100.0,
        "shards": [{"items": 2000, "wall_s": 5.0}] * 5,
    }
    base.update(kw)
    return base


# ---------------------------------------------------------------------------------------------
# verdict, one layer at a time


def test_bands() -> None:
    assert rp.band(0.0) == "not input-bound"
    assert rp.band(0.049) == "not input-bound"
    assert rp.band(0.05) == "moderately input-bound"
    assert rp.band(0.199) == "moderately input-bound"
    assert rp.band(0.20) == "input-bound"


def test_storage_latency_bound_asks_for_readers_or_staging() -> None:
    v = rp.verdict(summary(0.35, {"storage": 8.0, "decode": 1.0, "compute": 5.0}, storage={"p99_ms": 240.0}))
    assert v["limiting_layer"] == rp.LAYER_STORAGE and v["detail"] == "storage reads"
    assert v["band"] == "input-bound"
    assert "run.readers from 4 to 8" in v["next_move"] and "input.access: stage" in v["next_move"]
    assert "35.0%" in v["evidence"] and "p99 latency 240 ms" in v["evidence"]
    assert "scale out" not in v["text"]


def test_decode_bound_asks_for_readers_and_gpu_decode() -> None:
    v = rp.verdict(summary(0.12, {"storage": 0.5, "decode": 6.0, "resample": 1.0, "compute": 5.0}))
    assert v["limiting_layer"] == rp.LAYER_STORAGE and v["detail"] == "decode on the host"
    assert v["band"] == "moderately input-bound"
    assert "run.readers" in v["next_move"] and "7.00 s decoding" in v["evidence"]


@pytest.mark.parametrize("kind", ["slides", "genome"])
def test_host_work_on_full_cores_asks_for_cores_not_threads(kind: str) -> None:
    """Decode (or window cutting) that starves the model while the workers' cores are full is
    CPU work: more reader threads would take turns on the same cores, so none are advised."""
    parts = {"storage": 0.5, "decode": 6.0, "compute": 5.0}
    full = rp.verdict(summary(0.12, parts, kind=kind, host_cpu={"busy": 0.97, "cores": 2}))
    assert "run.readers" not in full["next_move"] and "more cores" in full["next_move"]
    assert "the workers' 2 cores were 97% busy while shards ran" in full["evidence"]
    room = rp.verdict(summary(0.12, parts, kind=kind, host_cpu={"busy": 0.55, "cores": 2}))
    assert "run.readers from 4 to 8" in room["next_move"] and "55% busy" in room["evidence"]
    unmeasured = rp.verdict(summary(0.12, parts, kind=kind))
    assert "run.readers from 4 to 8" in unmeasured["next_move"] and "busy while" not in unmeasured["evidence"]
    quota = rp.verdict(summary(0.12, parts, kind=kind,
                               host_cpu={"busy": 0.99, "cores": 1.5, "quota": True, "throttled": 0.8}))
    assert "raise the workers' CPU quota" in quota["next_move"] and "run.readers" not in quota["next_move"]
    assert "1.5 cores (a CPU quota, throttled in 80% of its periods) were 99% busy" in quota["evidence"]


def test_core_use_counts_every_process_on_the_workers_cores() -> None:
    """A process spinning on each allowed core, outside this one, fills the cores' busy share."""
    from gpubatch.core.clocks import StageClocks
    from gpubatch.core.cpu import core_times, count_core_use

    cores = len(os.sched_getaffinity(0))
    spin = "import time\nt = time.time()\nwhile time.time() - t < 1.5: pass"
    procs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(cores)]
    try:
        time.sleep(0.3)  # started and spinning
        clocks, before = StageClocks(), core_times()
        time.sleep(0.8)
        count_core_use(clocks, before)
    finally:
        for p in procs:
            p.wait(timeout=30)
    figure = host_cpu(clocks.counters, clocks.peaks)
    assert figure is not None and figure["cores"] == cores and figure["busy"] > 0.85


def test_shard_setup_counts_under_storage_host_transport() -> None:
    v = rp.verdict(summary(0.01, {"open": 30.0, "compute": 8.0, "storage": 0.1}))
    assert v["limiting_layer"] == rp.LAYER_STORAGE and v["detail"] == "per-shard setup"
    assert "30.00 s" in v["evidence"] and "input.access: stage" in v["next_move"]


def test_setup_and_starvation_together_name_the_costlier_and_keep_both() -> None:
    v = rp.verdict(summary(0.25, {"open": 40.0, "storage": 3.0, "decode": 1.0, "compute": 8.0}))
    assert v["detail"] == "per-shard setup"
    assert "also the model waited for data" in v["evidence"]


def test_output_bound() -> None:
    v = rp.verdict(summary(0.01, blocked=3.0))
    assert v["limiting_layer"] == rp.LAYER_STORAGE and v["detail"] == "output writes"
    assert "output.formats" in v["next_move"]


def test_memory_transfer_bound() -> None:
    v = rp.verdict(summary(0.02, {"transfer": 4.0, "preprocess": 0.5, "compute": 6.0}))
    assert v["limiting_layer"] == rp.LAYER_TRANSFER
    assert "pinned" in v["next_move"] and "4.00 s" in v["evidence"]


def test_host_preprocess_is_a_transfer_problem() -> None:
    v = rp.verdict(summary(0.02, {"preprocess": 3.0, "compute": 6.0}))
    assert v["limiting_layer"] == rp.LAYER_TRANSFER and "on the device" in v["next_move"]


def test_under_filled_batches_ask_for_a_larger_batch() -> None:
    v = rp.verdict(summary(0.02, batch_fill=0.4))
    assert v["limiting_layer"] == rp.LAYER_BATCHING
    assert "model.batch_size" in v["next_move"] and "40% full" in v["evidence"]


def test_small_batch_size_is_batching() -> None:
    v = rp.verdict(summary(0.02, batch_size=4))
    assert v["limiting_layer"] == rp.LAYER_BATCHING and v["detail"] == "small batches"
    few_bytes = rp.verdict(summary(0.02, batch_size=4, batch_input_bytes=4 * 1000 * 4 * 4))
    assert few_bytes["limiting_layer"] == rp.LAYER_BATCHING and "0.1 MB of input" in few_bytes["evidence"]


def _tuned(chosen: int, speeds: dict[int, float], stopped_by: str) -> dict[str, Any]:
    """The report's ``tuning`` as batch_size: auto writes it (resolve.py, TuneResult.as_dict)."""
    curve = [{"batch_size": b, "items_per_s": ips, "peak_mb": 1.0, "batch_s": b / ips} for b, ips in speeds.items()]
    return {"batch_size": chosen, "cached": False, "key": "k", "stopped_by": stopped_by, "curve": curve}


def test_small_batches_chosen_by_auto_are_not_advised_to_be_raised() -> None:
    """The verdict advised "raise model.batch_size (or batch_size: auto)" of a run whose
    batch_size: auto had chosen 1 (larger batches measured no faster) or 4 (the largest its sweep
    could take): advice the run had already followed."""
    flat = _tuned(1, {1: 400.0, 2: 405.0, 4: 402.0}, "reached max batch 4")
    v = rp.verdict(summary(0.02, batch_size=1, tuning=flat))
    assert v["limiting_layer"] == rp.LAYER_COMPUTE  # the sweep measured batching is not the limit
    assert "raise model.batch_size" not in v["text"]
    stopped = "batch 8 failed (RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB)"
    capped = _tuned(4, {1: 100.0, 2: 190.0, 4: 350.0}, stopped)
    v = rp.verdict(summary(0.02, batch_size=4, tuning=capped))
    assert v["limiting_layer"] == rp.LAYER_BATCHING and "raise model.batch_size" not in v["next_move"]
    assert "auto chose 4, the largest batch its sweep could take" in v["next_move"] and stopped in v["next_move"]
    low_fill = rp.verdict(summary(0.02, batch_size=1, batch_fill=0.5, tuning=flat))
    assert "larger batches measured no faster" in low_fill["next_move"]
    # a size from the spec, or an auto run with nothing to tune on, is still advised to be raised
    for tuning in (None, {"batch_size": 4, "skipped": "no items"}):
        assert "raise model.batch_size" in rp.verdict(summary(0.02, batch_size=4, tuning=tuning))["next_move"]


def test_few_large_items_per_batch_are_not_small_batches() -> None:
    """Four 100 kb genome windows are 6.4 MB of input per call: per-call overhead is not the limit."""
    v = rp.verdict(summary(0.02, batch_size=4, batch_input_bytes=4 * 100_000 * 4 * 4))
    assert v["limiting_layer"] != rp.LAYER_BATCHING


def test_partial_batches_from_tiny_shards_are_not_fixed_by_a_larger_batch() -> None:
    v = rp.verdict(summary(0.02, batch_fill=0.3, shards=[{"items": 20, "wall_s": 1.0}] * 10))
    assert v["detail"] == "partial batches at shard ends"
    assert "several small inputs in one shard" in v["next_move"]


def test_compute_bound_fp32_asks_for_reduced_precision_not_scale_out() -> None:
    v = rp.verdict(summary(0.01))
    assert v["limiting_layer"] == rp.LAYER_COMPUTE
    assert "int8" in v["next_move"] and "scale out" not in v["next_move"]


def test_scale_out_only_when_fed_compute_bound_and_reduced() -> None:
    v = rp.verdict(summary(0.01, precision="int8"))
    assert v["limiting_layer"] == rp.LAYER_COMPUTE and v["next_move"].startswith("scale out")
    for starved in (0.06, 0.3):  # not fed: never scale out, even at int8
        assert "scale out" not in rp.verdict(summary(starved, precision="int8"))["text"]


def test_refused_int8_suggests_fp16_before_scaling_out() -> None:
    q = {"requested": "int8", "used": "fp32", "passed": False}
    v = rp.verdict(summary(0.01, quantization=q))
    assert v["limiting_layer"] == rp.LAYER_COMPUTE and "int8 failed the validation gate" in v["evidence"]
    assert v["next_move"].startswith("try model.precision: fp16 or bf16")


@pytest.mark.parametrize(("q", "said"), [
    ({"requested": "bf16", "used": "fp32", "note": "bf16 ONNX conversion is not provided; ...",
      "cause": "gpubatch makes no bf16 ONNX model"}, "bf16 was requested; gpubatch makes no bf16 ONNX model: ran fp32"),
    ({"requested": "int8", "used": "fp32", "passed": False, "fell_back_to": "fp32", "reason": "m.onnx could not ...",
      "cause": "the model could not be converted to int8"},
     "int8 was requested; the model could not be converted to int8: ran fp32"),
    ({"requested": "int8", "passed": False, "fell_back_to": "fp32", "reason": "precision int8 is explicit QDQ ..."},
     "int8 was requested; the model cannot run it: ran fp32"),  # a report from before refusals said `used`
])
def test_a_precision_that_could_not_run_is_no_failed_gate(q: dict[str, Any], said: str) -> None:
    """A fallback where no gate ran was said to have failed the gate (bf16 on ONNX), or, with no
    `used` recorded (a refusal), not noticed at all."""
    v = rp.verdict(summary(0.01, quantization=q))
    assert said in v["evidence"] and "validation gate" not in v["evidence"]
    assert v["next_move"].startswith(f"make {q['requested']} runnable as report.json's quantization.reason says")


def test_gap_falls_back_to_the_measured_model_speed() -> None:
    v = rp.verdict(summary(0.01, model_only_items_per_s=None, model_only_items_per_s_measured=500.0))
    assert v["gap"]["cost"] == pytest.approx(1 - 400 / 500)


def test_gap_says_what_the_data_path_costs() -> None:
    v = rp.verdict(summary(0.3, items_per_s=38.0, model_only_items_per_s=830.0))
    assert v["gap"]["cost"] == pytest.approx(1 - 38 / 830)
    assert "the data path costs 95% of the model's speed: 38.0 items/s end-to-end against 830.0 items/s model-only" in v["text"].lower()


def test_gap_without_model_only_and_short_run_caveat() -> None:
    v = rp.verdict(summary(0.01, model_only_items_per_s=None, wall_s=100.0, workers=2))
    assert v["gap"]["cost"] is None and v["gap"]["text"] == ""
    assert "short run" in v["caveat"]
    assert rp.verdict(summary(0.01))["caveat"] == ""


# ---------------------------------------------------------------------------------------------
# summarize + frames on constructed shard summaries


def shard(i: int, start: float, items: int, batches: int, retries: int = 0) -> dict[str, Any]:
    per = items // batches
    samples = [{"t": 0.1 * (b + 1), "items": per, "busy_s": 0.08, "starved_s": 0.02, "queue_depth": b % 3}
               for b in range(batches)]
    counters = {"storage.requests": 10.0, "storage.bytes": 1e6, "storage.retries": float(retries),
                f"{LATENCY_PREFIX}2": 6.0, f"{LATENCY_PREFIX}45.255": 3.0, f"{LATENCY_PREFIX}inf": 1.0}
    return {
        "shard_id": f"s{i}", "input": f"/data/s{i}.svs", "items": per * batches, "wall_s": 0.1 * batches,
        "start": start, "host": "h", "clocks": {
            "stages": {"read": {"busy_s": 1.0, "starved_s": 0.0, "blocked_s": 0.2},
                       "model": {"busy_s": 0.08 * batches, "starved_s": 0.02 * batches, "blocked_s": 0.0},
                       "write": {"busy_s": 0.1, "starved_s": 0.5, "blocked_s": 0.0}},
            "parts": {"open": 0.5, "storage": 0.4, "decode": 0.3, "preprocess": 0.05, "compute": 0.6},
            "counters": counters, "samples": samples}}


@pytest.fixture()
def built() -> dict[str, Any]:
    shards = [shard(0, 1000.0, 64, 4), shard(1, 1001.0, 96, 6, retries=2)]
    failed = [{"input": "/data/bad.svs", "error": "not a slide: truncated TIFF"}]
    return rp.summarize([ShardResult.from_dict(s) for s in shards], failed, 3.0,
                        {"name": "t", "batch_size": 16, "workers": 1, "readers": 2, "precision": "fp32"}).to_dict()


def test_summarize_document(built: dict[str, Any]) -> None:
    assert built["items"] == 160 and built["items_per_s"] == pytest.approx(160 / 3.0)
    assert built["starvation"] == pytest.approx(0.2)
    assert built["storage"]["requests"] == 20 and built["storage"]["retries"] == 2
    assert built["storage"]["p50_ms"] is not None
    assert built["verdict"]["limiting_layer"] in rp.LAYERS and built["verdict"]["gap"]["text"]
    assert [s["retries"] for s in built["shards"]] == [0, 2]
    # sample times count from the pipeline's start, which follows the shard's setup (open)
    assert built["timeline"][0]["t"] == pytest.approx(0.5 + 0.1)
    json.dumps(built)


def test_frames(built: dict[str, Any]) -> None:
    tl = rp.timeline_frame(built)
    assert list(tl.columns) == ["t", "items", "busy_s", "starved_s", "queue_depth", "shard"] and len(tl) == 10
    tf = rp.throughput_frame(built)
    assert tf["items"].sum() == 160
    width = tf["t_end"].iloc[0] - tf["t_start"].iloc[0]
    assert tf["items_per_s"].sum() * width == pytest.approx(160)
    assert tf["starvation"].dropna().between(0, 1).all()
    st = rp.stage_frame(built).set_index("stage")
    assert st.loc["model", "starvation"] == pytest.approx(0.2)
    pf = rp.parts_frame(built)
    assert pf["share"].sum() == pytest.approx(1.0)
    assert pf.set_index("part").loc["open", "layer"] == rp.LAYER_STORAGE
    sf = rp.shard_frame(built)
    assert list(sf["status"]) == ["done", "done", "failed"]
    assert sf.iloc[2]["error"].startswith("not a slide") and math.isnan(sf.iloc[2]["wall_s"])
    lf = rp.latency_frame(built)
    assert list(lf.loc[lf["count"] > 0, "count"]) == [12, 6, 2] and math.isinf(lf["upper_ms"].iloc[-1])
    assert (lf["lower_ms"].iloc[1:].to_numpy() == lf["upper_ms"].iloc[:-1].to_numpy()).all()  # contiguous
    assert lf["share"].sum() == pytest.approx(1.0)


def test_frames_of_an_empty_run() -> None:
    empty = {"items": 0, "stages": {}, "parts": {}, "counters": {}, "shards": [], "failed": [], "timeline": []}
    for fn in (rp.timeline_frame, rp.throughput_frame, rp.stage_frame, rp.parts_frame, rp.shard_frame,
               rp.latency_frame):
        assert fn(empty).empty


def test_bucket_width_is_round() -> None:
    assert rp.bucket_width(10.0, 40) == 0.5
    assert rp.bucket_width(3600.0, 40) == 100.0


def test_format_summary_and_roundtrip(built: dict[str, Any], tmp_path: Path) -> None:
    text = rp.format_summary(built)
    assert "verdict: limited by" in text and "next:" in text and "storage: 20 requests" in text
    assert "quarantined 1 input(s)" in text and "/data/bad.svs" in text
    assert built["host_cpu"] is None and "  cores:" not in text  # not measured: not shown
    measured = rp.format_summary({**built, "host_cpu": {"busy": 0.5, "cores": 4}})
    assert "  cores: the workers' 4 cores were 50% busy while shards ran" in measured
    few = rp.format_summary({**built, "failed": [{"input": f"v.vcf line {n}", "error": "x"} for n in range(20)]})
    assert "quarantined 20 input(s):" in few and "  v.vcf line 19: x" in few  # few: each one
    rp.write_report(tmp_path, built)
    assert rp.load_report(tmp_path)["verdict"] == json.loads(json.dumps(built["verdict"]))


def test_counts_of_one_are_said_in_the_singular(built: dict[str, Any]) -> None:
    """A run of one item, one storage request and one retry printed "1 items", "1 requests",
    "1 retries"; zero and many keep the plural."""
    from gpubatch.report.html import render_html

    one = {**built, "items": 1, "storage": {**built["storage"], "requests": 1, "retries": 1, "client_requests": 0}}
    text = rp.format_summary(one)
    assert "t: 1 item in " in text and "storage: 1 request " in text and ", 1 retry" in text, text
    assert '<div class="v">1</div><div class="k">item in ' in render_html(one)
    many = rp.format_summary({**built, "storage": {**built["storage"], "retries": 0}})
    assert "t: 160 items in " in many and "storage: 20 requests " in many and ", 0 retries" in many, many


def test_five_thousand_failures_print_as_counts_by_error(built: dict[str, Any]) -> None:
    """5,000 quarantined slides of three errors (each naming its byte offset or its own file):
    three lines with their counts and first inputs, not 20 inputs and "4980 more"."""
    kinds = ["InputError: not a TIFF file (byte {n})", "TimeoutError: {uri} read timed out after 30 s",
             "SlideOpenError: truncated JPEG tile {n} at level 0"]
    failed = [{"input": f"/data/s{n:05d}.tif", "error": kinds[n % 7 % 3].format(n=n, uri=f"/data/s{n:05d}.tif")}
              for n in range(5000)]
    groups = failure_groups(failed)
    assert [g["count"] for g in groups] == [2143, 1429, 1428] and sum(g["count"] for g in groups) == 5000
    assert groups[0]["error"] == "InputError: not a TIFF file (byte 0)"
    assert groups[0]["inputs"] == ["/data/s00000.tif", "/data/s00003.tif", "/data/s00006.tif"]
    text = rp.format_summary({**built, "failed": failed})
    assert "quarantined 5000 input(s): 3 distinct error(s)" in text and "report.json's failed" in text
    assert "  2143 x InputError: not a TIFF file (byte 0)  (/data/s00000.tif, /data/s00003.tif" in text
    assert "  1429 x TimeoutError: /data/s00001.tif read timed out" in text
    assert len(text.splitlines()) < 60  # the summary's own lines and three, not one per input
    many = rp.format_summary({**built, "failed": [{"input": f"/d/{n}", "error": f"E{n % 13}: bad {chr(97 + n % 13)}"}
                                                  for n in range(130)]})
    assert "  ... and 3 more error(s) of 30 input(s)" in many


def test_load_report_refreshes_an_old_verdict(built: dict[str, Any], tmp_path: Path) -> None:
    old = {**built, "verdict": {"band": "x", "text": "old"}}
    old.pop("storage")
    rp.write_report(tmp_path, old)
    loaded = rp.load_report(tmp_path)
    assert "gap" in loaded["verdict"] and loaded["storage"]["requests"] == 20
    with pytest.raises(FileNotFoundError, match="no report.json"):
        rp.load_report(tmp_path / "nowhere")


def test_stage_time_by_part_adds_up_names_the_turn_and_shows_other_over_5_percent() -> None:
    """The genome run of issue 17: model busy 14.2 s, compute 7.4 s and preprocess 0.6 s timed;
    with the turn-taking, output conversion and the remainder as parts nothing is unaccounted."""
    stage_parts = {"model": {"compute": 7.4, "preprocess": 0.6, "turn": 5.1, "output": 0.3},
                   "read": {"decode": 3.0, "storage": 0.96, "batch": 1.0}}
    clocks = {"stages": {"model": {"busy_s": 14.2, "starved_s": 0.1, "blocked_s": 0.0},
                         "read": {"busy_s": 5.0, "starved_s": 0.0, "blocked_s": 3.0}},
              "parts": {"compute": 7.4, "preprocess": 0.6, "decode": 3.0, "storage": 0.96, "open": 0.2},
              "stage_parts": stage_parts, "counters": {},
              "samples": [{"t": 0.1 * i, "items": 64, "busy_s": 0.01, "starved_s": 0.0} for i in range(20)]}
    result = ShardResult.from_dict({"shard_id": "g", "input": "genome.fa", "items": 100_000, "wall_s": 15.0,
                                    "clocks": clocks})
    doc = rp.summarize([result], [], 16.0, {"batch_size": 64, "workers": 1, "kind": "genome"}).to_dict()
    split = doc["stage_parts"]
    assert sum(split["model"].values()) == pytest.approx(14.2) and split["model"]["other"] == pytest.approx(0.8)
    assert sum(split["read"].values()) == pytest.approx(5.0) and split["read"]["other"] == pytest.approx(0.04)
    text = rp.format_summary(doc)
    assert "compute 7.40, turn 5.10, other 0.80, preprocess 0.60, output 0.30 s" in text
    assert "batch 1.00, storage 0.96 s" in text  # read's other (0.04 s, under 5%) is not shown
    assert "setup: opening shards 0.20 s" in text and "time by part" not in text
    assert doc["verdict"]["limiting_layer"] == rp.LAYER_COMPUTE
    assert "5.10 s waiting its turn behind the worker's other shard" in doc["verdict"]["evidence"]
    assert "0.80 s in no timed call" in doc["verdict"]["evidence"]


def test_the_same_note_of_many_inputs_is_one_line_that_counts_them() -> None:
    """A thousand NDPI slides each noted 'not checked' made a thousand lines (200 listed)."""
    same = "tiles.integrity: strict, but its tile data is not checked: openslide reads it as hamamatsu"
    shards = [ShardResult(f"s{i}", f"/data/slide{i}.ndpi", items=1, wall_s=1.0, attrs={"notes": [same]})
              for i in range(1000)]
    shards.append(ShardResult("odd", "/data/odd.svs", items=1, wall_s=1.0, attrs={"notes": ["its own note"]}))
    notes = rp.summarize(shards, [], 3.0, {}).to_dict()["notes"]
    assert notes == [f"1000 inputs (/data/slide0.ndpi, /data/slide1.ndpi, /data/slide2.ndpi, ...): {same}",
                     "/data/odd.svs: its own note"]


def test_report_json_reads_back_as_written_one_top_level_key_per_line(tmp_path: Path) -> None:
    from gpubatch.report.summary import load_report, write_report

    summary = {"items": 3, "verdict": "ok \u00e9", "stages": {"model": {"busy_s": 1.5}},
               "timeline": [[0.0, 1, None], [0.5, 2, 3.25]], "failed": [], "notes": ["a\nb"]}
    write_report(str(tmp_path), summary)
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text) == summary
    assert text.splitlines()[1].startswith(' "items": 3') and len(text.splitlines()) == len(summary) + 2
    assert load_report(str(tmp_path))["timeline"] == summary["timeline"]


def test_the_summary_says_which_storage_retries_were_throttling_and_which_lost_workers_memory() -> None:
    """report.json counted throttled retries and the memory cause of a lost worker, but the
    terminal summary and report.html said neither: "5 retries" read the same as flaky storage."""
    from gpubatch.report.text import operator_lines, retries_words

    storage = {"requests": 40, "bytes": 4e6, "retries": 5, "library_retries": 1, "throttled": 3}
    assert retries_words(storage) == "5 retries (1 by client libraries; 3 throttled)"
    assert retries_words({"retries": 2}) == "2 retries"
    lost = {"lost_workers": [{"worker": "tcp://10.0.0.7:4001", "time": 0, "shards": ["s-1"],
                              "cause": "killed by its nanny for memory: 3 GiB in use"}]}
    text = "\n".join(operator_lines(lost))
    assert "s-1 (killed by its nanny for memory: 3 GiB in use)" in text, text


def test_a_report_of_an_unfinished_output_streams_its_commit_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gpubatch report` of an interrupted run folds what is committed: it held every commit
    record at once (10,000 slides: 214 MB and 18 s, against 85 MB); now one batch at a time."""
    import gc

    from gpubatch.outputs.ledger import Ledger
    from gpubatch.outputs.manifest import READ_BATCH, Manifest
    from gpubatch.report.summary import SummaryBuilder, summarize_output

    n = READ_BATCH * 2 + 10
    manifest = Manifest(OutputStore(str(tmp_path)))
    for i in range(n):
        manifest.record(ShardResult(f"s{i:04d}", f"/data/s{i:04d}.tif", items=3, wall_s=1.0, part=f"s{i:04d}.parquet"))
    Ledger(OutputStore(str(tmp_path)), "r1").failure(ShardResult.failure("bad", "/data/bad.tif", "x", retryable=False))
    alive: list[int] = []
    add = SummaryBuilder.add

    def add_and_count(self: SummaryBuilder, result: ShardResult) -> None:
        add(self, result)
        if self.shards == n:  # the last record: how many are held
            alive.append(sum(isinstance(o, ShardResult) for o in gc.get_objects()))

    monkeypatch.setattr(SummaryBuilder, "add", add_and_count)
    report = summarize_output(tmp_path)
    assert report["shards_done"] == n and report["items"] == 3 * n
    assert [f["input"] for f in report["failed"]] == ["/data/bad.tif"]
    assert alive and alive[0] < 10
