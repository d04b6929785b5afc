"""evaluate/stage.py and the evaluate section it reads: evaluate.image_size reaches the suite, checked first."""

from __future__ import annotations

import pytest

from atoken.evaluate.stage import suite_settings
from atoken.pipeline.config import ConfigError, load_config

from helpers import QUICKSTART, REPO


def test_image_size_defaults_to_the_shards_size_and_reaches_the_suite():
    config = load_config(QUICKSTART)
    assert config.evaluate.image_size is None and suite_settings(config.evaluate).image_size is None
    config = load_config(QUICKSTART, ["evaluate.image_size=64"])
    assert suite_settings(config.evaluate).image_size == 64


@pytest.mark.parametrize("name", ["base", "so400m"])
def test_the_paper_configs_score_at_the_published_256(name):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config.evaluate.image_size == 256 and config.ingest.resolution is None


@pytest.mark.parametrize("value", ["0", "40", "big"])
def test_an_image_size_off_the_patch_grid_is_refused_naming_the_field(value):
    with pytest.raises(ConfigError, match="evaluate.image_size"):
        load_config(QUICKSTART, [f"evaluate.image_size={value}"])
