"""pipeline/stages.py: the baseline's stage derived from stage 1."""

from __future__ import annotations

from atoken.pipeline.config import load_config, validate_train
from atoken.pipeline.stages import baseline_config

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
