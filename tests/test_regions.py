"""Regions: BED parsing and its errors, region strings, the tiling rule, and shard segments."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from gpubatch.core.errors import SpecError
from gpubatch.sources.genome import region_store
from gpubatch.sources.genome.reference import ContigTable
from gpubatch.sources.genome.regions import (
    WindowPlan,
    n_windows,
    overlap_note,
    padding_note,
    parse_bed,
    resolve_regions,
)

CONTIGS = ContigTable(("chr1", "chr2", "chrM"), (1000, 500, 16))


def write(tmp_path: Path, text: str, name: str = "regions.bed") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_bed_columns_strand_and_headers(tmp_path: Path) -> None:
    bed = write(tmp_path, "track name=x\n# comment\n\nchr1\t10\t30\nchr2\t0\t50\tpeak\t0\t-\nchr1 5 9\n")
    regions = parse_bed(bed)
    assert [(r.chrom, r.start, r.end, r.strand) for r in regions] == [
        ("chr1", 10, 30, "+"), ("chr2", 0, 50, "-"), ("chr1", 5, 9, "+")]
    assert regions[1].where == "regions.bed line 5"


def test_contigs_named_like_header_words_are_regions(tmp_path: Path) -> None:
    """``track``/``browser`` lines are the word alone before settings; contigs named track1 or
    browserX were skipped as headers, their regions silently left out."""
    bed = write(tmp_path, "browser position chr1:1-100\ntrack\tname=peaks\ntrack1\t10\t30\n"
                          "browserX 0 5\nchr2\t1\t9\n")
    assert [(r.chrom, r.start, r.end) for r in parse_bed(bed)] == [
        ("track1", 10, 30), ("browserX", 0, 5), ("chr2", 1, 9)]


@pytest.mark.parametrize(("line", "expect"), [
    ("chr1\t10", "at least 3"),
    ("chr1\tten\t20", "non-negative integers"),
    ("chr1\t-5\t20", "non-negative integers"),
    ("chr1\t30\t20", "must be greater than start"),
    ("chr1\t30\t30", "a 0-length interval (start = end = 30: a point between two bases, as for an insertion) "
                     "has no bases to put windows on; give it one base at least (end 31)"),
    ("chr1\t10\t20\tn\t0\tx", "strand"),
])
def test_malformed_bed_line_named(tmp_path: Path, line: str, expect: str) -> None:
    bed = write(tmp_path, f"chr1\t0\t10\n{line}\n")
    with pytest.raises(SpecError) as err:
        parse_bed(bed)
    path, message = err.value.problems[0]
    assert path == "windows.regions"
    assert "regions.bed line 2" in message and expect in message


def test_all_problems_listed_together(tmp_path: Path) -> None:
    bed = write(tmp_path, "chr1\tx\t1\nchr1\t5\t1\nchr1\t1\t2\n")
    with pytest.raises(SpecError) as err:
        parse_bed(bed)
    assert [m.split(":")[0] for _, m in err.value.problems] == ["regions.bed line 1", "regions.bed line 2"]


def test_a_first_line_of_column_names_is_a_header(tmp_path: Path) -> None:
    """``chrom start end`` written by a data frame, without BED's '#': not a malformed region."""
    bed = write(tmp_path, "chrom\tstart\tend\tname\nchr1\t5\t10\ta\n")
    assert [(r.chrom, r.start, r.end) for r in parse_bed(bed)] == [("chr1", 5, 10)]
    with pytest.raises(SpecError, match="line 2: start and end must be non-negative integers"):
        parse_bed(write(tmp_path, "chr1\t5\t10\nchrom\tstart\tend\n"))  # only the first line


def test_a_bed_is_read_whatever_its_name_and_byte_order_mark(tmp_path: Path) -> None:
    """gzip told by its bytes (a ``.bed.bgz`` was refused with a codec error), a UTF-8 BOM dropped
    (the first region's contig was '\ufeffchr1', not in the reference)."""
    import gzip

    want = [("chr1", 5, 10), ("chr2", 0, 4)]
    plain = "\ufeffchr1\t5\t10\nchr2\t0\t4\n"
    (tmp_path / "regions.bed.bgz").write_bytes(gzip.compress(plain.encode()))
    for path in (write(tmp_path, plain), str(tmp_path / "regions.bed.bgz")):
        regions, failed = resolve_regions(path, CONTIGS)
        assert [(r.chrom, r.start, r.end) for r in regions] == want and failed == []


def test_a_malformed_first_line_is_not_taken_for_a_header(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="line 1: start and end must be non-negative integers"):
        parse_bed(write(tmp_path, "chr1\tten\ttwenty\nchr1\t5\t10\n"))


def test_unknown_contig_lists_reference_contigs(tmp_path: Path) -> None:
    bed = write(tmp_path, "chr1\t0\t10\nchrX\t0\t10\n")
    with pytest.raises(SpecError) as err:
        resolve_regions(bed, CONTIGS)
    message = str(err.value)
    assert "regions.bed line 2" in message and "'chrX'" in message
    assert "chr1, chr2, chrM" in message


def test_chr_prefix_hint() -> None:
    with pytest.raises(SpecError, match="disagree on the 'chr' prefix"):
        resolve_regions(["1:0-10"], CONTIGS)


def test_a_bed_of_the_other_contig_naming_is_refused_once_naming_both(tmp_path: Path) -> None:
    """Ensembl names (1, MT, and Chr2 as plant genomes write it) against UCSC's: one line says
    so before the lines, MT named as chrM (only the 'chr' prefix was looked for)."""
    bed = write(tmp_path, "1\t0\t10\n1\t20\t30\nChr2\t0\t5\nMT\t0\t5\n")
    with pytest.raises(SpecError) as err:
        resolve_regions(bed, CONTIGS, max_bad=0.5)
    messages = [m for _, m in err.value.problems]
    assert messages[0] == ("4 of 4 records are on contigs the reference does not have: '1' (2 records), "
                           "'Chr2' (1 record), 'MT' (1 record). The reference has '1' as 'chr1', 'Chr2' as "
                           "'chr2', 'MT' as 'chrM': the file and the reference follow different contig naming "
                           "conventions (UCSC's chr1, chrM against Ensembl's and NCBI's 1, MT). Rename the "
                           "file's contigs to the reference's (in the first column), or use the reference the "
                           "file was made for")
    assert "regions.bed line 4: contig 'MT' is not in the reference (the reference has 'chrM'" in messages[4]


def test_region_past_contig_end(tmp_path: Path) -> None:
    bed = write(tmp_path, "chr2\t400\t501\n")
    with pytest.raises(SpecError, match=r"line 1: region chr2:400-501 runs past the end of chr2 \(length 500\)"):
        resolve_regions(bed, CONTIGS)


def test_missing_and_empty_bed(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="file not found"):
        parse_bed(str(tmp_path / "nope.bed"))
    with pytest.raises(SpecError, match="no regions"):
        parse_bed(write(tmp_path, "# only a header\n"))


def test_region_strings_and_genome() -> None:
    regions, _ = resolve_regions(["chr1:100-200", "chr2:10-20:-", "chrM"], CONTIGS)
    assert [(r.chrom, r.start, r.end, r.strand) for r in regions] == [
        ("chr1", 100, 200, "+"), ("chr2", 10, 20, "-"), ("chrM", 0, 16, "+")]
    assert resolve_regions("chr1:0-5", CONTIGS)[0][0].end == 5
    assert resolve_regions(["chr1:1,000-1,000,000"], ContigTable(("chr1",), (10**6,)))[0][0].start == 1000
    assert [r.chrom for r in resolve_regions("genome", CONTIGS)[0]] == ["chr1", "chr2", "chrM"]
    with pytest.raises(SpecError, match=r"windows.regions\[1\]"):
        resolve_regions(["chr1:0-5", "chr1-5"], CONTIGS)


@pytest.mark.parametrize(("region", "length", "stride", "n"), [
    (1000, 100, 100, 10), (1001, 100, 100, 11), (50, 100, 100, 1), (100, 50, 25, 3),
    (100, 100, 1, 1), (101, 100, 1, 2), (1000, 10, 300, 4),
])
def test_tiling_rule(region: int, length: int, stride: int, n: int) -> None:
    assert n_windows(region, length, stride) == n


def _reference_segments(regions: list, length: int, stride: int, per: int) -> list:
    """The tiling rule written out window by window (an independent reference for WindowPlan)."""
    windows = [(r.chrom, r.start + k * stride, r.strand, r.number) for r in regions
               for k in range(n_windows(r.end - r.start, length, stride))]
    shards = []
    for i in range(0, len(windows), per):
        segments: list = []
        for chrom, start, strand, number in windows[i : i + per]:
            last = segments[-1] if segments else None
            if last and last[4] == number and last[1] + last[2] * stride == start:
                segments[-1] = (chrom, last[1], last[2] + 1, strand, number)
            else:
                segments.append((chrom, start, 1, strand, number))
        shards.append((segments, len(windows[i : i + per])))
    return shards


def test_window_plan_equals_the_rule_window_by_window() -> None:
    import random

    from gpubatch.sources.genome.regions import Region

    rng = random.Random(0)
    for _ in range(200):
        starts = rng.sample(range(0, 10_000, 7), rng.randint(1, 6))
        regions = [Region(f"c{i % 2}", s, s + rng.randint(1, 3000), rng.choice("+-"), number=i)
                   for i, s in enumerate(starts)]
        length, stride, per = rng.randint(1, 500), rng.randint(1, 400), rng.randint(1, 50)
        plan = WindowPlan(regions, length, stride, per)
        assert list(plan) == _reference_segments(regions, length, stride, per)
        assert plan[-1] == plan[len(plan) - 1]


def test_window_plan_covers_every_window_once() -> None:
    regions, _ = resolve_regions("genome", CONTIGS)
    shards = list(WindowPlan(regions, 100, 100, 4))
    assert [count for _, count in shards] == [4, 4, 4, 4]
    starts = [(c, s0 + k * 100) for segs, _ in shards for c, s0, n, _, _ in segs for k in range(n)]
    expected = [("chr1", s) for s in range(0, 1000, 100)] + [("chr2", s) for s in range(0, 500, 100)] \
        + [("chrM", 0)]
    assert starts == expected
    assert shards[2][0] == [("chr1", 800, 2, "+", 0), ("chr2", 0, 2, "+", 1)]


def test_a_region_string_says_it_is_0_based_where_a_1_based_one_fails() -> None:
    """samtools' 'chr1:100-100' is one base, 1-based; here it is empty: the refusal said only
    'end must be greater than start', not which convention region strings follow."""
    with pytest.raises(SpecError) as err:
        resolve_regions(["chr1:100-100"], CONTIGS)
    assert "0-based, end-exclusive (as in BED)" in str(err.value) and "chr1:99-100" in str(err.value)


def test_a_region_string_alone_with_bed_s_no_strand_is_a_region() -> None:
    """A string is a BED path unless it is a region: 'chr1:0-100:.' (BED's no-strand) was
    'file not found: chr1:0-100:.'."""
    assert [(r.chrom, r.start, r.end, r.strand) for r in resolve_regions("chr1:0-100:.", CONTIGS)[0]] == [
        ("chr1", 0, 100, "+")]
    assert resolve_regions(["chr1:0-100:."], CONTIGS)[0][0].strand == "+"


def test_only_ascii_digits_are_coordinates(tmp_path: Path) -> None:
    """'\u0661\u0662' (Arabic-Indic twelve) was read as 12, and '\u00b2' failed with int()'s own words."""
    bed = write(tmp_path, "chr1\t0\t10\nchr1\t\u0661\u0662\t20\nchr1\t\u00b2\t20\n")
    _, failed = resolve_regions(bed, CONTIGS, max_bad=0.9)
    assert [f["input"] for f in failed] == ["regions.bed line 2", "regions.bed line 3"]
    assert all("non-negative integers" in f["error"] for f in failed)


def _random_bed(path: Path, n: int, seed: int = 0) -> str:
    """``n`` unsorted lines on two contigs, both strands, most of them overlapping another."""
    rng = random.Random(seed)
    path.write_text("".join(f"chr{1 + rng.randrange(2)}\t{(s := rng.randrange(450))}\t{s + rng.randint(1, 50)}"
                            f"\tpeak{i}\t0\t{rng.choice('+-.')}\n" for i in range(n)))
    return str(path)


def _planning_peak(bed: str) -> tuple[int, int, list[Any]]:
    """Bytes allocated at most while planning ``bed`` (regions, window counts, both notes, every
    shard made once), the plan's windows, and what it found."""
    import tracemalloc

    tracemalloc.start()
    try:
        regions, failed = resolve_regions(bed, CONTIGS)
        plan = WindowPlan(regions, 10, 10, 64)
        notes = [overlap_note(regions), padding_note(regions, CONTIGS, 10, 7)]
        windows = sum(count for _, count in plan)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, windows, [failed, *notes]


def test_planning_memory_does_not_grow_with_the_bed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A BED's regions were held as arrays while planning, with a sort of all of them for the
    overlap note: 5 million lines took 2.1 GB before arrays, and a 20-million-line BED still
    about 2 GB after, growing with the file. Past ``region_store.IN_MEMORY`` regions (lowered
    here so a small BED spills) they are on disk and every pass goes a block at a time: ten
    times the lines plan in the same memory. Measured by allocation, not time."""
    monkeypatch.setattr(region_store, "IN_MEMORY", 2048)
    _planning_peak(_random_bed(tmp_path / "warm.bed", 2000))  # imports, caches: not the BED's
    small, small_windows, _ = _planning_peak(_random_bed(tmp_path / "small.bed", 8_000))
    big, big_windows, (failed, overlaps, padded) = _planning_peak(_random_bed(tmp_path / "big.bed", 80_000))
    assert not failed and big_windows > 9 * small_windows and overlaps is not None and padded is not None
    assert big < 1.3 * small + 100_000, f"{small} bytes for 8,000 lines, {big} for 80,000"
    assert big < 100 * 80_000 / 10, f"{big / 80_000:.0f} bytes per region"


def _bad_lines_peak(path: Path, lines: list[str]) -> tuple[int, list[Any]]:
    """Peak traced bytes of planning a BED of ``lines`` (most of them bad) with bad lines
    allowed, and its ``failed`` entries."""
    import tracemalloc

    bed = write(path.parent, "".join(lines), path.name)
    tracemalloc.start()
    try:
        _, failed = resolve_regions(bed, CONTIGS, max_bad=0.99)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, failed


@pytest.mark.parametrize("bad", ["long fields", "many unknown contigs"])
def test_bad_lines_are_listed_in_memory_that_does_not_grow_with_them(tmp_path: Path, bad: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A bad line's field was quoted whole in its problem, each of the 1,000 listed held (and
    written to report.json, 20 of them in a refusal): 20 MB for 1,000 lines of a 20 kB field.
    And every contig off the reference was counted by name, for the refusal's naming line:
    120 MB for a BED of 1,000,000 names of another assembly. Ten times either holds as much
    (the names counted lowered to 1,000, so the test reads 50,000 lines, not 500,000)."""
    from gpubatch.sources.genome import bad_records

    monkeypatch.setattr(bad_records, "MAX_COUNTED_CONTIGS", 1000, raising=False)
    def lines(n: int) -> list[str]:
        if bad == "long fields":
            return ["chr1\t10\t20\n"] * 20 + [f"chr1\t{'x' * n}\t20\n" for _ in range(1000)]
        return ["chr1\t10\t20\n"] * (n // 50 + 1) + [f"scaffold_{i:08d}_of_another_assembly\t0\t10\n" for i in range(n)]

    small_n, big_n = (1000, 10_000) if bad == "long fields" else (5_000, 50_000)
    _bad_lines_peak(tmp_path / "warm.bed", lines(10))  # imports
    small, _ = _bad_lines_peak(tmp_path / "small.bed", lines(small_n))
    big, failed = _bad_lines_peak(tmp_path / "big.bed", lines(big_n))
    with pytest.raises(SpecError) as refused:
        resolve_regions(str(tmp_path / "big.bed"), CONTIGS)
    refusal = str(refused.value)
    assert big < small + (256 << 10), f"{small} traced bytes, then {big} for ten times the bad lines or bytes"
    assert len(failed) >= 1000 and max(len(f["error"]) for f in failed) < 1000 and len(refusal) < 20_000
    if bad == "long fields":
        assert f"found start='{'x' * 60}'...({big_n:,} characters) end='20'" in failed[0]["error"]
    else:
        assert (f"{big_n} of {big_n + big_n // 50 + 1} records are on contigs the reference does not have: "
                "'scaffold_00000000_of_another_assembly' (1 record)") in refusal
        assert (f"and 992 more, {big_n - 1000} record(s) on contigs not counted by name (past the first 1,000, "
                "or names of over 256 characters)") in refusal


def test_a_spilled_plan_is_the_plan_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regions on disk (``IN_MEMORY`` small, many sorted runs merged in two passes) give the
    same shards and notes as regions in memory, and the notes as an independent count: a region
    overlaps when it starts before the furthest end of those before it, contig and strand
    first seen first, then by start and line."""
    bed = _random_bed(tmp_path / "r.bed", 5000, seed=3)

    def planned() -> tuple[list[Any], str | None, str | None]:
        regions, _ = resolve_regions(bed, CONTIGS)
        plan = WindowPlan(regions, 30, 7, 100)
        return list(plan), overlap_note(regions), padding_note(regions, CONTIGS, 30, 7)

    in_memory = planned()
    monkeypatch.setattr(region_store, "IN_MEMORY", 64)
    monkeypatch.setattr(region_store, "FAN_IN", 4)
    assert planned() == in_memory
    regions = list(parse_bed(bed))
    groups: dict[tuple[str, str], int] = {}
    for r in regions:
        groups.setdefault((r.chrom, r.strand), len(groups))
    reach: dict[int, int] = {}
    overlapping = []
    for r in sorted(regions, key=lambda r: (groups[r.chrom, r.strand], r.start, r.number)):
        group = groups[r.chrom, r.strand]
        if r.start < reach.get(group, -1):
            overlapping.append(r)
        reach[group] = max(reach.get(group, -1), r.end)
    assert in_memory[1] is not None and in_memory[1].startswith(
        f"{len(overlapping)} region(s) overlap an earlier one on the same contig and strand (first: "
        f"{overlapping[0].where}, {overlapping[0].chrom}:{overlapping[0].start}-{overlapping[0].end})")


def test_each_window_names_its_region(tmp_path: Path) -> None:
    """Duplicate and overlapping regions give the same window twice; the plan's segments carry
    the region (its BED line, or its index in a list) so that each output row can be traced."""
    bed = write(tmp_path, "# header\nchr1\t0\t20\nchr1\t0\t20\nchr1\t10\t30\n")
    plan = WindowPlan(resolve_regions(bed, CONTIGS)[0], 10, 10, 100)
    assert plan[0][0] == [("chr1", 0, 2, "+", 2), ("chr1", 0, 2, "+", 3), ("chr1", 10, 2, "+", 4)]
    plan = WindowPlan(resolve_regions(["chr2:0-10", "chr1:5-15"], CONTIGS)[0], 10, 10, 100)
    assert plan[0][0] == [("chr2", 0, 1, "+", 0), ("chr1", 5, 1, "+", 1)]


def test_windows_padded_past_a_contig_end_are_noted() -> None:
    """chrM (16 bases) under 100-base windows is one window of 84 N, and chr1's last windows run
    past its end: scored without a word before."""
    regions, _ = resolve_regions(["chr1:850-1000", "chrM", "chr2:0-100"], CONTIGS)
    assert padding_note(regions, CONTIGS, 100, 100) == (
        "2 window(s) of 100 bases run past their contig's end and are padded with N (encoding.n_value) "
        "(first: windows.regions[0], chr1:850-1000, chr1 is 1000 bases long)")
    assert padding_note(regions, CONTIGS, 100, 50) is not None
    assert padding_note(resolve_regions(["chr1:0-1000"], CONTIGS)[0], CONTIGS, 100, 100) is None
    assert padding_note(resolve_regions(["chr1:0-1000"], CONTIGS)[0], CONTIGS, 100, 30) is None
