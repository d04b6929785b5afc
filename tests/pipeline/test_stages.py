"""pipeline/stages.py: the baseline's stage derived from stage 1; the 3D ingest's preflight."""

from __future__ import annotations

import gzip
import json

import pytest

from atoken.pipeline.config import PipelineConfig, load_config, validate_train
from atoken.pipeline.stages import baseline_config, preflight_3d
from atoken.preprocess.sources import SourceError

from helpers import QUICKSTART


def test_the_baseline_trains_on_batches_of_one_size_whatever_stage_one_packs():
    """Stage 1 packs images drawn in a range; the convolutional baseline takes batches of one size: the
    evaluation's image_size, else the top of the range, and its derived config validates."""
    packed = ["train.stages.0.max_tokens=512", "train.stages.0.image_resolution=[32, 64]"]
    for extra, size in (([], 64), (["evaluate.image_size=32"], 32)):
        config = baseline_config(load_config(QUICKSTART, [*packed, *extra]))
        stage = config.train.stages[0]
        assert (stage.name, stage.max_tokens, stage.image_resolution) == ("baseline", None, size)
        validate_train(config.train, config.ingest.resolution)
    unchanged = baseline_config(load_config(QUICKSTART)).train.stages[0]
    assert unchanged.image_resolution == load_config(QUICKSTART).train.stages[0].image_resolution


def test_the_3d_preflight_stops_at_a_source_that_lists_no_assets(tmp_path):
    """`atoken run` checks each 3D source by its first asset before any stage: an Objaverse mirror whose object
    paths are empty is named; the built-in set before it passes (the negative control)."""
    mirror = tmp_path / "hf-objaverse-v1"
    mirror.mkdir()
    with gzip.open(mirror / "object-paths.json.gz", "wt") as handle:
        json.dump({}, handle)
    config = PipelineConfig()
    config.objects.sources = ["builtin:pybullet-named"]
    preflight_3d(config)
    config.objects.sources = ["builtin:pybullet-named", f"objaverse:{tmp_path}"]
    with pytest.raises(SourceError, match=r"objects.sources\[1\] \(objaverse:.*\) lists no assets"):
        preflight_3d(config)
