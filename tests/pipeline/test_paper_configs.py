"""configs/base.yaml and so400m.yaml: the paper's GPU set-ups validate here and are refused before any work."""

from __future__ import annotations

import pytest
import torch

from atoken.pipeline.config import ConfigError, load_config
from atoken.pipeline.runner import prepare
from atoken.train.model import PRESETS

from helpers import REPO


@pytest.mark.parametrize("name,preset,workers", [("base", "base", 64), ("so400m", "so400m", 256)])
def test_paper_config_follows_the_spec(name, preset, workers):
    config = load_config(REPO / "configs" / f"{name}.yaml")
    assert config.train.model.kind == "atoken" and config.train.model.preset == preset
    assert config.train.model.patch_size == 16
    # Table 2: 200k, 200k, 50k and (optional) 100k steps; AdamW wd 0.1, 2k warm-up to 3e-4.
    assert [s.steps for s in config.train.stages] == [200_000, 200_000, 50_000, 100_000]
    assert {(s.lr, s.warmup_steps, s.weight_decay) for s in config.train.stages} == {(3e-4, 2000, 0.1)}
    assert all(s.use_gpu and s.num_workers == workers for s in config.train.stages)
    assert config.run.root.startswith("s3://")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_stages_are_refused_before_any_work_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = load_config(REPO / "configs" / "base.yaml",
                         [f"run.root={tmp_path / 'run'}", f"ingest.sources.0.path={tmp_path}"])
    (tmp_path / "photo.png").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"train.stages\[0\].use_gpu"):
        prepare(config)
    assert not (tmp_path / "run" / "ingest").exists()


@pytest.mark.parametrize("name", ["base", "so400m"])
def test_paper_config_builds_the_named_tokenizer(name):
    from atoken.train.model import build_model

    config = load_config(REPO / "configs" / f"{name}.yaml")
    with torch.device("meta"):  # shapes only: no memory for 0.2-0.8 B parameters
        model = build_model(config.train.model)
    assert model.config.width == PRESETS[name]["width"] and model.config.depth == PRESETS[name]["depth"]
    assert model.config.latent_channels == 32 and model.config.patch_size == 16
