"""evaluate/protocols.py: protocols as tags and back, and comparisons that name the differing field."""

from __future__ import annotations

import json

import pytest

from atoken.evaluate.protocols import (
    ProtocolMismatch,
    compare_protocols,
    differing_field,
    flatten_protocol,
    implementation_version,
    protocol,
    protocol_tags,
    protocols_from_tags,
)


def example(**changes):
    fields = protocol(
        resize="none",
        crop="none",
        colour_range="uint8",
        samples=103,
        frames=1,
        feature_network="InceptionV3",
        feature_network_sha256="7ff4a8",
        implementation="atoken fid@1",
        stand_in=False,
        videos={"reference": 6, "reconstructed": 6},
        layers=["a", "b"],
    )
    return fields | changes


def test_protocol_requires_every_common_field():
    with pytest.raises(TypeError):
        protocol(resize="none", crop="none", colour_range="uint8", samples=1, frames=1)  # no network, no version


def test_same_protocols_compare_and_nested_fields_are_named():
    compare_protocols("rfid", example(), example())
    assert differing_field(example(), example(samples=50)) == "samples"
    assert differing_field(example(), example(videos={"reference": 6, "reconstructed": 5})) == "videos.reconstructed"
    assert differing_field(example(), {k: v for k, v in example().items() if k != "stand_in"}) == "stand_in"


def test_mismatch_message_names_metric_field_and_values():
    with pytest.raises(ProtocolMismatch) as error:
        compare_protocols("eval_rfid", example(), example(feature_network_sha256="000000"), ("run-a", "run-b"))
    message = str(error.value)
    assert "eval_rfid" in message and "'feature_network_sha256'" in message
    assert "run-a: 7ff4a8" in message and "run-b: 000000" in message
    assert "\n" not in message


def test_tags_round_trip_to_the_same_comparison():
    tags = protocol_tags({"rfid": example()}, {"eval_rfid": "rfid"})
    assert tags["protocol.rfid.samples"] == "103" and tags["protocol.rfid.stand_in"] == "false"
    assert tags["protocol_of.eval_rfid"] == "rfid"
    protocols, metric_protocols = protocols_from_tags({**tags, "mlflow.runName": "x"})
    assert metric_protocols == {"eval_rfid": "rfid"}
    assert protocols["rfid"] == flatten_protocol(example())
    assert differing_field(protocols["rfid"], example()) is None
    assert differing_field(protocols["rfid"], example(samples=104)) == "samples"


def test_implementation_version_follows_the_source(tmp_path):
    source = tmp_path / "metric.py"
    source.write_text("A = 1\n")
    first = implementation_version(str(source))
    source.write_text("A = 2\n")
    assert first.startswith("atoken metric@") and implementation_version(str(source)) != first


def test_dotted_metric_names_round_trip():
    """A baseline measured under its own protocol is logged as `baseline.psnr`; its fields must not merge into
    a metric called `baseline`."""
    tags = protocol_tags(
        {"psnr": example(), "baseline.psnr": example(samples=7)},
        {"eval_psnr": "psnr", "baseline_eval_psnr": "baseline.psnr"},
    )
    protocols, metric_protocols = protocols_from_tags(tags)
    assert set(protocols) == {"psnr", "baseline.psnr"}
    assert protocols["baseline.psnr"]["samples"] == "7" and protocols["psnr"]["samples"] == "103"
    assert differing_field(protocols["baseline.psnr"], example(samples=7)) is None


def test_implementation_version_ignores_docstrings_and_comments_but_not_statements(tmp_path):
    first, second = tmp_path / "fid.py", tmp_path / "frechet.py"
    first.write_text('"""Doc."""\nA = 1\n')
    second.write_text("def distance(x):\n    return x.sum()\n")
    version = implementation_version(str(first), str(second))
    assert version.startswith("atoken fid+frechet@")
    first.write_text('"""Another docstring."""\n# a comment\nA = 1\n')
    assert implementation_version(str(first), str(second)) == version
    second.write_text("def distance(x):\n    return x.mean()\n")  # a changed convention in the second file
    assert implementation_version(str(first), str(second)) != version


def test_data_identity_follows_content_not_order_keys_or_where_it_was_read():
    from atoken.evaluate.protocols import DataIdentity

    def identity(samples):
        data = DataIdentity()
        for sample in samples:
            data.add(sample)
        return data.digest()

    def meta(caption, source):
        return json.dumps({"key": f"file_x_{len(source)}", "caption": caption, "source": source,
                           "source_key": f"file_x_{len(source)}", "split": "val" if source == "/data" else "train"}
                          ).encode()

    samples = [{"__key__": "a", "png": b"1", "json": meta("a cat", "/data")},
               {"__key__": "b", "png": b"2", "json": meta("a dog", "/data")}]
    assert identity(samples) == identity(samples[::-1]) and identity(samples).startswith("2 samples, blake2b:")
    moved = [{**sample, "__key__": sample["__key__"] + "2", "json": meta(json.loads(sample["json"])["caption"], "/mnt")}
             for sample in samples]
    assert identity(samples) == identity(moved)  # other keys, another source path
    assert identity(samples) != identity([samples[0], {**samples[1], "png": b"3"}])  # re-encoded content
    assert identity(samples) != identity([samples[0], {**samples[1], "json": meta("a wolf", "/data")}])  # caption
    assert identity(samples) != identity(samples[:1] * 2)  # another multiset of the same size
    # json that is not an object, or not json, is content as it is
    odd = [{"__key__": "a", "png": b"1", "json": b"[1, 2]"}, {"__key__": "b", "png": b"1", "json": b"not json"}]
    assert identity(odd) != identity([{**odd[0], "json": b"[1, 3]"}, odd[1]])


def test_descriptive_fields_are_not_compared():
    assert differing_field(example(latent="FSQ"), example(latent="posterior mean")) is None
    assert differing_field(example(latent="FSQ"), example(latent="FSQ", crop="centre")) == "crop"
