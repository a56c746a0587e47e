"""The fixed cost of a slide: a whole ``gpubatch.run`` over many small slides (a biopsy's 16 tiles
each), two versions of gpubatch side by side, alternating fresh processes.

    python bench/bench_small_slides.py --before /path/to/old/checkout [--after .] [--slides 100]
        [--profile inline|local] [--formats parquet zarr] [--heatmap] [--repeats 3]

Each process imports gpubatch from its tree, then times one ``gpubatch.run`` (fresh output,
``overwrite=True``) of ``--slides`` synthetic slides of 128 x 128 px (16 tiles of 32 px, no tissue
filter, a one-output ONNX model). The figures are milliseconds per slide, wall and CPU, the median
over the repeats. CPU is the run process's own plus that of its children once they have exited
(the ``local`` profile's Dask workers), so it counts every process's work, not threads waiting.
The last repeat's report.json stages (busy seconds summed over shards) are printed beside, per
slide. Under the ``local`` profile the wall includes the cluster's start: use more slides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_slide_memory import embedding_model, tiny_slides  # noqa: E402
from bench_slide_memory import job as slides_job  # noqa: E402
from common import WORK  # noqa: E402

CHILD = r'''
import json, resource, sys, time
t_import = time.perf_counter()
import gpubatch
from gpubatch.runtime import runner  # noqa: F401  (imports are not the run's)
t0, c0 = time.perf_counter(), time.process_time()
result = gpubatch.run(sys.argv[1], overwrite=True)
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"wall": wall, "cpu": cpu, "children_cpu": kids.ru_utime + kids.ru_stime,
                  "package": gpubatch.__file__}))
'''


def job(tree: str, slides: list[Path], model: Path, formats: list[str], profile: str) -> Path:
    """A job file for ``tree`` (each version writes its own output folder)."""
    name = f"small-{Path(tree).resolve().name}-{profile}-{len(slides)}"
    return slides_job(name, slides, model, formats, profile, folder="small")


def one(tree: str, path: Path) -> dict[str, float]:
    # -P: no current directory first on sys.path, which from a checkout's root shadowed ``tree``
    out = subprocess.run([sys.executable, "-P", "-c", CHILD, str(path)], capture_output=True, text=True, check=False,
                         env={"PYTHONPATH": tree, "PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    row = dict(json.loads(out.stdout.strip().splitlines()[-1]))
    if not Path(row.pop("package")).is_relative_to(Path(tree).resolve()):
        raise RuntimeError(f"the child imported gpubatch from outside {tree}")
    spec = yaml.safe_load(path.read_text())
    report = json.loads((Path(spec["output"]["uri"]) / "report.json").read_text())
    row["stages"] = report.get("stages", {})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the package root of the version to compare with")
    ap.add_argument("--after", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--profile", default="inline")
    ap.add_argument("--formats", nargs="+", default=["parquet", "zarr"])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    slides, model = tiny_slides(args.slides), embedding_model(WORK / "slidemem" / "emb1.onnx", 1)
    trees = [("before", args.before), ("after", args.after)]
    jobs = {name: job(root, slides, model, args.formats, args.profile) for name, root in trees}
    runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for r in range(args.repeats):
        for name, root in (trees if r % 2 == 0 else trees[::-1]):
            runs[name].append(one(root, jobs[name]))
    n = args.slides
    for name, rows in runs.items():
        wall = statistics.median(x["wall"] for x in rows) / n * 1e3
        cpu = statistics.median(x["cpu"] + x["children_cpu"] for x in rows) / n * 1e3
        stages = {k: round(v.get("busy_s", 0.0) / n * 1e3, 1) for k, v in rows[-1]["stages"].items()
                  if isinstance(v, dict)}
        print(f"{name}: {wall:.1f} ms wall, {cpu:.1f} ms CPU per slide ({n} slides of 16 tiles, {args.profile}, "
              f"{'+'.join(args.formats)}, median of {args.repeats}); stages' busy ms/slide: {json.dumps(stages)}")


if __name__ == "__main__":
    main()
