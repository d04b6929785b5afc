"""Packed attention's flex path against its plain references: the structured BlockMask against torch's dense
create_block_mask, the flex outputs against the masked (dense SDPA) path, and one mask build per forward."""

from __future__ import annotations

import pytest
import torch

from atoken.train.model.attention import allowed, build_block_mask, key_runs
from atoken.train.model.tokenizer import Tokenizer
from atoken.train.model.tokens import pack, patchify_image, patchify_video, voxel_tokens
from atoken.train.model.transformer import TokenInfo

flex = pytest.importorskip("torch.nn.attention.flex_attention")

FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
          "full_q_num_blocks", "full_q_indices")


def packed_layout(generator: torch.Generator, samples: int, max_tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) sample ids and tiles as a packed sequence has them: samples in turn, tiles non-decreasing in each."""
    ids, tiles = [], []
    for index in range(samples):
        count = int(torch.randint(1, 120, (), generator=generator))
        ids.append(torch.full((count,), index))
        tiles.append(torch.randint(0, max_tiles, (count,), generator=generator).sort().values)
    return torch.cat(ids), torch.cat(tiles)


def reference(query_samples, key_samples, query_tiles, key_tiles, window, block):
    """torch's create_block_mask, evaluating `allowed` (the masked path's truth) over the whole grid."""
    dense = allowed(query_samples, key_samples, query_tiles, key_tiles, window)  # (Nq, Nk)
    return flex.create_block_mask(lambda b, h, q, k: dense[q, k], None, None, *dense.shape, device="cpu",
                                  BLOCK_SIZE=block)


def token_mask(mask, queries: int, keys: int) -> torch.Tensor:
    """(Nq, Nk) bool: what FlexAttention attends to under `mask`, full blocks plus mask_mod in partial ones."""
    def expand(counts, indices):
        blocks = torch.zeros(indices.shape[-2:], dtype=torch.bool)  # (R, C)
        for row in range(blocks.shape[0]):
            blocks[row, indices[0, 0, row, :counts[0, 0, row]].long()] = True
        size_q, size_k = mask.BLOCK_SIZE
        return blocks.repeat_interleave(size_q, 0).repeat_interleave(size_k, 1)[:queries, :keys]  # (Nq, Nk)

    evaluated = flex.create_mask(mask.mask_mod, 1, 1, queries, keys, device="cpu")[0, 0]  # (Nq, Nk)
    return expand(mask.full_kv_num_blocks, mask.full_kv_indices) | (
        expand(mask.kv_num_blocks, mask.kv_indices) & evaluated)


@pytest.mark.parametrize(("samples", "max_tiles", "window", "block"), [
    (6, 1, None, 16),  # images / 3D: one tile each
    (3, 5, None, 16),  # videos of several tiles
    (3, 5, 1, 16),  # videos with a window of one earlier tile
    (5, 3, 0, 32),  # a window of none: each tile alone
    (4, 4, None, 128),  # FlexAttention's own block size, lengths not a multiple of it
])
def test_structured_block_mask_equals_create_block_mask(samples, max_tiles, window, block):
    generator = torch.Generator().manual_seed(samples * 10 + max_tiles)
    for _ in range(5):
        ids, tiles = packed_layout(generator, samples, max_tiles)
        mask = build_block_mask(ids, ids, tiles, tiles, window, block)
        expected = reference(ids, ids, tiles, tiles, window, block)
        for name in FIELDS:  # the same blocks in the same order: the kernels see no difference
            assert torch.equal(getattr(mask, name), getattr(expected, name)), name
        assert torch.equal(token_mask(mask, len(ids), len(ids)), allowed(ids, ids, tiles, tiles, window))


def test_keys_out_of_order_fall_back_to_create_block_mask():
    # A KV cache keeps tile 0 of every sample before tile 1 of any: a query's keys are no longer one run.
    ids, tiles = packed_layout(torch.Generator().manual_seed(1), 2, 3)
    order = tiles.argsort(stable=True)  # tile-major
    key_ids, key_tiles = ids[order], tiles[order]
    assert key_runs(ids, key_ids, tiles, key_tiles) is None
    mask = build_block_mask(ids, key_ids, tiles, key_tiles, None, 16)
    expected = reference(ids, key_ids, tiles, key_tiles, None, 16)
    assert all(torch.equal(getattr(mask, name), getattr(expected, name)) for name in FIELDS)
    assert torch.equal(token_mask(mask, len(ids), len(ids)), allowed(ids, key_ids, tiles, key_tiles))


def test_a_wrong_block_is_caught():
    # Negative control for the comparison above: one visited block dropped no longer matches `allowed`.
    ids, tiles = packed_layout(torch.Generator().manual_seed(2), 3, 2)
    mask = build_block_mask(ids, ids, tiles, tiles, None, 16)
    mask.kv_num_blocks[0, 0, 0] -= 1
    assert not torch.equal(token_mask(mask, len(ids), len(ids)), allowed(ids, ids, tiles, tiles))


def model(backend: str, **overrides) -> Tokenizer:
    torch.manual_seed(0)
    return Tokenizer.from_preset("tiny", depth=2, width=64, heads=2, mlp_width=128, gaussians_per_voxel=4,
                                 attention_backend=backend, **overrides).eval()


def batches(generator: torch.Generator) -> dict[str, list]:
    """A few hundred tokens each, so that the sequences span several 128-token blocks."""
    def image(height, width):
        return patchify_image(torch.rand(3, height, width, generator=generator) * 2 - 1)

    def video(frames, size):
        return patchify_video(torch.rand(frames, 3, size, size, generator=generator) * 2 - 1)

    voxels = voxel_tokens(torch.randint(0, 64, (40, 3), generator=generator), torch.rand(40, 768, generator=generator))
    return {  # 376, 376 and 284 tokens
        "images": [image(128, 128), image(160, 192), image(96, 224), image(192, 128), image(64, 48)],
        "videos": [video(40, 64), video(24, 96)],  # 10 and 6 latent frames: 3 and 2 tiles of 4
        "mixed": [image(128, 96), video(40, 64), voxels, image(96, 96)],
    }


@pytest.mark.parametrize("window", [None, 1])
@pytest.mark.parametrize("kind", ["images", "videos", "mixed"])
def test_flex_with_one_shared_mask_equals_masked_path(kind, window):
    samples = batches(torch.Generator().manual_seed(3))[kind]
    batch = pack(samples)
    with torch.no_grad():
        expected = model("masked", cache_tiles=window).forward_packed(batch, sample=False)
        out = model("flex", cache_tiles=window).forward_packed(batch, sample=False)
    for name in ("hidden", "mean", "patches"):
        torch.testing.assert_close(out[name], expected[name], atol=1e-4, rtol=0)


class CountBuilds:
    """Counts BlockMasks made, by either builder (both end in BlockMask.from_kv_blocks)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = flex.BlockMask.from_kv_blocks.__func__

        def counted(cls, *args, **kwargs):
            self.count += 1
            return original(cls, *args, **kwargs)

        monkeypatch.setattr(flex.BlockMask, "from_kv_blocks", classmethod(counted))


def test_mask_built_once_per_forward_for_encoder_and_decoder(monkeypatch):
    batch = pack(batches(torch.Generator().manual_seed(4))["mixed"])
    tokenizer, builds = model("flex"), CountBuilds(monkeypatch)
    with torch.no_grad():
        tokenizer.forward_packed(batch, sample=False)
        assert builds.count == 1  # 2 encoder + 2 decoder layers, one mask
        # Negative controls: without the cache every layer builds its own, as before; separate encode and
        # decode calls (each its own TokenInfo) build one each.
        builds.count = 0
        with monkeypatch.context() as patch:
            patch.setattr(TokenInfo, "block_mask", None)
            tokenizer.forward_packed(batch, sample=False)
        assert builds.count == 2 * tokenizer.config.depth
        builds.count = 0
        tokenizer.decode(tokenizer.encode(batch)["mean"], batch)
        assert builds.count == 2


def test_tiled_flex_builds_one_mask_per_tile_and_equals_full_masked_run(monkeypatch):
    # One video (keys in order: the structured build) and a video beside an image (the cache's keys are
    # tile-major across samples: the fallback); either way the tiled run must equal the full one.
    generator = torch.Generator().manual_seed(5)
    long_video = patchify_video(torch.rand(40, 3, 32, 32, generator=generator) * 2 - 1)  # 3 tiles
    image = patchify_image(torch.rand(3, 32, 32, generator=generator) * 2 - 1)
    for samples in ([long_video], [long_video, image]):
        batch = pack(samples)
        with torch.no_grad():
            expected = model("masked", cache_tiles=1).encode(batch)["hidden"]
            builds = CountBuilds(monkeypatch)
            tiled = model("flex", cache_tiles=1).encode_tiled(batch)["hidden"]
        assert builds.count == 3  # one per tile, shared by both layers
        torch.testing.assert_close(tiled, expected, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_compiled_flex_follows_the_structured_blocks():
    # Uncompiled FlexAttention evaluates mask_mod over the whole grid and ignores the blocks; compiled (CPU
    # inductor, ~30 s) it visits only the listed blocks and skips mask_mod in full ones, as the GPU kernel does.
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([200, 150, 170]))  # a video, an image, a video
    tiles = torch.cat([torch.arange(200) // 50, torch.zeros(150, dtype=torch.long), torch.arange(170) // 60])
    q, k, v = torch.randn(3, 1, 2, len(ids), 16, generator=torch.Generator().manual_seed(6))  # (1, H, N, D) each
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed(ids, ids, tiles, tiles, 1)[None, None])
    attend = torch.compile(flex.flex_attention)
    mask = build_block_mask(ids, ids, tiles, tiles, 1)
    torch.testing.assert_close(attend(q, k, v, block_mask=mask), expected, atol=1e-5, rtol=0)
    mask.kv_num_blocks[0, 0, 1] -= 1  # negative control: one visited block dropped
    assert not torch.allclose(attend(q, k, v, block_mask=mask), expected, atol=1e-2)
