"""Planning an ingest so that it holds under a changing listing: an item's split and part follow from its key.

img2dataset and video2dataset cut shards by position in the listing, so one file added at the front shifts
every later shard; their incremental mode then skips by shard name and loses or duplicates items. Here an
item's split and part are functions of its key alone (a 64-bit hash), so adding, removing or editing a file
changes exactly the one part that holds it:

- split: a source that pins one (`split: val`) keeps it; otherwise an item is validation when a second hash of
  its key is 0 modulo `val_every`.
- part: a split's items fall into 2^k hash ranges (`train-000003-of-000016` holds the items whose hash lies in
  the 4th sixteenth). k is the smallest giving at most `items_per_part` items a part on average, and is kept
  from the previous run while the average stays within [1/4, 2] x `items_per_part` (hysteresis: a growing
  listing does not re-cut every part on every run). When it changes, the new parts reuse the old parts'
  samples (preprocess/writer.py), so nothing is decoded twice.
- groups: an item that names a group (`ItemSpec.group`: a parquet row group) takes its part hash from the group,
  not its key, so a part holds whole row groups and reads each one's column chunk once instead of once per item
  (parts are hash ranges of keys: a part of 64 items would otherwise touch 64 row groups). The split stays the
  key's. A group is a function of the source (file and row group), so the listing's changes still move only the
  parts of the groups they touch. A part holds at least one group, so a split never has more parts than about
  its groups and ungrouped items (`Planner.units`): 8 row groups of 250 rows make 8 parts, not 32 mostly empty.

The listing is never held by the driver: items stream into sorted spill files on local disk (`Planner.add`),
then come back part by part in one merged pass (`Planner.parts`). Measured in benchmarks/plan_ingest.py.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from atoken.preprocess.sources import ItemSpec

SPLITS = ("train", "val")
CURSOR_ROWS = 8192  # rows of a spill chunk the merge holds at a time
HASH_BITS = 63  # hashes are non-negative int64 (parquet statistics and numpy both compare them natively)
SPILL_SCHEMA = pa.schema([
    ("split", pa.int8()), ("hash", pa.int64()), ("key", pa.string()), ("source", pa.string()),
    ("locator", pa.string()), ("caption", pa.string()), ("fingerprint", pa.string()), ("group", pa.string()),
    ("key_hash", pa.int64()),  # the key's own hash, when `hash` is its group's: what check_unique compares
])


def key_hashes(key: str) -> tuple[int, int]:
    """(part hash, split hash) of an item key: two independent 63-bit numbers from one blake2b digest."""
    digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big") >> 1, int.from_bytes(digest[8:], "big") >> 1


def split_of(item: ItemSpec, split_hash: int, val_every: int) -> str:
    if item.split:
        return item.split
    return "val" if split_hash % val_every == 0 else "train"


def part_bits(items: int, items_per_part: int, previous_bits: int | None = None) -> int:
    """log2 of the number of parts for a split of `items` items (see the module docstring for the hysteresis)."""
    if previous_bits is not None and items_per_part / 4 <= items / 2 ** previous_bits <= 2 * items_per_part:
        return previous_bits
    return max(0, math.ceil(math.log2(max(1.0, items / items_per_part))))


def part_name(split: str, bits: int, index: int) -> str:
    return f"{split}-{index:06d}-of-{2 ** bits:06d}"


def parse_part_name(name: str) -> tuple[str, int, int]:
    """`train-000003-of-000016` → (split, bits, index)."""
    split, index, _, count = name.rsplit("-", 3)
    return split, int(count).bit_length() - 1, int(index)


def hash_range(bits: int, index: int) -> tuple[int, int]:
    """[low, high) of the hashes part `index` of 2^bits holds."""
    width = 1 << (HASH_BITS - bits)
    return index * width, (index + 1) * width


@dataclass
class PartPlan:
    name: str  # e.g. "train-000003-of-000016"
    split: str
    items: list[ItemSpec]

    @property
    def hash_range(self) -> tuple[int, int]:
        _, bits, index = parse_part_name(self.name)
        return hash_range(bits, index)

    def __reduce__(self):
        # Items travel to Ray workers as plain tuples: Ray's cloudpickle runs a Python hook for every object
        # that is not a plain str/tuple/list, which made pickling the plans most of the driver's CPU time.
        items = [(i.key, i.source, i.locator, i.caption, "", i.fingerprint, i.group) for i in self.items]
        return _part_plan, (self.name, self.split, items)


def _part_plan(name: str, split: str, items: list[tuple]) -> PartPlan:
    return PartPlan(name, split, [ItemSpec(*item) for item in items])


@dataclass
class Planner:
    """Items in (any order, any number) → parts, with the driver holding one spill chunk at a time."""

    val_every: int
    items_per_part: int
    spill_folder: Path | None = None
    chunk_items: int = 131_072  # ~50 MB of Python objects at the peak, then written out sorted
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    # What a split's parts can be cut to: its ungrouped items and its groups, each group counted once (a source
    # lists a group's items together, so a change of group in the stream is a new one: no set of groups held).
    units: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    _last_group: dict[str, str] = field(default_factory=dict)
    _rows: list[tuple] = field(default_factory=list)
    _chunks: list[Path] = field(default_factory=list)
    _temporary: tempfile.TemporaryDirectory | None = None

    def add(self, items: Iterable[ItemSpec]) -> None:
        for item in items:
            key_hash, split_hash = key_hashes(item.key)
            part_hash = key_hashes(item.group)[0] if item.group else key_hash
            split = split_of(item, split_hash, self.val_every)
            self.counts[split] += 1
            if not item.group or self._last_group.get(split) != item.group:
                self.units[split] += 1
                self._last_group[split] = item.group
            self._rows.append((SPLITS.index(split), part_hash, item.key, item.source, item.locator, item.caption,
                               item.fingerprint, item.group, key_hash))
            if len(self._rows) >= self.chunk_items:
                self._spill()

    @property
    def items(self) -> int:
        return sum(self.counts.values())

    def bits(self, previous: dict[str, int] | None = None) -> dict[str, int]:
        """log2 of each split's part count (0 parts for a split without items), at most about its units."""
        previous = previous or {}
        return {split: min(part_bits(count, self.items_per_part, previous.get(split)), part_bits(self.units[split], 1))
                for split, count in self.counts.items() if count}

    def parts(self, bits: dict[str, int]) -> Iterator[PartPlan]:
        """Every part of every split in (split, index) order, items sorted by (hash, key); empty parts too, so a
        part whose last item went away is planned (empty) and its old samples are removed."""
        self._spill()
        cursors = [_ChunkCursor(path) for path in self._chunks]
        for split in SPLITS:
            if split not in bits:
                continue
            for index in range(2 ** bits[split]):
                _, high = hash_range(bits[split], index)
                rows = heapq.merge(*(cursor.take(split, high) for cursor in cursors))
                items = [ItemSpec(key, source, locator, caption, split, fingerprint, group)
                         for _, key, source, locator, caption, fingerprint, group in rows]
                for first, second in zip(items, items[1:], strict=False):
                    if first.key == second.key:
                        raise ValueError(f"ingest.sources: item key {first.key!r} is listed twice ({first.source}, "
                                         f"{second.source}): a source listed twice, or two list rows with one key")
                yield PartPlan(part_name(split, bits[split], index), split, items)

    def check_unique(self) -> None:
        """Refuse a key listed twice, in any split, before any part is written (two list files with one key,
        one of them pinned to val, would otherwise land both). One pass over the hashes: 8 bytes an item."""
        self._spill()
        if not self._chunks:
            return
        import pyarrow.compute as pc

        hashes = np.concatenate([pq.read_table(path, columns=["key_hash"]).column("key_hash").to_numpy()
                                 for path in self._chunks])
        hashes.sort()
        repeated = np.unique(hashes[1:][hashes[1:] == hashes[:-1]])
        if not len(repeated):
            return
        seen: dict[str, str] = {}
        wanted = pa.array(repeated, pa.int64())
        for path in self._chunks:
            table = pq.read_table(path, columns=["key_hash", "key", "source"])
            rows = table.filter(pc.is_in(table.column("key_hash"), value_set=wanted))
            for key, source in zip(rows.column("key").to_pylist(), rows.column("source").to_pylist(), strict=True):
                if key in seen:
                    raise ValueError(f"ingest.sources: item key {key!r} is listed twice ({seen[key]}, {source}): a "
                                     "source listed twice, or two list rows (files) with one key")
                seen[key] = source

    def _spill(self) -> None:
        if not self._rows:
            return
        if self.spill_folder is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="atoken-plan-")
            self.spill_folder = Path(self._temporary.name)
        columns = list(zip(*self._rows, strict=False))
        self._rows = []
        arrays = [pa.array(column, type=f.type) for column, f in zip(columns, SPILL_SCHEMA, strict=True)]
        table = pa.Table.from_arrays(arrays, schema=SPILL_SCHEMA)
        table = table.sort_by([("split", "ascending"), ("hash", "ascending"), ("key", "ascending")])
        path = self.spill_folder / f"chunk-{len(self._chunks):06d}.parquet"
        # Small row groups: the merge holds one row group of every chunk at a time (77 chunks at 10M items).
        pq.write_table(table, path, row_group_size=CURSOR_ROWS)
        self._chunks.append(path)

    def close(self) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()
            self._temporary = None


class _ChunkCursor:
    """Reads one sorted spill chunk forward, a batch at a time, handing out rows below a (split, hash)."""

    COLUMNS = ("hash", "key", "source", "locator", "caption", "fingerprint", "group")

    def __init__(self, path: Path):
        # One row group at a time, read by hand: iter_batches reads ahead (measured: ~10 MB a cursor held at
        # 3M items, 220 MB over 23 chunks), which at 77 chunks would be most of the driver's memory.
        file = pq.ParquetFile(path)
        self.batches = (batch for group in range(file.num_row_groups)
                        for batch in file.read_row_group(group).to_batches())
        self.batch: pa.RecordBatch | None = None
        self.ranks = self.hashes = np.zeros(0, np.int64)
        self.offset = 0

    def take(self, split: str, high: int) -> list[tuple]:
        """Rows of `split` with hash < high, as (hash, key, source, locator, caption, fingerprint, group)."""
        taken: list[tuple] = []
        order = SPLITS.index(split)
        while True:
            if self.offset >= len(self.hashes):
                self.batch = next(self.batches, None)
                if self.batch is None:
                    return taken
                self.ranks = self.batch.column("split").to_numpy()
                self.hashes = self.batch.column("hash").to_numpy()
                self.offset = 0
            # Rows are sorted by (split, hash), so the rows before (order, high) are a prefix of what is left.
            if int(self.ranks[self.offset]) < order:
                raise AssertionError("spill rows of an earlier split were left behind")
            split_end = int(np.searchsorted(self.ranks, order, side="right"))
            end = self.offset + int(np.searchsorted(self.hashes[self.offset:split_end], high, side="left"))
            if end > self.offset:
                piece = self.batch.slice(self.offset, end - self.offset)
                taken.extend(zip(*(piece.column(name).to_pylist() for name in self.COLUMNS), strict=False))
                self.offset = end
            if end < len(self.hashes):
                return taken
