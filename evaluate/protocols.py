"""Every number's protocol, as MLflow tags, and the rule that numbers under different protocols never meet.

A metric's protocol is a flat dict of the fields that change its value: resize and crop, colour range,
sample and frame counts, the data it ran on (a hash of the sorted sample keys and their content), the feature
network and its file's sha256, the whole metric chain's code (every module from decoding the sample to the
distance, as syntax trees: a comment or docstring edit keeps it, a changed statement does not), the library
versions, and whether a stand-in replaced the published network. They are logged as tags
`protocol.<metric>.<field>`; `compare_protocols` names the first field in which two runs differ, and
`atoken compare` refuses to put such numbers side by side. Fields that only describe (DESCRIPTIVE_FIELDS, e.g.
which latent the tokenizer decoded) are shown but never refuse.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TAG_PREFIX = "protocol."
# Which protocol a summary number was measured under: tag `protocol_of.<summary key>` = metric name.
METRIC_TAG_PREFIX = "protocol_of."
# The fields every protocol carries (a metric adds its own details beside them).
COMMON_FIELDS = (
    "resize",
    "crop",
    "colour_range",
    "samples",
    "frames",
    "feature_network",
    "feature_network_sha256",
    "implementation",
    "stand_in",
    "libraries",
)
# Shown beside the numbers but not a reason to refuse them: an FSQ and a continuous tokenizer are compared on
# the same protocol precisely to see what the latent costs.
DESCRIPTIVE_FIELDS = ("latent", "note")
# The libraries whose arithmetic every metric goes through.
LIBRARIES = ("torch", "numpy", "pillow", "av")


class ProtocolMismatch(ValueError):
    """Two numbers of one metric were measured under different protocols; the message names the field."""


def implementation_version(*module_files: str) -> str:
    """`atoken <file stems>@<sha256[:12]>` of the metric chain's modules as syntax trees (docstrings and comments
    dropped): a changed statement in any of them changes the version, a comment or docstring edit does not."""
    from atoken.pipeline.dag import normalised_code

    digest = hashlib.sha256()
    for file in module_files:
        path = Path(file)
        digest.update(path.name.encode() + b"\0" + normalised_code(path.read_text()).encode())
    names = "+".join(Path(file).stem for file in module_files)
    return f"atoken {names}@{digest.hexdigest()[:12]}"


def library_versions() -> dict[str, str]:
    from atoken.preprocess.job import library_versions as versions

    return versions(LIBRARIES)


# Fields of a sample's json that say where its data was read from and how it was filed, not what it is: its key and
# its item's (file keys hash the source's path), the source (a folder's, a prefix's or a list file's path) and the
# split (drawn from the key's hash unless the source pins it).
WHERE_FIELDS = ("key", "source", "source_key", "split")


def _content_of_meta(value: bytes) -> bytes:
    """A sample's json without the fields that say where it was read from; other json (not an object) as it is."""
    try:
        meta = json.loads(value)
    except ValueError:
        return value
    if not isinstance(meta, dict):
        return value
    return json.dumps({k: v for k, v in meta.items() if k not in WHERE_FIELDS}, sort_keys=True).encode()


class DataIdentity:
    """Which samples a number was measured on: a hash over the sorted content hashes of the samples (their media
    and metadata, caption included), so that two runs on different validation sets of one size, or on re-encoded
    samples, differ, while the same data ingested from another mount point (other keys, other source paths)
    keeps its identity."""

    def __init__(self):
        self.contents: list[str] = []  # blake2b of each sample's content: ~32 bytes a sample

    def add(self, sample: dict) -> None:
        content = hashlib.blake2b(digest_size=16)
        for name in sorted(k for k in sample if not k.startswith("__")):
            value = sample[name]
            if name == "json":
                value = _content_of_meta(value)
            content.update(name.encode() + b"\0" + (value if isinstance(value, bytes) else str(value).encode()))
        self.contents.append(content.hexdigest())

    def __len__(self) -> int:
        return len(self.contents)

    def subset(self, indices: Iterable[int]) -> DataIdentity:
        """The identity of the samples at `indices` (in the order added): a metric that scored some of them."""
        chosen = DataIdentity()
        chosen.contents = [self.contents[i] for i in indices]
        return chosen

    def digest(self, count: int | None = None) -> str:
        """`<n> samples, blake2b:<hex>` of the first `count` samples added (all by default)."""
        chosen = sorted(self.contents[:count])
        digest = hashlib.blake2b(digest_size=16)
        for content in chosen:
            digest.update(f"{content}\n".encode())
        return f"{len(chosen)} samples, blake2b:{digest.hexdigest()}"


def protocol(
    *,
    resize: str,
    crop: str,
    colour_range: str,
    samples: int,
    frames: int | str,
    feature_network: str,
    feature_network_sha256: str,
    implementation: str,
    stand_in: bool | str,
    **details: Any,
) -> dict[str, Any]:
    """A metric's protocol: the common fields (all required, so none is forgotten), the library versions and its
    own details (`data`: a DataIdentity digest, where the caller knows the samples)."""
    return {
        "resize": resize,
        "crop": crop,
        "colour_range": colour_range,
        "samples": samples,
        "frames": frames,
        "feature_network": feature_network,
        "feature_network_sha256": feature_network_sha256,
        "implementation": implementation,
        "stand_in": stand_in,
        "libraries": library_versions(),
        **details,
    }


def _tag_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)


def flatten_protocol(fields: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested protocol → {"videos.reference": "6", ...}: dotted keys, values as strings (what a tag holds)."""
    flat: dict[str, str] = {}
    for key, value in fields.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_protocol(value, f"{name}."))
        else:
            flat[name] = _tag_value(value)
    return flat


def protocol_tags(protocols: dict[str, dict[str, Any]], metric_protocols: dict[str, str]) -> dict[str, str]:
    """{metric: protocol} and {summary key: metric} → MLflow tags."""
    tags = {
        f"{TAG_PREFIX}{metric}.{key}": value
        for metric, fields in protocols.items()
        for key, value in flatten_protocol(fields).items()
    }
    tags |= {f"{METRIC_TAG_PREFIX}{key}": metric for key, metric in metric_protocols.items()}
    return tags


def protocols_from_tags(tags: dict[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """The inverse of `protocol_tags`, on flattened values: ({metric: {field: value}}, {summary key: metric}).
    Metric names may hold dots (a baseline's own protocol is `baseline.psnr`): the names `protocol_of.*` tags
    give are matched first, longest first."""
    metric_protocols = {
        key.removeprefix(METRIC_TAG_PREFIX): value for key, value in tags.items() if key.startswith(METRIC_TAG_PREFIX)
    }
    names = sorted(set(metric_protocols.values()), key=len, reverse=True)
    protocols: dict[str, dict[str, str]] = {}
    for key, value in tags.items():
        if key.startswith(TAG_PREFIX):
            rest = key.removeprefix(TAG_PREFIX)
            metric = next((name for name in names if rest.startswith(f"{name}.")), rest.partition(".")[0])
            protocols.setdefault(metric, {})[rest[len(metric) + 1 :]] = value
    return protocols, metric_protocols


def differing_field(first: dict[str, Any], second: dict[str, Any], ignore: tuple[str, ...] = DESCRIPTIVE_FIELDS
                    ) -> str | None:
    """The first field (sorted, dotted) whose value differs or exists on one side only; None if the same.
    Fields in `ignore` (and their sub-fields) describe and are not compared."""
    a, b = flatten_protocol(first), flatten_protocol(second)
    for field in sorted(set(a) | set(b)):
        if field.split(".")[0] in ignore:
            continue
        if a.get(field) != b.get(field):
            return field
    return None


def compare_protocols(
    metric: str, first: dict[str, Any], second: dict[str, Any], names: tuple[str, str] = ("first", "second")
) -> None:
    """Raise ProtocolMismatch naming the metric, the field and both values if the protocols differ."""
    field = differing_field(first, second)
    if field is not None:
        a, b = flatten_protocol(first), flatten_protocol(second)
        raise ProtocolMismatch(
            f"{metric}: protocol field {field!r} differs ({names[0]}: "
            f"{a.get(field, '<absent>')}, {names[1]}: {b.get(field, '<absent>')})"
        )
