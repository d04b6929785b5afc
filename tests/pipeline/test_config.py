"""pipeline/config.py: the one config schema, its overrides, its field-named errors and its flat form."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from atoken.pipeline.config import (
    ConfigError,
    IngestSection,
    PipelineConfig,
    StorageSection,
    TrainStageSection,
    flatten,
    load_config,
)

from helpers import QUICKSTART

# The file as YAML sees it: the expected values come from here, so the tests follow edits to the quickstart.
RAW = yaml.safe_load(QUICKSTART.read_text())
RESOLUTION = RAW["ingest"]["resolution"]
STAGES = RAW["train"]["stages"]


def assert_matches(section, raw: dict, where: str) -> None:
    """Every value the file sets is the config's value, with the dataclass's type."""
    for key, value in raw.items():
        actual = getattr(section, key)
        if isinstance(value, dict):
            assert_matches(actual, value, f"{where}.{key}")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            assert len(actual) == len(value), f"{where}.{key}"
            for i, (item, raw_item) in enumerate(zip(actual, value, strict=True)):
                assert_matches(item, raw_item, f"{where}.{key}.{i}")
        elif key in ("root", "local_dir") and not str(value).startswith("s3://"):
            assert actual == str(Path(value).resolve()), f"{where}.{key}"
        else:
            assert actual == value, f"{where}.{key}"
            assert type(actual) is type(value) or isinstance(actual, float), f"{where}.{key}: {type(actual)}"


def test_quickstart_loads_with_its_values():
    config = load_config(QUICKSTART)

    assert isinstance(config, PipelineConfig)
    assert_matches(config, RAW, "config")
    assert all(isinstance(s, TrainStageSection) for s in config.train.stages)
    assert all(isinstance(s.lr, float) for s in config.train.stages), "a YAML int or float becomes a float"
    # Fields the file leaves out keep their dataclass defaults.
    assert config.storage == StorageSection() and config.ray.num_cpus is None
    assert config.ingest.max_pixels == IngestSection().max_pixels
    # Relative local paths are pinned to absolute ones (Ray workers run in other folders).
    assert Path(config.run.root).is_absolute() and config.run.root.endswith(RAW["run"]["root"])
    assert Path(config.run.local_dir).is_absolute()


def test_overrides_reach_list_items_and_keep_yaml_types():
    config = load_config(QUICKSTART, [
        "train.stages.0.steps=5",
        "train.stages.0.warmup_steps=2",
        "train.stages.1.lr=0.0005",
        "train.stages.1.use_gpu=true",
        "ingest.sources.2.limit=7",
        "evaluate.metrics=[psnr]",
        "evaluate.max_samples=12",
        "storage.endpoint_url=http://127.0.0.1:9000",
        "run.root=s3://bucket/prefix",
        "run.seed=3",
    ])

    assert config.train.stages[0].steps == 5 and type(config.train.stages[0].steps) is int
    assert config.train.stages[1].steps == STAGES[1]["steps"], "only the indexed stage changes"
    assert config.train.stages[1].lr == pytest.approx(5e-4)
    assert config.train.stages[1].use_gpu is True
    assert config.ingest.sources[2].limit == 7
    assert config.ingest.sources[0].limit == RAW["ingest"]["sources"][0].get("limit")
    assert config.evaluate.metrics == ["psnr"]
    assert config.evaluate.max_samples == 12
    assert config.storage.endpoint_url == "http://127.0.0.1:9000"
    assert config.run.root == "s3://bucket/prefix", "an s3:// root is not made into a local path"
    assert config.run.seed == 3


def test_override_null_and_int_for_float():
    config = load_config(QUICKSTART, ["ingest.sources.2.limit=null", "train.stages.0.lr=1"])
    assert config.ingest.sources[2].limit is None
    assert config.train.stages[0].lr == 1.0 and isinstance(config.train.stages[0].lr, float)


def test_override_of_a_section_the_file_leaves_out_starts_from_its_default(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text("run: {name: tiny, root: out}\n")

    config = load_config(path, ["train.stages.0.steps=30", "ingest.sources.0.limit=3", "ray.num_cpus=2"])

    assert config.train.stages[0].steps == 30
    assert config.train.stages[0].name == TrainStageSection().name
    assert config.ingest.sources[0].name == "skimage-photos" and config.ingest.sources[0].limit == 3
    assert config.ray.num_cpus == 2


def error_for(overrides: list[str], path: Path = QUICKSTART) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return str(caught.value)


@pytest.mark.parametrize(("override", "field", "words"), [
    ("train.stages.0.stepz=5", "train.stages[0].stepz", "unknown field"),
    ("bogus.field=1", "bogus", "unknown field"),
    ("ingest.resolution=big", "ingest.resolution", "expected an integer, got 'big'"),
    ("train.stages.0.steps=ten", "train.stages[0].steps", "expected an integer"),
    ("train.stages.0.steps=1.5", "train.stages[0].steps", "expected an integer"),
    ("train.stages.1.steps=true", "train.stages[1].steps", "expected an integer, got True"),
    ("train.stages.0.lr=false", "train.stages[0].lr", "expected a number"),
    ("train.stages.0.use_gpu=1", "train.stages[0].use_gpu", "expected true or false"),
    ("run.name=5", "run.name", "expected a string"),
    ("evaluate.metrics=psnr", "evaluate.metrics", "expected a list"),
    ("evaluate.metrics=[psnr, fvd]", "evaluate.metrics[1]", "unknown metric 'fvd'"),
    (f"train.stages.1.name={STAGES[0]['name']}", "train.stages[1].name", f"duplicate stage name {STAGES[0]['name']!r}"),
    (f"train.model.patch_size={RESOLUTION + 1}", "train.model.patch_size",
     f"must divide ingest.resolution ({RESOLUTION})"),
    ("train.model.kind=vqgan", "train.model.kind", "unknown model"),
    ("ingest.resolution=30", "ingest.resolution", "multiple of 8"),
    # Issue 19: square (resolution) or native aspect (max_resolution), never both; the train split's encoding.
    ("ingest.max_resolution=512", "ingest.max_resolution", "set exactly one of resolution (square crop) and"),
    ("ingest.resolution=null", "ingest.resolution", "set exactly one of resolution (square crop) and"),
    ("ingest.encoding=gif", "ingest.encoding", "must be png, jpg or webp"),
    ("ingest.quality=0", "ingest.quality", "must be in [1, 100]"),
    ("ingest.resize=width", "ingest.resize", "must be long or short"),
    ("videos.max_resolution=512", "videos.max_resolution", "set exactly one of resolution (square crop) and"),
    ("videos.resolution=40", "videos.resolution", "must be a multiple of 16"),
    ("ingest.sources.0.name=imagenet", "ingest.sources[0].name", "unknown built-in set 'imagenet'"),
    (f"train.stages.0.warmup_steps={STAGES[0]['steps'] + 1}", "train.stages[0].warmup_steps", "must be in [0, steps]"),
    (f"train.stages.{len(STAGES)}.steps=1", f"train.stages.{len(STAGES)}",
     f"no list item '{len(STAGES)}' (the list has {len(STAGES)})"),
    ("train.stages.x.steps=1", "train.stages.x", "no list item 'x'"),
    ("run.name.first=a", "run.name.first", "cannot set a field inside a str"),
    ("storage.multipart_chunk_mb=4", "storage.multipart_chunk_mb", "S3 parts are 5 MiB to 5 GiB"),
    ("storage.multipart_chunk_mb=5121", "storage.multipart_chunk_mb", "S3 parts are 5 MiB to 5 GiB"),
    # Issue 17: render_3d scores evaluation views only, picked by their index among objects.eval_views.
    ("objects.eval_views=-1", "objects.eval_views", "must be >= 0"),
    ("objects.max_item_mb=0", "objects.max_item_mb", "must be >= 1"),
    ("objects.eval_views=0", "objects.eval_views", "render_3d, which scores only evaluation views"),
    ("evaluate.held_out_views=[3, 7, 11, 15]", "evaluate.held_out_views",
     "[7, 11, 15] are not among the 4 evaluation views of objects.eval_views (indices from 0); input views are never"),
    ("evaluate.held_out_views=[1, 1]", "evaluate.held_out_views", "distinct indices"),
])
def test_errors_start_with_the_dotted_field_path(override, field, words):
    message = error_for([override])
    assert message.startswith(f"{field}: "), message
    assert words in message


def test_malformed_override_and_missing_file(tmp_path):
    assert error_for(["train.stages.0.steps"]).startswith("--set 'train.stages.0.steps'")
    assert error_for(["=5"]).startswith("--set '=5'")
    assert str(tmp_path / "nope.yaml") in error_for([], tmp_path / "nope.yaml")
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n")
    assert "must hold a mapping" in error_for([], not_a_mapping)
    section_not_a_mapping = tmp_path / "section.yaml"
    section_not_a_mapping.write_text("run: 5\n")
    assert error_for([], section_not_a_mapping).startswith("run: expected a mapping")


def test_config_error_is_a_value_error():
    # The CLI turns ValueError-family errors into one line; ConfigError must stay in that family.
    assert issubclass(ConfigError, ValueError)


def leaf_paths(value, prefix: str = "") -> set[str]:
    """Every leaf field of the config as flatten() should name it, computed from the dataclasses."""
    if dataclasses.is_dataclass(value):
        found: set[str] = set()
        for f in dataclasses.fields(value):
            found |= leaf_paths(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name)
        return found
    if isinstance(value, list) and any(dataclasses.is_dataclass(v) for v in value):
        return {path for i, v in enumerate(value) for path in leaf_paths(v, f"{prefix}.{i}")}
    return {prefix}


MLFLOW_PARAM_KEY = re.compile(r"^[\w\-. /]+$")  # mlflow.utils.validation: alphanumerics, _ - . space /


def test_flatten_names_every_field_with_a_loggable_string():
    config = load_config(QUICKSTART, ["storage.endpoint_url=http://127.0.0.1:9000"])

    flat = flatten(config.to_dict())

    assert set(flat) == leaf_paths(config)
    assert all(isinstance(v, str) for v in flat.values())
    assert all(MLFLOW_PARAM_KEY.match(k) and len(k) <= 250 for k in flat)
    assert all(len(v) <= 6000 for v in flat.values())
    assert flat["train.stages.0.steps"] == str(STAGES[0]["steps"])
    assert flat["train.stages.1.lr"] == str(float(STAGES[1]["lr"]))
    assert flat["train.stages.0.use_gpu"] == "False"
    assert flat["ingest.sources.2.limit"] == str(RAW["ingest"]["sources"][2]["limit"])
    assert flat["ingest.sources.0.limit"] == "None"
    assert flat["storage.endpoint_url"] == "http://127.0.0.1:9000"
    assert json.loads(flat["evaluate.metrics"]) == RAW["evaluate"]["metrics"], "a list of scalars stays one JSON param"


def test_flatten_nested_dicts_and_lists():
    nested = {"a": {"b": 1, "c": [1, 2]}, "d": [{"e": None}, {"f": [{"g": 2.5}]}], "h": [], "i": True}

    assert flatten(nested) == {
        "a.b": "1", "a.c": "[1, 2]", "d.0.e": "None", "d.1.f.0.g": "2.5", "h": "[]", "i": "True",
    }


def test_flatten_params_log_to_mlflow(mlflow_uri, tmp_path):
    from atoken.pipeline.tracking import Tracker

    config = load_config(QUICKSTART)
    flat = flatten(config.to_dict())
    tracker = Tracker(mlflow_uri, "config-params", str(tmp_path))
    run_id, _ = tracker.reopen_or_create(None, "params")

    tracker.log_params(run_id, flat)

    assert tracker.client.get_run(run_id).data.params == flat


def test_exponent_without_a_dot_is_a_number():
    config = load_config(QUICKSTART, ["train.stages.0.lr=1e-3"])
    assert config.train.stages[0].lr == 1e-3
    with pytest.raises(ConfigError, match=r"train.stages\[0\].lr: expected a number"):
        load_config(QUICKSTART, ["train.stages.0.lr=fast"])


def test_an_unknown_rfvd_preset_is_refused_naming_the_presets(tmp_path):
    from atoken.pipeline.config import ConfigError, load_config

    path = tmp_path / "run.yaml"
    path.write_text("run:\n  name: x\nevaluate:\n  fvd_preset: tokenbench-v2\n")
    with pytest.raises(ConfigError, match="evaluate.fvd_preset.*tokenbench, stylegan-v"):
        load_config(path)
    path.write_text("run:\n  name: x\nevaluate:\n  fvd_preset: stylegan-v\n")
    assert load_config(path).evaluate.fvd_preset == "stylegan-v"


def test_native_resolution_mode_validates_without_the_square_patch_rule():
    """resolution: null + max_resolution: sides need not be patch multiples (the trainer resizes per its schedule,
    the evaluation crops to the patch grid), so patch_size need not divide anything ingest writes."""
    config = load_config(QUICKSTART, ["ingest.resolution=null", "ingest.max_resolution=100", "ingest.encoding=webp",
                                      "ingest.quality=90", "videos.resolution=null", "videos.max_resolution=90",
                                      f"train.model.patch_size={RESOLUTION + 1}",
                                      # batches of batch_size images need one size (the trainer's resize)
                                      *(f"train.stages.{i}.image_resolution={RESOLUTION + 1}" for i in range(4))])
    assert (config.ingest.resolution, config.ingest.max_resolution, config.ingest.resize) == (None, 100, "long")
    assert (config.ingest.encoding, config.ingest.quality) == ("webp", 90)
    assert (config.videos.resolution, config.videos.max_resolution) == (None, 90)


def test_stage_sizes_are_checked_against_what_ingest_keeps():
    """Native images in batches of batch_size without one size, and a schedule whose largest image or clip cannot
    fit its token budget, are refused naming the field, before any work."""
    native = ["ingest.resolution=null", "ingest.max_resolution=128"]
    with pytest.raises(ConfigError, match=r"train\.stages\[0\]\.image_resolution: native-resolution images"):
        load_config(QUICKSTART, native)
    with pytest.raises(ConfigError, match=r"train\.stages\[0\]\.max_tokens: a 128-px square image is 64 tokens"):
        load_config(QUICKSTART, [*native, "train.model.kind=atoken", "train.model.preset=tiny",
                                 "train.model.patch_size=16", "train.stages.0.max_tokens=32",
                                 "train.stages.0.image_resolution=[16, 512]"])
    with pytest.raises(ConfigError, match=r"train\.stages\[0\]\.image_resolution: one size must be a multiple"):
        load_config(QUICKSTART, ["train.stages.0.image_resolution=60"])
