"""evaluate/suite.py, adapter.py, report.py: one tokenizer adapter, the suite on real photos, the report."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from atoken.evaluate.adapter import adapter_for_model, image_model_adapter
from atoken.evaluate.metrics.psnr import psnr_uint8
from atoken.evaluate.protocols import COMMON_FIELDS
from atoken.evaluate.reconstruction import to_uint8
from atoken.evaluate.report import images, render_markdown
from atoken.evaluate.suite import SuiteReport, SuiteSettings, run_suite
from atoken.train.model import ConvVAE, Tokenizer

PHOTOS = Path(importlib.util.find_spec("skimage").origin).parent / "data"


def photo_samples(count: int = 6, size: int = 64) -> list[dict]:
    """Shard samples as ingest writes them: a PNG and its JSON metadata."""
    samples = []
    for path in sorted(PHOTOS.glob("*.png"))[:count]:
        image = Image.open(path).convert("RGB").resize((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        meta = {"caption": path.stem.replace("_", " "), "source": "skimage-photos"}
        samples.append({"__key__": f"skimage_{path.stem}", "png": buffer.getvalue(), "json": json.dumps(meta).encode()})
    return samples


def clip_samples(count: int = 2, frames: int = 12, size: int = 32) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []
    for index in range(count):
        clip = np.clip(np.cumsum(rng.integers(-8, 9, (frames, size, size, 3)), axis=0) + 128, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        np.save(buffer, clip)
        out.append(
            {
                "__key__": f"clip_{index}",
                "npy": buffer.getvalue(),
                "json": json.dumps({"caption": f"clip {index}", "source": "synthetic"}).encode(),
            }
        )
    return out


def tiny_tokenizer() -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer.from_preset("tiny", latent_channels=8, patch_size=16).eval()


def test_atoken_adapter_round_trips_images_and_clips_of_mixed_sizes():
    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    media = [torch.rand(1, 3, 32, 48) * 2 - 1, torch.rand(6, 3, 32, 32) * 2 - 1]  # an image and a 6-frame clip
    out = adapter.reconstruct(media)
    assert [tuple(o.shape) for o in out] == [(1, 3, 32, 48), (6, 3, 32, 32)]
    # Each sample is decoded as if alone: packing changes nothing (per-sample attention).
    alone = adapter.reconstruct(media[1:])[0]
    torch.testing.assert_close(out[1], alone, atol=1e-5, rtol=1e-5)
    assert adapter.embed(media).shape[0] == 2


def test_image_model_adapter_codes_a_clip_frame_by_frame():
    model = ConvVAE(hidden_channels=8, latent_channels=4).eval()
    adapter = image_model_adapter(model, "baseline")
    clip = torch.rand(3, 3, 32, 32) * 2 - 1
    (out,) = adapter.reconstruct([clip])
    with torch.no_grad():
        expected = model.decode(model.encode(clip)[0])
    torch.testing.assert_close(out, expected)
    assert adapter.embed is None and adapter.decode_gaussians is None


def test_suite_scores_each_image_as_the_metrics_do_and_records_protocols():
    samples = photo_samples()
    model = tiny_tokenizer()
    settings = SuiteSettings(metrics=["psnr", "ssim", "lpips"], grid_samples=3, worst_k=2, batch_size=4)
    report = run_suite(adapter_for_model(model, "atoken"), settings, samples, clip_samples())
    image_rows = [r for r in report.rows if r["modality"] == "image"]
    assert [r["key"] for r in image_rows] == [s["__key__"] for s in samples]
    # Independently: decode, reconstruct, quantise, PSNR.
    from atoken.train.data import decode_image

    adapter = adapter_for_model(model, "atoken")
    for sample, row in zip(samples, image_rows, strict=True):
        pixels = decode_image(sample)
        (decoded,) = adapter.reconstruct([pixels[None]])
        assert row["psnr"] == pytest.approx(psnr_uint8(to_uint8(pixels), to_uint8(decoded[0])), abs=1e-9)
    assert report.summary["eval_psnr"] == pytest.approx(np.mean([r["psnr"] for r in image_rows]))
    assert "eval_perceptual_stand_in" in report.summary and "eval_lpips" not in report.summary  # declared
    assert report.protocols["perceptual_stand_in"]["stand_in"].startswith("EfficientNet")
    assert report.summary["eval_video_psnr"] > 0 and report.protocols["video_psnr"]["frames"] == 12
    for metric, fields in report.protocols.items():
        assert set(COMMON_FIELDS) <= set(fields), metric
    assert report.protocols["psnr"]["samples"] == len(samples)
    # Worst-k: the two lowest PSNRs, lowest first.
    lowest = sorted(r["psnr"] for r in image_rows)[:2]
    assert [w["psnr"] for w in report.worst] == pytest.approx(lowest)
    assert len(report.grid[0]) == 3
    files = images({"atoken": report})
    markdown = render_markdown("test", {"atoken": report}, files)
    assert "atoken_worst.png" in files and "](atoken_worst.png)" in markdown
    assert "| image | 64x64 | 6 |" in markdown and "| video | 32x32 | 2 |" in markdown


def test_suite_skips_what_a_tokenizer_cannot_do_and_says_why():
    settings = SuiteSettings(metrics=["psnr", "zero_shot", "retrieval", "render_3d", "rfvd"])
    adapter = image_model_adapter(ConvVAE(hidden_channels=8, latent_channels=4).eval(), "baseline")
    report = run_suite(adapter, settings, photo_samples(2))
    assert "no pooled embedding head" in report.skipped["zero_shot"]
    assert "no 3D validation samples" in report.skipped["render_3d"]
    assert "no video clips" in report.skipped["rfvd"]
    with pytest.raises(ValueError, match="unknown metric 'fvd'"):
        run_suite(adapter, SuiteSettings(metrics=["fvd"]), photo_samples(2))


def object_sample(key: str, views: int = 4, eval_views: int = 2, size: int = 32) -> dict:
    """A 3D shard sample as preprocessing writes it (npz: voxels, features, input views and their cameras, and
    the evaluation views and theirs; eval_views=None: a sample ingested before issue 17, input views only)."""
    from atoken.preprocess.render import RenderSettings, camera_poses, eval_camera_poses, intrinsics

    settings = RenderSettings(views=views, eval_views=eval_views or 0, resolution=size)
    rng = np.random.default_rng(len(key))
    voxels = rng.integers(4, 12, (20, 3))
    arrays = {
        "voxels": voxels,
        "features": rng.random((20, 768)).astype(np.float16),
        "views": rng.integers(0, 256, (views, size, size, 4), dtype=np.uint8),
        "c2w": camera_poses(settings, (0.1, 0.2)).astype(np.float32),
        "intrinsics": intrinsics(settings).astype(np.float32),
    }
    if eval_views is not None:
        arrays["eval_views"] = rng.integers(0, 256, (eval_views, size, size, 4), dtype=np.uint8)
        arrays["eval_c2w"] = eval_camera_poses(settings, (0.1, 0.2)).astype(np.float32)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return {"__key__": key, "npz": buffer.getvalue(), "json": b"{}"}


def test_suite_renders_decoded_gaussians_at_the_held_out_views():
    pytest.importorskip("gsplat")
    torch.manual_seed(0)
    model = Tokenizer.from_preset("tiny", latent_channels=8, patch_size=16, gaussians_per_voxel=2, voxel_grid=16)
    adapter = adapter_for_model(model.eval(), "atoken")
    objects = [object_sample("a", eval_views=4), object_sample("bb", eval_views=4)]
    report = run_suite(adapter, SuiteSettings(metrics=["psnr", "render_3d"], held_out_views=[1, 3]), photo_samples(1),
                       objects=objects)
    rows = [r for r in report.rows if r["modality"] == "3d"]
    assert [r["key"] for r in rows] == ["a/eval_view1", "a/eval_view3", "bb/eval_view1", "bb/eval_view3"]
    assert report.summary["eval_3d_psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows]))
    assert "eval_3d_perceptual_stand_in" in report.summary
    protocol = report.protocols["render_3d"]
    assert protocol["samples"] == 2 and protocol["frames"].startswith("evaluation views [1, 3] of 4 per sample")
    assert "held out from the voxel features" in protocol["views"]
    # Default: every evaluation view, and only those.
    every = run_suite(adapter, SuiteSettings(metrics=["render_3d"]), photo_samples(1), objects=objects[:1])
    assert [r["key"] for r in every.rows if r["modality"] == "3d"] == [f"a/eval_view{i}" for i in range(4)]


def test_3d_samples_without_evaluation_views_are_skipped_not_scored_on_their_inputs():
    """Issue 17: samples ingested before it hold input views only; scoring them would measure the voxel features'
    own views. render_3d is skipped with the reason, and an index outside the evaluation views fails in one line."""
    torch.manual_seed(0)
    model = Tokenizer.from_preset("tiny", latent_channels=8, patch_size=16, gaussians_per_voxel=2, voxel_grid=16)
    adapter = adapter_for_model(model.eval(), "atoken")
    settings = SuiteSettings(metrics=["render_3d"])
    old = run_suite(adapter, settings, photo_samples(1), objects=[object_sample("a", eval_views=None)])
    reason = "samples carry no held-out evaluation views (re-ingest 3D, objects.eval_views > 0)"
    assert old.skipped["render_3d"] == reason
    assert "eval_3d_psnr" not in old.summary and not [r for r in old.rows if r["modality"] == "3d"]
    outside = run_suite(adapter, SuiteSettings(metrics=["render_3d"], held_out_views=[7]), photo_samples(1),
                        objects=[object_sample("a")])
    assert "[7] do not pick among a sample's 2 evaluation views" in outside.skipped["render_3d"]


def test_a_quantizing_adapter_decodes_fsq_codes_and_says_so():
    torch.manual_seed(0)
    model = Tokenizer.from_preset("tiny", latent_channels=48, patch_size=16).eval()
    image = [torch.rand(1, 3, 32, 32) * 2 - 1]
    quantized = adapter_for_model(model, "atoken", quantize=True)
    batch, latent = quantized.encode(image)
    torch.testing.assert_close(latent, model.quantize(model.encode(batch)["mean"])[0])
    assert not torch.allclose(quantized.reconstruct(image)[0], adapter_for_model(model, "atoken").reconstruct(image)[0])
    report = run_suite(quantized, SuiteSettings(metrics=["psnr"]), photo_samples(1))
    assert report.protocols["psnr"]["latent"] == "FSQ-quantized posterior mean"
    with pytest.raises(ValueError, match="FSQ"):
        adapter_for_model(ConvVAE(hidden_channels=8, latent_channels=4), "baseline", quantize=True)


def test_the_report_says_by_how_much_the_transformer_trails_or_leads_the_baseline():
    from atoken.evaluate.report import TRAILS_BASELINE, SuiteReport, baseline_comparison

    def report(psnr: float) -> SuiteReport:
        return SuiteReport({"eval_psnr": psnr}, {}, {"eval_psnr": "psnr"}, [], [[], []], [])

    trailing = "\n".join(baseline_comparison({"atoken": report(17.0), "baseline": report(18.5)}, "tiny"))
    assert "trails the conv-VAE baseline by 1.50 dB" in trailing and TRAILS_BASELINE in trailing
    at_scale = "\n".join(baseline_comparison({"atoken": report(17.0), "baseline": report(18.5)}, "so400m"))
    assert "by 1.50 dB" in at_scale and TRAILS_BASELINE not in at_scale, "the CPU-size explanation is not so400m's"
    leading = "\n".join(baseline_comparison({"atoken": report(19.0), "baseline": report(18.5)}))
    assert "+0.50 dB" in leading and TRAILS_BASELINE not in leading
    assert baseline_comparison({"atoken": report(19.0)}) == [], "no baseline, nothing to say"


def test_rows_spill_to_parquet_chunks_and_a_generator_streams_through(monkeypatch):
    """One-shot iterables work, rows chunked every 4 come back whole and in order, and the per-sample parquet
    file holds the union of the image and clip columns."""
    import pyarrow.parquet as pq

    from atoken.evaluate.stage import per_sample_parquet
    from atoken.evaluate.suite import RowLog

    monkeypatch.setattr(RowLog, "CHUNK_ROWS", 4)
    samples = photo_samples(6)
    settings = SuiteSettings(metrics=["psnr", "ssim"], batch_size=4)
    report = run_suite(adapter_for_model(tiny_tokenizer(), "atoken"), settings, (s for s in samples),
                       (c for c in clip_samples(3)))
    assert len(report.rows.chunks) == 2 and len(report.rows) == 9  # 2 chunks of 4 spilled, 1 row pending
    rows = list(report.rows)
    assert [r["key"] for r in rows] == [s["__key__"] for s in samples] + ["clip_0", "clip_1", "clip_2"]
    assert all("frames" not in r for r in rows[:6]) and all(r["frames"] == 12 for r in rows[6:])
    assert report.summary["eval_psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows[:6]]))
    table = pq.read_table(io.BytesIO(per_sample_parquet({"atoken": report, "other": report})))
    assert table.num_rows == 18 and {"tokenizer", "key", "psnr", "ssim", "frames"} <= set(table.column_names)
    assert table.column("frames").to_pylist()[:9] == [None] * 6 + [12.0] * 3


def test_a_failing_metric_is_recorded_and_the_others_keep_their_numbers(monkeypatch):
    import atoken.evaluate.suite as suite

    class Broken(torch.nn.Module):
        protocol = {"network": "broken", "weights_sha256": "0"}

        def forward(self, x, y):
            raise RuntimeError("out of memory on the perceptual network")

    monkeypatch.setattr(suite, "shared_network", lambda kind, path=None: Broken())
    settings = SuiteSettings(metrics=["psnr", "ssim", "lpips"], batch_size=2)
    report = run_suite(adapter_for_model(tiny_tokenizer(), "atoken"), settings, photo_samples(4))
    assert report.skipped["lpips"] == "failed: RuntimeError: out of memory on the perceptual network"
    assert {"eval_psnr", "eval_ssim"} <= set(report.summary) and "eval_perceptual_stand_in" not in report.summary
    assert all("psnr" in row and "perceptual_stand_in" not in row for row in report.rows)


def test_protocols_name_the_data_they_ran_on():
    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    settings = SuiteSettings(metrics=["psnr"])
    samples = photo_samples(3)
    data = run_suite(adapter, settings, samples).protocols["psnr"]["data"]
    assert data.startswith("3 samples, blake2b:")
    assert run_suite(adapter, settings, samples[::-1]).protocols["psnr"]["data"] == data  # order does not matter
    edited = [samples[0], samples[1], {**samples[2], "png": photo_samples(4)[3]["png"]}]  # same keys, new pixels
    assert run_suite(adapter, settings, edited).protocols["psnr"]["data"] != data


def test_a_second_tokenizer_reuses_reference_statistics_only_on_the_same_data(monkeypatch):
    import atoken.evaluate.suite as suite
    from atoken.evaluate.metrics.fid import InceptionFeatures

    network, calls = InceptionFeatures(), []

    class Counting:
        protocol = network.protocol

        def features(self, images):
            calls.append(len(images))
            return network.features(images)

    monkeypatch.setattr(suite, "shared_network", lambda kind, path=None: Counting())
    monkeypatch.setattr(suite, "REFERENCE_STATS", {})
    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    settings = SuiteSettings(metrics=["rfid"], batch_size=4)
    first_data, other_data = photo_samples(4), photo_samples(6)[2:]
    first = run_suite(adapter, settings, first_data).summary["eval_rfid"]
    assert calls == [4, 4]  # reference and reconstruction
    calls.clear()
    again = run_suite(adapter, settings, first_data).summary["eval_rfid"]
    assert calls == [4] and again == pytest.approx(first, rel=1e-9)  # the reference pass was skipped
    calls.clear()
    other = run_suite(adapter, settings, other_data).summary["eval_rfid"]
    assert calls == [4, 4]  # other data: the reference side was read again, not taken from the cache
    monkeypatch.setattr(suite, "REFERENCE_STATS", {})
    assert other == pytest.approx(run_suite(adapter, settings, other_data).summary["eval_rfid"], rel=1e-9)


def test_the_evaluation_task_asks_for_a_gpu_where_the_cluster_has_one():
    from atoken.evaluate.stage import task_resources

    cpu_only = [{"Resources": {"CPU": 32.0}}, {"Resources": {"CPU": 8.0}}]
    assert task_resources(cpu_only) == {"num_cpus": 32, "num_gpus": 0}
    mixed = [*cpu_only, {"Resources": {"CPU": 16.0, "GPU": 8.0}}]
    assert task_resources(mixed) == {"num_cpus": 16, "num_gpus": 1}  # the GPU node's CPUs, not the largest node's


def test_the_report_warns_when_rfid_used_fewer_samples_than_published_tables():
    from atoken.evaluate.report import SuiteReport, sample_count

    def report(samples: int) -> SuiteReport:
        return SuiteReport({"eval_rfid": 5.0}, {"rfid": {"samples": samples}}, {"eval_rfid": "rfid"}, [], [[], []], [])

    assert "published tables use 50,000" in sample_count(report(5000), "eval_rfid")
    assert sample_count(report(50_000), "eval_rfid") == "50000"


def test_a_clip_too_short_for_i3d_is_skipped_with_its_reason_and_the_rest_scored(i3d_model, monkeypatch):
    """Two 12-frame clips and one of 6 (I3D needs 9): rFVD on the two, the short one named, video PSNR/SSIM and
    video LPIPS (the declared stand-in) on all three, TokenBench's one-MSE-per-clip PSNR."""
    import atoken.evaluate.suite as suite
    from atoken.evaluate.metrics.video import video_psnr

    real = suite.shared_network
    monkeypatch.setattr(suite, "shared_network", lambda kind, path=None: i3d_model if kind == "i3d" else real(kind))
    clips = [*clip_samples(2), *[{**c, "__key__": "short"} for c in clip_samples(1, frames=6)]]
    settings = SuiteSettings(metrics=["psnr", "ssim", "lpips", "rfvd"], batch_size=2)
    report = run_suite(adapter_for_model(tiny_tokenizer(), "atoken"), settings, photo_samples(2), clips)
    assert report.protocols["rfvd"]["samples"] == 2 and report.protocols["rfvd"]["preset"] == "tokenbench"
    assert "1 clips: 6 frames: I3D needs at least 9 frames" in report.skipped["rfvd (some clips)"]
    assert np.isfinite(report.summary["eval_rfvd"]) and "rfvd" not in report.skipped
    video_rows = [r for r in report.rows if r["modality"] == "video"]
    assert [r["key"] for r in video_rows] == ["clip_0", "clip_1", "short"]
    assert all("perceptual_stand_in" in r for r in video_rows) and "eval_video_perceptual_stand_in" in report.summary
    from atoken.train.data import decode_media

    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    clip = decode_media(clips[0])
    (decoded,) = adapter.reconstruct([clip])
    expected = video_psnr(np.stack([to_uint8(f) for f in clip]), np.stack([to_uint8(f) for f in decoded]))
    assert video_rows[0]["psnr"] == pytest.approx(expected, abs=1e-9)


def test_a_clip_that_cannot_be_decoded_is_counted_and_the_others_scored():
    clips = [*clip_samples(2), {"__key__": "broken", "npy": b"not a numpy file", "json": b"{}"}]
    settings = SuiteSettings(metrics=["psnr", "ssim"])
    report = run_suite(adapter_for_model(tiny_tokenizer(), "atoken"), settings, photo_samples(2), clips)
    assert report.skipped["video samples"].startswith("1 not scored (first: broken: ")
    assert [r["key"] for r in report.rows if r["modality"] == "video"] == ["clip_0", "clip_1"]
    assert report.protocols["video_psnr"]["samples"] == 2 and "eval_psnr" in report.summary


def test_the_baseline_keeps_its_own_protocol_when_only_its_latent_differs():
    from atoken.evaluate.stage import combined

    fields = {"samples": 2, "latent": "FSQ-quantized posterior mean"}
    first = SuiteReport({"eval_psnr": 20.0}, {"psnr": fields}, {"eval_psnr": "psnr"}, [], [[], []], [])
    baseline = SuiteReport({"eval_psnr": 19.0}, {"psnr": fields | {"latent": "posterior mean (no sampling)"}},
                           {"eval_psnr": "psnr"}, [], [[], []], [])
    _, protocols, metric_protocols = combined({"atoken": first, "baseline": baseline})
    assert metric_protocols["baseline_eval_psnr"] == "baseline.psnr"
    assert protocols["baseline.psnr"]["latent"] == "posterior mean (no sampling)"
