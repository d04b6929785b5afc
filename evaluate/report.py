"""The evaluation report: Markdown beside PNG images (reconstruction grids, worst-k samples, clip frames),
numbers of every tokenizer side by side with the sample counts behind them (and a warning where they are too
few to set beside published tables), per-resolution and per-source tables and every tokenizer's protocols."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from atoken.evaluate.suite import SuiteReport
from atoken.pipeline.tracking import grid_png

PER_SAMPLE = ("psnr", "ssim", "lpips", "perceptual_stand_in")


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


# The sample counts of the published tables: rFID on ImageNet's 50k validation images (LlamaGen, TiTok, AToken).
# rFVD's comes from its preset's protocol (`clips_required`: StyleGAN-V's 2048; TokenBench scores its whole set).
PUBLISHED_COUNTS = {"rfid": 50_000}


def group_rows(report: SuiteReport, by: int) -> list[list[Any]]:
    """(modality, resolution (by=1) or source (by=2), count, mean of each per-sample metric) per group,
    from the rows' running sums."""
    groups: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {"count": 0})
    for key, totals in report.rows.groups.items():
        into = groups[(key[0], key[by] or "-")]
        into["count"] += totals["count"]
        for metric in PER_SAMPLE:
            if metric in totals:
                into.setdefault(metric, [0.0, 0])
                into[metric][0] += totals[metric][0]
                into[metric][1] += totals[metric][1]
    out = []
    for (modality, name), totals in sorted(groups.items()):
        means = [totals[m][0] / totals[m][1] if m in totals and totals[m][1] == totals["count"] else None
                 for m in PER_SAMPLE]
        out.append([modality, name, totals["count"], *means])
    return out


def sample_count(report: SuiteReport, key: str) -> str:
    """The samples behind a summary number, with a warning where a Fréchet distance used too few to stand beside
    published tables (it is biased upwards at small counts)."""
    metric = report.metric_protocols.get(key)
    samples = report.protocols.get(metric, {}).get("samples")
    if samples is None:
        return "–"
    published = PUBLISHED_COUNTS.get(metric or "") or report.protocols.get(metric, {}).get("clips_required")
    published = int(published) if str(published).isdigit() else None
    if published and int(samples) < published:
        return f"{samples} (⚠ published tables use {published:,}: not comparable with them)"
    return str(samples)


def padded_tiles(rows: list[list[np.ndarray]]) -> list[list[np.ndarray]]:
    """Rows of (H, W, 3) uint8 images of any sizes → the same images, each centred on white in a tile of the
    largest height and width among them: grid_png sizes every tile as the first image, and native-aspect shards'
    images of other sizes or aspects would be squashed to it. Padded, never resized or cropped: each tile shows
    the pixels that were scored."""
    height = max(image.shape[0] for row in rows for image in row)
    width = max(image.shape[1] for row in rows for image in row)
    out = []
    for row in rows:
        tiles = []
        for image in row:
            tile = np.full((height, width, 3), 255, dtype=np.uint8)  # (H_max, W_max, 3)
            top, left = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
            tile[top:top + image.shape[0], left:left + image.shape[1]] = image
            tiles.append(tile)
        out.append(tiles)
    return out


def images(reports: dict[str, SuiteReport]) -> dict[str, bytes]:
    """PNG files of the report, by file name; tiles padded to one size (padded_tiles), never squashed."""
    files: dict[str, bytes] = {}
    for name, report in reports.items():
        if report.grid and report.grid[0]:
            files[f"{name}_reconstructions.png"] = grid_png(padded_tiles(report.grid))
        if report.worst:
            files[f"{name}_worst.png"] = grid_png(padded_tiles(
                [[w["original"] for w in report.worst], [w["reconstruction"] for w in report.worst]]
            ))
        if report.video_grid:
            files[f"{name}_clips.png"] = grid_png(padded_tiles(report.video_grid))
    return files


# Why a conv VAE can lead the transformer at the quickstart's size, and what closes the gap (measured in
# benchmarks/results/quickstart-tuning.json; README "What is built"). Said only of the CPU-size presets.
EXPLAINED_PRESETS = ("tiny", "small")
TRAILS_BASELINE = (
    "At this size the comparison favours the baseline: the tiny transformer (1.2 M parameters, 2 blocks of width 96) "
    "sees a 64-px image as 16 tokens of 16x16 pixels, starts from random weights and trains for a few hundred CPU "
    "steps, while the conv VAE's 3x3 kernels build in the locality a transformer must learn. The tuning on the "
    "training split (learning rate, batch, loss weights, width) is in `benchmarks/results/quickstart-tuning.json`. "
    "The paper's recipe changes what this run cannot: the encoder starts from SigLIP2 (not yet wired into the "
    "curriculum: issue 15), the model is 100-700x larger, and stage 1 trains 200k steps at 64 to 512 px."
)


def baseline_comparison(reports: dict[str, SuiteReport], preset: str | None = None) -> list[str]:
    """Lines saying how the transformer (of `preset`) stands against the conv-VAE baseline on the same held-out
    images; the explanation of a gap only where it was measured (EXPLAINED_PRESETS)."""
    atoken, baseline = reports.get("atoken"), reports.get("baseline")
    if atoken is None or baseline is None:
        return []
    mine, theirs = atoken.summary.get("eval_psnr"), baseline.summary.get("eval_psnr")
    if mine is None or theirs is None:
        return []
    lines = ["## Against the baseline", ""]
    if mine >= theirs:
        lines.append(f"The transformer reaches {mine:.2f} dB PSNR on the held-out images, the conv-VAE baseline "
                     f"{theirs:.2f} dB (+{mine - theirs:.2f} dB; the baseline trains with the stage-1 harness for "
                     "`evaluate.baseline_steps`, stage 1's steps by default).")
    else:
        why = f" {TRAILS_BASELINE}" if preset in EXPLAINED_PRESETS else ""
        lines.append(f"The transformer trails the conv-VAE baseline by {theirs - mine:.2f} dB PSNR on the held-out "
                     f"images ({mine:.2f} vs {theirs:.2f} dB; the baseline trains with the stage-1 harness for "
                     f"`evaluate.baseline_steps`, stage 1's steps by default).{why}")
    return [*lines, ""]


def render_markdown(
    title: str, reports: dict[str, SuiteReport], image_files: dict[str, bytes], notes: dict[str, str] | None = None,
    preset: str | None = None,
) -> str:
    names = list(reports)
    lines = [f"# {title}", ""]
    for key, value in (notes or {}).items():
        lines.append(f"- **{key}**: {value}")
    keys = sorted({k for r in reports.values() for k in r.summary})
    lines += ["", "## Metrics", "", "Each number was measured under the protocol named beside it (tables below).", ""]
    rows = [
        [
            key,
            next(r.metric_protocols[key] for r in reports.values() if key in r.metric_protocols),
            *[reports[n].summary.get(key) for n in names],
            *[sample_count(reports[n], key) if key in reports[n].summary else "–" for n in names],
        ]
        for key in keys
    ]
    lines += [markdown_table(["metric", "protocol", *names, *[f"samples ({n})" for n in names]], rows), ""]
    lines += baseline_comparison(reports, preset)
    skipped = [[n, metric, why] for n in names for metric, why in sorted(reports[n].skipped.items())]
    if skipped:
        lines += ["## Not measured", "", markdown_table(["tokenizer", "metric", "why"], skipped), ""]
    for title, column, by in (("Per resolution", "resolution", 1), ("Per source", "source", 2)):
        lines += [f"## {title}", ""]
        for name in names:
            table = markdown_table(["modality", column, "samples", *PER_SAMPLE], group_rows(reports[name], by))
            lines += [f"### {name}", "", table, ""]
    lines += ["## Images", ""]
    for name in names:
        for suffix, caption in (
            ("reconstructions", "originals (top), reconstructions (bottom); tiles of other sizes padded on white, "
                                "never resized"),
            ("worst", f"the {len(reports[name].worst)} lowest-PSNR images"),
            ("clips", "clip frames 0, 4, 8, 12: original, reconstruction"),
        ):
            file = f"{name}_{suffix}.png"
            if file in image_files:
                lines += [f"**{name}**: {caption}", "", f"![{name} {suffix}]({file})", ""]
        if reports[name].worst:
            lines += [
                markdown_table(
                    ["rank", "key", "psnr"], [[i + 1, w["key"], w["psnr"]] for i, w in enumerate(reports[name].worst)]
                ),
                "",
            ]
    lines += ["## Protocols", ""]
    for name in names:
        for metric, fields in sorted(reports[name].protocols.items()):
            lines += [f"### {name}: {metric}", "",
                      markdown_table(["field", "value"], [[k, v] for k, v in fields.items()]), ""]
    return "\n".join(lines)
