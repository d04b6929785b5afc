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


def native_samples() -> list[dict]:
    """Validation samples as native-aspect ingest writes them: non-square, of two sizes, one of them not a
    multiple of the 16-px patch (72x40) and one that is (48x80)."""
    samples = []
    for index, path in enumerate(sorted(PHOTOS.glob("*.png"))[:4]):
        size = (72, 40) if index % 2 == 0 else (48, 80)
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize(size).save(buffer, format="PNG")
        meta = {"caption": path.stem, "source": "skimage-photos", "width": size[0], "height": size[1]}
        samples.append({"__key__": f"native_{path.stem}", "png": buffer.getvalue(), "json": json.dumps(meta).encode()})
    return samples


@pytest.mark.parametrize("kind", ["atoken", "conv_vae"])
def test_non_square_images_of_two_sizes_are_scored_on_the_patch_grid_crop(kind):
    """Native-aspect shards: each image is centre-cropped to multiples of the tokenizer's patch (AToken's patchify
    would otherwise decode a smaller image than the reference), both sizes in one batch, and the protocol says so."""
    from atoken.evaluate.suite import crop_to_multiple
    from atoken.train.data import decode_image

    torch.manual_seed(0)
    model = tiny_tokenizer() if kind == "atoken" else ConvVAE(hidden_channels=8, latent_channels=4).eval()
    adapter = adapter_for_model(model, kind)
    assert adapter.multiple == 16
    samples = native_samples()
    report = run_suite(adapter, SuiteSettings(metrics=["psnr", "ssim"], batch_size=4), samples)
    rows = [r for r in report.rows if r["modality"] == "image"]
    assert [r["resolution"] for r in rows] == ["32x64", "80x48", "32x64", "80x48"], "H x W: 72x40 cropped to 64x32"
    for sample, row in zip(samples, rows, strict=True):  # independently: crop, reconstruct alone, PSNR
        pixels = crop_to_multiple(decode_image(sample)[None], 16)
        (decoded,) = adapter.reconstruct([pixels])
        assert row["psnr"] == pytest.approx(psnr_uint8(to_uint8(pixels[0]), to_uint8(decoded[0])), abs=1e-4)
    assert report.protocols["psnr"]["crop"].startswith("centre crop of each side down to a multiple of 16 px")
    assert report.protocols["psnr"]["resolution"] == "32x64, 80x48"
    # Sizes already on the grid are not cropped, and the protocol says only what ingest did.
    on_grid = run_suite(adapter, SuiteSettings(metrics=["psnr"]), samples[1::2])
    assert on_grid.protocols["psnr"]["crop"] == "none (ingest: native aspect, long side capped)"


# -- evaluate.image_size: the published short side + centre crop, on native-aspect shards ---------------------

def native_photos(sizes: tuple[tuple[int, int], ...] = ((400, 300), (300, 500))) -> list[dict]:
    """Native-aspect validation samples larger than the eval size, of two (W, H) sizes, one wide and one tall."""
    samples = []
    for index, path in enumerate(sorted(PHOTOS.glob("*.png"))[:4]):
        size = sizes[index % len(sizes)]
        buffer = io.BytesIO()
        Image.open(path).convert("RGB").resize(size, Image.Resampling.LANCZOS).save(buffer, format="PNG")
        meta = {"caption": path.stem, "source": "skimage-photos", "width": size[0], "height": size[1]}
        samples.append({"__key__": f"native_{path.stem}", "png": buffer.getvalue(), "json": json.dumps(meta).encode()})
    return samples


def reference_256(sample: dict) -> torch.Tensor:
    """The published protocol written out by hand for the two sizes of native_photos: PIL bicubic to short side
    256 (long side int(long · 256 / short)), then the centre 256² at torchvision's CenterCrop offsets."""
    image = Image.open(io.BytesIO(sample["png"])).convert("RGB")
    resized, box = {(400, 300): ((341, 256), (42, 0)), (300, 500): ((256, 426), (0, 85))}[image.size]
    array = np.asarray(image.resize(resized, Image.Resampling.BICUBIC))[box[1]:box[1] + 256, box[0]:box[0] + 256]
    return torch.from_numpy(array.astype(np.float32)).permute(2, 0, 1)[None] / 127.5 - 1.0  # (1, 3, 256, 256)


class Spy:
    """An Inception stand-in that records the uint8 images it is handed (and returns real features)."""

    def __init__(self):
        from atoken.evaluate.metrics.fid import InceptionFeatures

        self.network, self.shapes = InceptionFeatures(), []
        self.protocol = self.network.protocol

    def features(self, images):
        self.shapes += [tuple(image.shape) for image in images]
        return self.network.features(images)


def test_image_size_256_feeds_every_image_metric_a_256_square_and_the_protocols_say_so(monkeypatch):
    """Native shards of two non-square sizes: reconstruction, PSNR/SSIM/LPIPS, rFID's Inception, the pooled
    embedding (zero-shot, retrieval), the grid and the worst-k all see the 256² centre crop of the short-side
    resize, computed here by hand; every image protocol records it."""
    import atoken.evaluate.suite as suite

    spy = Spy()
    real = suite.shared_network
    monkeypatch.setattr(suite, "shared_network", lambda kind, path=None: spy if kind == "inception" else real(kind))
    monkeypatch.setattr(suite, "REFERENCE_STATS", {})
    torch.manual_seed(0)
    model = Tokenizer.from_preset("tiny", latent_channels=8, patch_size=16, text_dim=384).eval()
    adapter = adapter_for_model(model, "atoken")
    seen = {"reconstruct": [], "embed": []}
    for name in seen:
        inner = getattr(adapter, name)

        def wrapped(media, inner=inner, name=name):
            seen[name] += [tuple(m.shape) for m in media]
            return inner(media)

        setattr(adapter, name, wrapped)
    distances, real_distances = [], suite.perceptual_distances
    monkeypatch.setattr(suite, "perceptual_distances",
                        lambda net, pairs: distances.extend(p[0].shape for p in pairs) or real_distances(net, pairs))
    samples = native_photos()
    settings = SuiteSettings(metrics=["psnr", "ssim", "lpips", "rfid", "retrieval"], batch_size=2, image_size=256)
    report = run_suite(adapter, settings, samples)
    assert set(seen["reconstruct"]) == set(seen["embed"]) == {(1, 3, 256, 256)}
    assert set(distances) == {(256, 256, 3)} and set(spy.shapes) == {(256, 256, 3)} and len(spy.shapes) == 8
    rows = [r for r in report.rows if r["modality"] == "image"]
    assert {r["resolution"] for r in rows} == {"256x256"}
    assert {t.shape for row in report.grid for t in row} == {(256, 256, 3)}
    assert {w["original"].shape for w in report.worst} == {(256, 256, 3)}
    for sample, row in zip(samples, rows, strict=True):  # the by-hand protocol, reconstructed alone
        pixels = reference_256(sample)
        (decoded,) = adapter.reconstruct([pixels])
        assert row["psnr"] == pytest.approx(psnr_uint8(to_uint8(pixels[0]), to_uint8(decoded[0])), abs=1e-4)
    wording = "short side 256 (PIL bicubic, antialiased"
    for metric in ("psnr", "ssim", "perceptual_stand_in", "rfid", "image_retrieval"):
        assert report.protocols[metric]["preprocess"].startswith(wording), metric
        assert "centre crop 256" in report.protocols[metric]["preprocess"]
    assert report.protocols["psnr"]["crop"] == "none (ingest: native aspect, long side capped)"
    assert report.protocols["psnr"]["resolution"] == "256x256"


def test_a_run_at_image_size_256_and_one_at_the_shards_size_refuse_to_compare(monkeypatch):
    import atoken.evaluate.suite as suite
    from atoken.evaluate.protocols import ProtocolMismatch, compare_protocols

    monkeypatch.setattr(suite, "REFERENCE_STATS", {})
    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    samples = native_photos()[:3]
    at_256, native = (run_suite(adapter, SuiteSettings(metrics=["psnr", "rfid"], image_size=size), samples)
                      for size in (256, None))
    assert native.protocols["psnr"]["preprocess"] == "none: the validation shards' own size"
    for metric in ("psnr", "rfid"):
        compare_protocols(metric, at_256.protocols[metric], at_256.protocols[metric])
        with pytest.raises(ProtocolMismatch):  # the first differing field named (crop, sorted before preprocess)
            compare_protocols(metric, at_256.protocols[metric], native.protocols[metric])
        # The size alone is enough: the same protocol but for `preprocess` is refused, naming it.
        alone = {**at_256.protocols[metric], "preprocess": native.protocols[metric]["preprocess"]}
        with pytest.raises(ProtocolMismatch, match="'preprocess' differs"):
            compare_protocols(metric, at_256.protocols[metric], alone)


def test_the_rfid_reference_cache_keys_on_image_size(monkeypatch):
    """The baseline scored after the tokenizer reuses the reference statistics only at the same image_size: at
    another size the reference side is read again, and equals a fresh run's."""
    import atoken.evaluate.suite as suite

    spy = Spy()
    monkeypatch.setattr(suite, "shared_network", lambda kind, path=None: spy)
    monkeypatch.setattr(suite, "REFERENCE_STATS", {})
    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    samples = native_photos()[:3]
    run_suite(adapter, SuiteSettings(metrics=["rfid"], image_size=256), samples)
    spy.shapes.clear()
    at_128 = run_suite(adapter, SuiteSettings(metrics=["rfid"], image_size=128), samples).summary["eval_rfid"]
    assert spy.shapes == [(128, 128, 3)] * 6  # both sides at 128, not the cached 256 statistics
    monkeypatch.setattr(suite, "REFERENCE_STATS", {})
    fresh = run_suite(adapter, SuiteSettings(metrics=["rfid"], image_size=128), samples).summary["eval_rfid"]
    assert at_128 == pytest.approx(fresh, rel=1e-9)


def test_rfid_on_non_square_images_at_the_shards_size_scores_the_centre_square_not_a_squash(monkeypatch):
    """image_size null, native shards (72x40 and 48x80): rFID equals fid.rfid on the centre squares cut here by
    hand from the patch-grid crops and their reconstructions, and differs from squashing them to 299²."""
    import atoken.evaluate.suite as suite
    from atoken.evaluate.metrics import fid
    from atoken.evaluate.suite import crop_to_multiple
    from atoken.train.data import decode_image

    monkeypatch.setattr(suite, "REFERENCE_STATS", {})
    network = fid.InceptionFeatures()
    monkeypatch.setattr(suite, "shared_network", lambda kind, path=None: network)
    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    samples = native_samples()
    report = run_suite(adapter, SuiteSettings(metrics=["rfid"], batch_size=4), samples)
    references, reconstructions = [], []
    for sample in samples:
        pixels = crop_to_multiple(decode_image(sample)[None], 16)  # H x W 32x64 or 80x48
        (decoded,) = adapter.reconstruct([pixels])
        references.append(to_uint8(pixels[0]))
        reconstructions.append(to_uint8(decoded[0]))
    square = {(32, 64): (slice(0, 32), slice(16, 48)), (80, 48): (slice(16, 64), slice(0, 48))}  # (H, W) → box
    cut = [[image[square[image.shape[:2]]] for image in side] for side in (references, reconstructions)]
    assert {image.shape for image in cut[0]} == {(32, 32, 3), (48, 48, 3)}
    expected = fid.rfid(cut[0], cut[1], network=network, progress=False)
    assert report.summary["eval_rfid"] == pytest.approx(expected, rel=1e-6)

    def squashed(images):
        x = torch.stack([fid.resize_tf1_bilinear(torch.from_numpy(image)) for image in images])  # (B, 299, 299, 3)
        return network.network(((x - 128.0) / 128.0).permute(0, 3, 1, 2).float()).double().numpy()

    from atoken.evaluate.metrics.frechet import FrechetStats, frechet_from_stats

    stats = [FrechetStats(fid.FEATURE_DIM) for _ in range(2)]
    for stat, side in zip(stats, (references, reconstructions), strict=True):
        stat.update(squashed(side))
    assert abs(frechet_from_stats(*stats) - report.summary["eval_rfid"]) > 1e-3 * abs(expected)
    assert "never squashed" in report.protocols["rfid"]["network_input"]


def test_the_square_quickstart_path_is_unchanged_by_image_size(monkeypatch):
    """Negative control: 64-px square shards (the quickstart's) score the same with image_size null as with 64
    (the resize is then the identity), and as the path before image_size existed, written out here: decode,
    reconstruct, PSNR per image; rFID with the TF1 resize straight to 299 (no crop: the images are square)."""
    import atoken.evaluate.suite as suite
    from atoken.evaluate.metrics import fid
    from atoken.evaluate.metrics.frechet import FrechetStats, frechet_from_stats
    from atoken.pipeline.tracking import grid_png
    from atoken.train.data import decode_image

    monkeypatch.setattr(suite, "REFERENCE_STATS", {})
    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    samples = photo_samples(4)
    settings = {size: SuiteSettings(metrics=["psnr", "ssim", "rfid"], grid_samples=4, image_size=size)
                for size in (None, 64)}
    reports = {size: run_suite(adapter, s, samples) for size, s in settings.items()}
    assert reports[None].summary == reports[64].summary
    assert list(reports[None].rows) == list(reports[64].rows)
    references, reconstructions = [], []
    for sample in samples:
        pixels = decode_image(sample)
        (decoded,) = adapter.reconstruct([pixels[None]])
        references.append(to_uint8(pixels))
        reconstructions.append(to_uint8(decoded[0]))
    rows = [r for r in reports[None].rows if r["modality"] == "image"]
    assert [r["psnr"] for r in rows] == pytest.approx([psnr_uint8(a, b) for a, b in
                                                       zip(references, reconstructions, strict=True)], abs=1e-9)
    network = suite.shared_network("inception")
    stats = [FrechetStats(fid.FEATURE_DIM) for _ in range(2)]
    for stat, side in zip(stats, (references, reconstructions), strict=True):
        x = torch.stack([fid.resize_tf1_bilinear(torch.from_numpy(image)) for image in side])  # (B, 299, 299, 3)
        stat.update(network.network(((x - 128.0) / 128.0).permute(0, 3, 1, 2).float().to(network.device))
                    .double().cpu().numpy())
    assert reports[None].summary["eval_rfid"] == pytest.approx(frechet_from_stats(*stats), rel=1e-6)
    # Tiles of one size are not padded: the grid is byte for byte what grid_png made of them before.
    assert images({"a": reports[None]})["a_reconstructions.png"] == grid_png(reports[None].grid)


def test_grid_tiles_of_other_sizes_are_padded_on_white_not_squashed():
    from atoken.evaluate.report import padded_tiles

    rng = np.random.default_rng(0)
    wide, tall = (rng.integers(0, 255, shape, dtype=np.uint8) for shape in ((32, 64, 3), (80, 48, 3)))
    report = SuiteReport({}, {}, {}, [], [[wide, tall], [wide, tall]], [])
    grid = np.asarray(Image.open(io.BytesIO(images({"a": report})["a_reconstructions.png"])))
    assert grid.shape == (2 * (80 + 2), 2 * (64 + 2), 3)  # tiles of the largest height and width
    np.testing.assert_array_equal(grid[24:56, 0:64], wide)  # centred: (80 - 32) / 2 rows of white above
    np.testing.assert_array_equal(grid[0:80, 66 + 8:66 + 56], tall)  # (64 - 48) / 2 columns of white left
    assert (grid[0:24, 0:64] == 255).all() and (grid[0:80, 66:74] == 255).all()
    assert [t.shape for t in padded_tiles([[wide], [tall]])[0]] == [(80, 64, 3)]


def native_clip_samples() -> list[dict]:
    """Native-aspect clips of two sizes, 12 frames: 40x72 (H x W, cropped to 32x64 on the 16-px grid) and 48x32."""
    rng = np.random.default_rng(1)
    out = []
    for index, (height, width) in enumerate(((40, 72), (48, 32), (40, 72))):
        clip = np.clip(np.cumsum(rng.integers(-8, 9, (12, height, width, 3)), axis=0) + 128, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        np.save(buffer, clip)
        out.append({"__key__": f"native_clip_{index}", "npy": buffer.getvalue(),
                    "json": json.dumps({"caption": f"clip {index}", "source": "synthetic"}).encode()})
    return out


def test_non_square_native_clips_reach_rfvd_at_their_size_and_tokenbench_crops_them_to_224(i3d_model, monkeypatch):
    """Clips are not touched by image_size: coded at their patch-grid crop, handed to rFVD as such, where the
    TokenBench preset resizes the short side to 224 (ceil of the long side) and centre-crops 224², as written
    out here; video grid tiles padded, not squashed."""
    import torch.nn.functional as F

    import atoken.evaluate.suite as suite
    from atoken.evaluate.metrics import fvd

    real = suite.shared_network
    monkeypatch.setattr(suite, "shared_network", lambda kind, path=None: i3d_model if kind == "i3d" else real(kind))
    handed, update = [], fvd.FVDAccumulator.update
    monkeypatch.setattr(fvd.FVDAccumulator, "update",
                        lambda self, ref, rec: handed.extend(ref) or update(self, ref, rec))
    settings = SuiteSettings(metrics=["psnr", "rfvd"], image_size=256)
    adapter = adapter_for_model(tiny_tokenizer(), "atoken")
    report = run_suite(adapter, settings, photo_samples(2), native_clip_samples())
    assert [r["resolution"] for r in report.rows if r["modality"] == "video"] == ["32x64", "48x32", "32x64"]
    assert [clip.shape for clip in handed] == [(12, 32, 64, 3), (12, 48, 32, 3), (12, 32, 64, 3)]
    assert np.isfinite(report.summary["eval_rfvd"]) and report.protocols["rfvd"]["preset"] == "tokenbench"
    assert "centre crop 224" in report.protocols["rfvd"]["network_input"]
    assert report.protocols["video_psnr"]["crop"].startswith("centre crop of each side down to a multiple of 16")
    for clip, resized, box in ((handed[0], (224, 448), (0, 112)), (handed[1], (336, 224), (56, 0))):
        x = torch.from_numpy(clip).permute(0, 3, 1, 2).double() / 255.0  # (T, 3, H, W)
        x = F.interpolate(x.float(), size=resized, mode="bilinear", align_corners=False)
        x = x[:, :, box[0]:box[0] + 224, box[1]:box[1] + 224]
        torch.testing.assert_close(fvd.preprocess(clip), ((x - 0.5) * 2).permute(0, 2, 3, 1), atol=1e-6, rtol=0)
    grid = np.asarray(Image.open(io.BytesIO(images({"a": report})["a_clips.png"])))
    assert grid.shape[:2] == (2 * (32 + 2), 3 * (64 + 2))  # the first clip, original and reconstruction, unsquashed
