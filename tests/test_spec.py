"""Job specs fail before any work, naming the field and what would be valid."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import slide_job, write_job

from gpubatch.cli.main import main
from gpubatch.core.errors import EXIT_USAGE, SpecError
from gpubatch.runtime.preflight import check_local_files
from gpubatch.spec import load_job, parse_job


@pytest.fixture()
def good(tmp_path: Path, slide_path: Path, classifier: Path) -> dict:
    return slide_job([str(slide_path)], classifier, tmp_path / "out")


def _problems(tmp_path: Path, job: dict) -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        check_local_files(load_job(write_job(tmp_path / "job.yaml", job)))
    return info.value.problems


def test_valid_spec_loads(tmp_path: Path, good: dict) -> None:
    job = load_job(write_job(tmp_path / "job.yaml", good))
    assert job.tiles.size == 64 and job.kind == "slides"
    check_local_files(job)


@pytest.mark.parametrize(
    ("section", "key", "value", "field", "words"),
    [
        ("tiles", "size", 0, "tiles.size", "greater than or equal to 1"),
        ("tiles", "overlap", 1.0, "tiles.overlap", "less than 1"),
        ("tiles", "mpp", -0.5, "tiles.mpp", "greater than 0"),
        ("tiles", "sizee", 3, "tiles.sizee", "unknown key"),
        ("model", "batch_size", "big", "model.batch_size", "auto"),
        ("model", "precision", "int4", "model.precision", "fp32"),
        ("run", "readers", "four", "run.readers", "integer"),
        ("run", "queue_timeout", 0, "run.queue_timeout", "0 s is under the 10 s floor"),
        ("run", "queue_timeout", "a day", "run.queue_timeout", "number"),
    ],
)
def test_bad_values_name_the_field(tmp_path: Path, good: dict, section: str, key: str, value: object,
                                   field: str, words: str) -> None:
    good[section][key] = value
    problems = _problems(tmp_path, good)
    assert any(path == field and words in msg for path, msg in problems), problems


def test_unknown_top_level_key(tmp_path: Path, good: dict) -> None:
    good["tilez"] = {}
    assert ("tilez", "unknown key; did you mean 'tiles'? (every key is listed in docs/spec.md)") in _problems(tmp_path, good)


@pytest.mark.parametrize(("given", "meant"), [("tiles.sise=3", "size"), ("model.batchsize=8", "batch_size"),
                                              ("run.reader=2", "readers"), ("tiles.tissue.metod=otsu", "method"),
                                              ("model.input.meen=[0, 0, 0]", "mean")])
def test_a_typo_d_key_names_the_key_it_meant(tmp_path: Path, good: dict, given: str, meant: str,
                                             capsys: pytest.CaptureFixture) -> None:
    """A misspelt key (in the file or by --set) was "unknown key (check the spelling)", leaving the
    user to find the right one in docs/spec.md; the nearest key of its section is named now."""
    path = write_job(tmp_path / "job.yaml", good)
    assert main(["validate", str(path), "--set", given]) == EXIT_USAGE
    assert f"{given.split('=')[0]}: unknown key; did you mean '{meant}'?" in capsys.readouterr().err


def test_an_unknown_key_like_none_lists_its_section_s_keys(tmp_path: Path, good: dict) -> None:
    good["output"]["xyz"] = 1
    problems = dict(_problems(tmp_path, good))
    assert "this section takes uri, " in problems["output.xyz"] and "formats" in problems["output.xyz"]


def test_missing_model_and_input_files(tmp_path: Path, good: dict) -> None:
    good["model"]["path"] = str(tmp_path / "nope.onnx")
    good["input"]["uris"] = [str(tmp_path / "missing-*.svs")]
    problems = dict(_problems(tmp_path, good))
    assert "file not found" in problems["model.path"]
    assert "matches no file" in problems["input.uris[0]"]


def test_mpp_and_level_are_exclusive(tmp_path: Path, good: dict) -> None:
    good["tiles"]["level"] = 0
    job = load_job(write_job(tmp_path / "job.yaml", {**good, "tiles": {"size": 64, "level": 0}}))
    assert job.tiles.level == 0 and job.tiles.mpp is None
    good["tiles"]["mpp"] = 0.5
    assert any("either `mpp` or `level`" in m for _, m in _problems(tmp_path, good))


def test_set_overrides_are_typed(tmp_path: Path, good: dict) -> None:
    job = load_job(write_job(tmp_path / "job.yaml", good), ["tiles.size=128", "run.readers=3"])
    assert job.tiles.size == 128 and job.run.readers == 3


def test_relative_paths_resolve_against_the_job_file(tmp_path: Path, good: dict, classifier: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "c.onnx").write_bytes(classifier.read_bytes())
    good["model"]["path"] = "m/c.onnx"
    job = load_job(write_job(tmp_path / "job.yaml", good))
    assert job.model.path == str(tmp_path / "m" / "c.onnx")


def test_cli_validate_exit_codes(tmp_path: Path, good: dict, capsys: pytest.CaptureFixture) -> None:
    path = write_job(tmp_path / "job.yaml", good)
    assert main(["validate", str(path)]) == 0
    good["tiles"]["size"] = 0
    write_job(path, good)
    assert main(["validate", str(path)]) == EXIT_USAGE
    assert "tiles.size" in capsys.readouterr().err


def test_cli_run_refuses_bad_spec_before_running(tmp_path: Path, good: dict) -> None:
    good["model"]["path"] = str(tmp_path / "absent.onnx")
    assert main(["run", str(write_job(tmp_path / "job.yaml", good))]) == EXIT_USAGE
    assert not (tmp_path / "out").exists()


def test_not_yaml_and_not_a_mapping(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_job(bad)
    bad.write_text("- a list")
    with pytest.raises(SpecError, match="mapping"):
        load_job(bad)


def test_model_input_shape_must_match_the_tiles(tmp_path: Path, good: dict, assets: Path) -> None:
    import torch

    from gpubatch.cli.demo import _export

    fixed = _export(torch.nn.Flatten(), torch.rand(1, 3, 32, 32), assets / "fixed32.onnx", ["flat"])
    good["model"]["path"] = str(fixed)
    assert main(["run", str(write_job(tmp_path / "job.yaml", good))]) == EXIT_USAGE
    assert not (tmp_path / "out").exists()


def test_remote_scheme_without_its_package_names_the_extra(tmp_path: Path, good: dict) -> None:
    import importlib.util

    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    good["input"]["uris"] = ["gs://lab-slides/*.svs"]
    problems = dict(_problems(tmp_path, good))
    assert "gpubatch[gcs]" in problems["input.uris[0]"]


def test_unknown_profile_and_profile_keys_are_spec_errors(tmp_path: Path, good: dict,
                                                          capsys: pytest.CaptureFixture) -> None:
    path = write_job(tmp_path / "job.yaml", good)
    assert main(["run", str(path), "--profile", "nosuch"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "run.profile" in err and "'local'" in err and "'slurm'" in err
    bad = tmp_path / "bad-profile.yaml"
    bad.write_text("cluster: local\nworkerz: 2\n")
    assert main(["run", str(path), "--profile", str(bad)]) == EXIT_USAGE
    assert "workerz" in capsys.readouterr().err


@pytest.mark.parametrize("regions", [["chr2:0-15"], "regions.bed"])
def test_regions_beside_variants_are_refused_not_ignored(regions: object) -> None:
    """Variant mode scores every record of the VCF: regions set beside it were silently ignored."""
    job = {"kind": "genome", "model": {"path": "m.onnx"}, "output": {"uri": "o"},
           "windows": {"reference": "ref.fa", "variants": "v.vcf", "regions": regions}}
    with pytest.raises(SpecError) as err:
        parse_job(job)
    assert "windows.regions and windows.variants do not combine" in str(err.value)
    assert "bcftools view -R" in str(err.value)
    job["windows"].pop("regions")  # type: ignore[attr-defined]
    assert parse_job(job).windows.variants == "v.vcf"  # type: ignore[union-attr]


@pytest.mark.parametrize(("key", "value", "said"), [
    ("variants", "", "windows.variants: is empty: give the variant file, or leave it out (or null)"),
    ("variants", "  ", "windows.variants: is empty"),
    ("regions", [], "windows.regions: is an empty list"),
    ("regions", "", "windows.regions: is empty: give a BED file"),
    ("regions", ["chr1:0-10", ""], "windows.regions: holds an empty region"),
    ("reference", "", "windows.reference: is empty"),
])
def test_a_blank_genome_path_or_no_regions_is_refused(tmp_path: Path, key: str, value: object, said: str,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """``variants: ""`` (an unset variable in a templated spec) ran a windows job over the whole
    genome instead of scoring the variants, exit 0; ``regions: []`` ran nothing, exit 0."""
    windows: dict[str, object] = {"reference": "ref.fa", key: value}
    path = write_job(tmp_path / "job.yaml", {"kind": "genome", "model": {"path": "m.onnx"},
                                             "output": {"uri": "o"}, "windows": windows})
    for command in ("validate", "run"):
        assert main([command, str(path)]) == EXIT_USAGE
        assert said in capsys.readouterr().err


def test_a_contig_given_as_the_regions_string_is_told_to_list_it(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``regions: chr21`` was told "file not found: .../chr21 (or give 'genome' or a list of
    'chr:start-end')", not that a list takes contig names."""
    path = write_job(tmp_path / "job.yaml", {"kind": "genome", "model": {"path": "m.onnx"}, "output": {"uri": "o"},
                                             "windows": {"reference": "ref.fa", "regions": "chr21"}})
    assert main(["validate", str(path)]) == EXIT_USAGE
    assert "to tile contig chr21, list it (regions: [chr21])" in capsys.readouterr().err


@pytest.mark.parametrize("blank", ["", "   "])
def test_a_blank_input_uri_is_refused_naming_its_place(tmp_path: Path, good: dict, blank: str) -> None:
    """An empty entry (a generated list's trailing blank line) resolved against the spec's folder:
    the folder was an input, 'a directory, not a slide', and the run ended partial (exit 3)."""
    good["input"]["uris"] = [good["input"]["uris"][0], blank]
    assert _problems(tmp_path, good) == [("input.uris[1]", "is blank: give a slide's path, glob or URL, "
                                                           "or leave the entry out")]
