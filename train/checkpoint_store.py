"""How a checkpoint sits in storage: its sharded tensors as torch.distributed.checkpoint (DCP) files, safetensors
only, and its commit.

DCP plans the save: under FSDP2 each rank writes its own shard of every parameter, optimizer slot and EMA
average; under DDP or in one process a replicated tensor is written once, by one rank (DCP's dedup). Its
Hugging Face writer stores each rank's part as one safetensors file with the shard's offsets in the header
(`shard-00001-model-00001-of-00001.safetensors` for rank 0), so nothing is pickled: DCP's default `.metadata`
file and `.distcp` tensors are pickles, these are not.

`ShardReader` reads them back through `Storage`: rank 0 alone lists the files and reads their headers (a few
hundred kB at so400m size; every rank reading every header would be W x W x 2 GETs, 131k at 256 ranks), builds
DCP's metadata from them and broadcasts it (`share_metadata`); then every rank fetches only the byte ranges its
own read plan needs, as ranged GETs on S3. Resharding (saved on 2 ranks, loaded on 1, or the other way) is DCP's
planner's: it asks for the overlap of each saved shard with each rank's own shard.

The commit is latest.json (`commit`, `committed_steps`): written last, by rank 0, naming the steps kept.
"""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import StorageReader
from torch.distributed.checkpoint.hf_storage import HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from atoken.pipeline.storage import Storage, StorageError, is_s3, join, local_path

# safetensors dtype names (the header's "dtype") of the tensors a checkpoint holds.
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
# One read's most bytes: adjacent tensors of a file are fetched together up to this (fewer GETs), and
# READ_THREADS of them in flight bound the memory a resume holds at once (8 x 64 MiB).
READ_BYTES = 64 * 1024 * 1024
READ_THREADS = 8


def shard_writer(folder: str | Path) -> HuggingFaceStorageWriter:
    """DCP's writer of one safetensors file per rank (its own shards) into a local folder."""
    return HuggingFaceStorageWriter(str(folder), save_distributed=True)


@dataclass(frozen=True)
class _Chunk:
    """Where one saved shard of a tensor lies: its file, the byte offset of its data, shape and dtype."""
    uri: str
    start: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize


class ShardReader(StorageReader):
    """A DCP StorageReader over the safetensors shards in `folder` (a local folder or s3://), reading byte
    ranges. `bytes_read` counts what it fetched, headers included (on rank 0 only, after `share_metadata`)."""

    def __init__(self, storage: Storage, folder: str):
        super().__init__()
        self.storage, self.folder = storage, folder
        self.bytes_read = 0
        self._lock = threading.Lock()
        self._metadata: Metadata | None = None
        self.storage_data: dict[MetadataIndex, _Chunk] = {}

    def reset(self, checkpoint_id: str | None = None) -> None:
        if checkpoint_id:
            self.folder, self._metadata = str(checkpoint_id), None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False  # never chosen by DCP on its own: always passed explicitly

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is None:
            self._metadata = self._metadata_from_headers()
        return self._metadata

    def share_metadata(self, group: dist.ProcessGroup | None = None) -> Metadata:
        """`read_metadata` on rank 0, broadcast to the other ranks of `group` (a collective, when a process group
        is initialised), which then read no header at all. A failure on rank 0 is raised on every rank."""
        if not dist.is_initialized():
            return self.read_metadata()
        failure: BaseException | None = None
        box: list[Any] = [None]
        if dist.get_rank() == 0:
            try:
                box[0] = self.read_metadata()
            except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks have been told
                failure, box[0] = exc, f"{type(exc).__name__}: {exc}"
        dist.broadcast_object_list(box, src=0, group=group)  # pickled in memory, between ranks; never stored
        if failure is not None:
            raise failure
        if isinstance(box[0], str):
            raise StorageError(f"rank 0 could not read the shard headers under {self.folder}: {box[0]}")
        self._metadata = box[0]
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.storage_data = metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Each read item's bytes: only its rows when it covers whole rows of the saved shard (FSDP shards dim 0,
        so resharding asks for row ranges), else the whole shard, narrowed here. Adjacent spans of one file are
        fetched in one read."""
        spans = sorted((self._span(item) + (item,) for item in plan.items), key=lambda span: span[:2])
        reads: list[tuple[str, int, int, list]] = []
        for uri, begin, end, item in spans:
            if reads and reads[-1][0] == uri and reads[-1][2] == begin and end - reads[-1][1] <= READ_BYTES:
                reads[-1] = (uri, reads[-1][1], end, reads[-1][3] + [(begin, end, item)])
            else:
                reads.append((uri, begin, end, [(begin, end, item)]))

        def fetch(read: tuple[str, int, int, list]) -> None:
            uri, begin, end, items = read
            data = bytearray(self.storage.read_range(uri, begin, end - begin))
            with self._lock:
                self.bytes_read += len(data)
            for item_begin, item_end, item in items:
                self._copy_into(planner, item, memoryview(data)[item_begin - begin:item_end - begin])

        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            list(pool.map(fetch, reads))  # list(): re-raise the first failure
        done: Future[None] = Future()
        done.set_result(None)
        return done

    # -- internals -------------------------------------------------------------------------------

    def _span(self, item: ReadItem) -> tuple[str, int, int]:
        chunk = self.storage_data[item.storage_index]
        if _whole_rows(chunk, item):
            first, rows = (item.storage_offsets[0], item.lengths[0]) if chunk.shape else (0, 1)
            return chunk.uri, chunk.start + first * chunk.row_bytes, chunk.start + (first + rows) * chunk.row_bytes
        return chunk.uri, chunk.start, chunk.start + math.prod(chunk.shape) * chunk.dtype.itemsize

    def _copy_into(self, planner: LoadPlanner, item: ReadItem, data: memoryview) -> None:
        chunk = self.storage_data[item.storage_index]
        if _whole_rows(chunk, item):
            shape = (item.lengths[0], *chunk.shape[1:]) if chunk.shape else ()
            tensor = _tensor(data, chunk.dtype, shape)
        else:
            tensor = _tensor(data, chunk.dtype, chunk.shape)
            for dim, (offset, length) in enumerate(zip(item.storage_offsets, item.lengths, strict=True)):
                tensor = tensor.narrow(dim, offset, length)
        target = planner.resolve_tensor(item).detach()
        if target.shape != tensor.shape:
            raise ValueError(f"{item.storage_index.fqn}: saved slice {tuple(tensor.shape)} does not fit "
                             f"{tuple(target.shape)}")
        target.copy_(tensor)
        planner.commit_tensor(item, target)

    def _metadata_from_headers(self) -> Metadata:
        tensors: dict[str, TensorStorageMetadata] = {}
        storage_data: dict[MetadataIndex, _Chunk] = {}
        files = [uri for uri in self.storage.list(self.folder) if uri.endswith(".safetensors")]
        if not files:
            raise FileNotFoundError(f"no checkpoint shards under {self.folder}")
        for uri in files:
            header_bytes = int.from_bytes(self._read(uri, 0, 8), "little")
            header = json.loads(self._read(uri, 8, header_bytes))
            offsets = json.loads(header.pop("__metadata__")["DCP_SHARDING_INFO"])
            for fqn, entry in header.items():
                chunk = _Chunk(uri, 8 + header_bytes + entry["data_offsets"][0], torch.Size(entry["shape"]),
                               DTYPES[entry["dtype"]])
                offset = torch.Size(offsets[fqn]["saved_offsets"])
                end = [o + s for o, s in zip(offset, chunk.shape, strict=True)]
                known = tensors.setdefault(fqn, TensorStorageMetadata(TensorProperties(dtype=chunk.dtype),
                                                                      torch.Size(end), []))
                known.size = torch.Size(max(a, b) for a, b in zip(known.size, end, strict=True))
                known.chunks.append(ChunkStorageMetadata(offsets=offset, sizes=chunk.shape))
                storage_data[MetadataIndex(fqn=fqn, offset=offset)] = chunk
        return Metadata(state_dict_metadata=tensors, storage_data=storage_data)

    def _read(self, uri: str, start: int, length: int) -> bytes:
        data = self.storage.read_range(uri, start, length)
        with self._lock:
            self.bytes_read += len(data)
        return data


def _whole_rows(chunk: _Chunk, item: ReadItem) -> bool:
    """Whether the item asks for a run of whole rows (every dimension but the first in full)."""
    return all(offset == 0 and length == size
               for offset, length, size in zip(item.storage_offsets[1:], item.lengths[1:], chunk.shape[1:],
                                               strict=True))


def _tensor(data: memoryview, dtype: torch.dtype, shape) -> torch.Tensor:
    if len(data) == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype).reshape(shape)


def canonical_safetensors_header(path: Path) -> None:
    """safetensors writes `__metadata__` from a Rust HashMap, in an order that changes from process to process
    (DCP's shards carry three keys), so two identical runs wrote different bytes: rewrite the header with its
    keys sorted, padded to the same length (tensor offsets unchanged)."""
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(length))
        metadata = header.pop("__metadata__", None)
        if not metadata or len(metadata) < 2:
            return
        text = json.dumps({"__metadata__": dict(sorted(metadata.items())), **header}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        if len(text) > length:
            raise ValueError(f"{path}: canonical header longer than the original")
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


def step_folder(root: str, step: int) -> str:
    return join(root, f"step-{step:08d}")


def committed_steps(storage: Storage, root: str) -> list[int]:
    """The committed checkpoints' steps under `root`, oldest first (latest.json's `kept`); [] before the first."""
    pointer = join(root, "latest.json")
    latest = storage.read_json(pointer) if storage.exists(pointer) else {"kept": []}
    if "kept" not in latest:
        raise ValueError(f"{pointer} names a checkpoint of the previous whole-state format ({latest['folder']}), "
                         "which Checkpointer does not read: resume with the release that wrote it")
    return latest["kept"]


def commit(storage: Storage, root: str, step: int, keep_last: int) -> None:
    """latest.json names `step` (the commit); then every other step folder but the last `keep_last` committed
    goes, uncommitted leftovers of a crash included (none is newer than the step just committed)."""
    kept = (committed_steps(storage, root) + [step])[-keep_last:]
    # The folder relative to the checkpoints folder: the pointer reads the same wherever the run root lives.
    storage.write_json(join(root, "latest.json"), {"step": step, "folder": f"step-{step:08d}", "kept": kept})
    for name in sorted(subfolders(storage, root)):
        number = name.removeprefix("step-")
        if name.startswith("step-") and number.isdigit() and int(number) not in kept and int(number) < step:
            storage.delete_folder(join(root, name))


def subfolders(storage: Storage, root: str) -> set[str]:
    """The names of the folders right under `root` that hold files. `Storage.list` gives local paths normalised
    (no file://, no ./), so names are taken relative to the root as listed, not by matching `root` as written."""
    if is_s3(root):
        base = root.rstrip("/") + "/"
        relative = [uri[len(base):] for uri in storage.list(root) if uri.startswith(base)]
    else:
        relative = [Path(path).relative_to(local_path(root)).as_posix() for path in storage.list(root)]
    return {name.split("/", 1)[0] for name in relative if "/" in name}


def upload_folder(storage: Storage, folder: Path, uri: str) -> None:
    """Every file of a local folder to `uri`/name (multipart for large files: Storage.upload)."""
    for path in sorted(folder.iterdir()):
        storage.upload(path, join(uri, path.name))
