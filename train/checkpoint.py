"""Checkpoints: sharded through torch.distributed.checkpoint (DCP), committed atomically, resumable on another
world size; safetensors and JSON only, nothing pickled.

Layout under a stage's output:
    checkpoints/step-00000200/shards/shard-00001-model-00001-of-00001.safetensors  (rank 0's shard of model,
        optimizer and EMA, as DCP wrote it; one file per rank that holds any: see checkpoint_store.py)
    checkpoints/step-00000200/rank-00000.json, rank-00000.safetensors  (each rank's own: data positions, RNG)
    checkpoints/step-00000200/checkpoint.json  (shared state, optimizer hyper-parameters, world size: rank 0)
    checkpoints/latest.json  -> {"step": 200, "folder": "step-00000200", "kept": [100, 200]}
        (written last, by rank 0, once every rank has written: the commit; `kept` is the committed steps still
        there, oldest first, at most `keep_last`; a folder it does not name is never loaded, so a crash mid-save
        leaves the previous checkpoint loadable)
    model.safetensors, ema.safetensors, model.json  (the stage's final model, whole tensors: `save_model`)
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load, save
from torch.distributed.checkpoint.staging import BlockingAsyncStager

from atoken.pipeline.storage import LocalStaging, Storage, is_s3, join, local_path
from atoken.train.checkpoint_store import (
    ShardReader,
    canonical_safetensors_header,
    commit,
    committed_steps,
    shard_writer,
    step_folder,
    upload_folder,
)

# One process without a process group is intended (no_dist is passed): DCP warns on every save and load anyway.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")


@dataclass
class Restored:
    """What `Checkpointer.load_latest` gives back besides the weights it loaded in place."""
    step: int
    shared_state: dict[str, Any]
    rank_state: dict[str, Any] | None  # this rank's own; None when the checkpoint was saved on another world size
    rank_tensors: dict[str, torch.Tensor] | None  # likewise (e.g. rng.torch, rng.cuda)
    saved_world_size: int
    bytes_read: int  # by this rank: the byte ranges of its own shards, its JSON files, and (rank 0) shard headers


class Checkpointer:
    """Saves and restores one stage's checkpoints; every rank makes one, and every rank calls `save` and
    `load_latest` (both are collectives under a process group).

    - `save(step, model, optimizer, ema_weights, shared_state, rank_state, rank_tensors)`: model, optimizer and
      EMA (a dict of tensors, DTensors under FSDP) through DCP, each rank writing only its own shards;
      `shared_state` (JSON, identical on every rank) once, by rank 0; `rank_state` (JSON) and `rank_tensors`
      (e.g. RNG) in this rank's own files. On s3:// each rank stages its shard file locally (`staging_dir`)
      and uploads it in parts (`StorageSection.multipart_chunk_mb`). Then the ranks agree that every one wrote
      (an all-reduce of a flag, the barrier), and rank 0 commits latest.json and deletes all but the last
      `keep_last` committed checkpoints; if any rank's write or upload failed, no rank commits and every rank
      raises (instead of the others waiting out the barrier's timeout). A committed step is never rewritten
      (ValueError): its folder would be gone before the new one is committed.
    - `async_save`: `save` returns once the tensors are copied to CPU (DCP's staging); writing, uploading and
      the commit run on a background thread (its collectives on a gloo group of their own, apart from the
      training's). The next `save` or `wait()` joins it and re-raises what it raised.
    - `load_latest(model, optimizer, ema_weights) -> Restored | None`: the newest committed checkpoint, loaded
      in place, on any world size (DCP reshards); rank 0 reads the shard headers and broadcasts DCP's metadata,
      then each rank reads only the byte ranges it needs. Its `rank_state` and `rank_tensors` are this rank's,
      or None when the world size differs.
    """

    def __init__(self, storage: Storage, stage_output: str, rank: int, world_size: int, keep_last: int = 3,
                 async_save: bool = False, staging_dir: str | None = None):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.storage, self.root = storage, join(stage_output, "checkpoints")
        self.rank, self.world_size, self.keep_last = rank, world_size, keep_last
        self.async_save, self.staging_dir = async_save, staging_dir
        if staging_dir is not None:
            Path(staging_dir).mkdir(parents=True, exist_ok=True)
        # Async collectives must not interleave with the training's on the default (NCCL) group: their own.
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None
        # The staged copy: a host copy of all this rank holds of model, optimizer and EMA: its shards under FSDP,
        # the whole (replicated) state under DDP or in one process, though DCP then writes each replicated tensor
        # from one rank only. On a GPU machine in pinned memory, kept from save to save (fast device-to-host
        # copies); on CPU a fresh copy each time (pinning needs a GPU).
        self._stager = BlockingAsyncStager(cache_staged_state_dict=torch.cuda.is_available()) if async_save else None
        self._pending: threading.Thread | None = None
        self._failure: BaseException | None = None

    def folder(self, step: int) -> str:
        return step_folder(self.root, step)

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             ema_weights: dict[str, torch.Tensor] | None, shared_state: dict[str, Any], rank_state: dict[str, Any],
             rank_tensors: dict[str, torch.Tensor]) -> None:
        self.wait()
        if step in committed_steps(self.storage, self.root):  # it would be deleted before its replacement commits
            raise ValueError(f"step {step} is already committed under {self.root}; a committed checkpoint is "
                             "never rewritten")
        folder = self.folder(step)
        tensors, _, optimizer_state = _flat_state(model, optimizer, ema_weights)
        if self.rank == 0:
            self.storage.delete_folder(folder)  # what a crashed save at this step left (its shards would mix in)
        _barrier(None)
        name = f"rank-{self.rank:05d}"
        self.storage.write_json(join(folder, f"{name}.json"), rank_state)
        self.storage.write_bytes(join(folder, f"{name}.safetensors"), save(_contiguous(rank_tensors)))
        if self.rank == 0:
            self.storage.write_json(join(folder, "checkpoint.json"), {
                "step": step, "world_size": self.world_size, "shared": shared_state,
                "optimizer": _optimizer_hyperparameters(optimizer_state)})
        staging = LocalStaging(self.staging_dir) if is_s3(folder) else None
        shards = staging.path / "shards" if staging else local_path(join(folder, "shards"))
        if is_s3(folder):
            self.storage.client  # noqa: B018 - built here, not raced for by the background thread
        writer = shard_writer(shards)
        if not self.async_save:
            dcp.save(tensors, storage_writer=writer, no_dist=not dist.is_initialized())
            self._finish(step, shards, staging)
            return
        writer.per_thread_copy_ahead = 0  # staged on the CPU already (what FileSystemWriter's own stage() sets)
        written = dcp.async_save(tensors, storage_writer=writer, process_group=self._group, async_stager=self._stager,
                                 no_dist=not dist.is_initialized())
        self._pending = threading.Thread(target=self._finish_in_background, args=(written, step, shards, staging),
                                         name=f"checkpoint-{step}", daemon=True)
        self._pending.start()

    def wait(self) -> None:
        """Join an async save (its write, upload and commit); re-raise its failure here."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        failure, self._failure = self._failure, None
        if failure is not None:
            raise RuntimeError(f"an asynchronous checkpoint save failed: {failure}") from failure

    def load_latest(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    ema_weights: dict[str, torch.Tensor] | None) -> Restored | None:
        """Restore model, optimizer and EMA weights in place from the newest committed checkpoint; None if there
        is none. The loop restores RNG and data positions from `rank_state` and `rank_tensors`."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        self.wait()  # an async save's commit first (and no collective of ours racing its own on the gloo group)
        kept = committed_steps(self.storage, self.root)
        if not kept:
            return None
        step = kept[-1]
        folder = self.folder(step)
        saved = self.storage.read_json(join(folder, "checkpoint.json"))
        reader = ShardReader(self.storage, join(folder, "shards"))
        tensors, model_state, optimizer_state = _flat_state(model, optimizer, ema_weights)
        # A parameter no task has trained yet (the Gaussian head before stage 3) has no AdamW state in the
        # checkpoint; the fresh optimizer's (DCP's zero-step initialisation) is dropped, as in the one that saved.
        in_checkpoint = reader.share_metadata(self._group).state_dict_metadata
        for fqn in list(optimizer_state["state"]):
            keys = [f"optimizer.{fqn}.{slot}" for slot, value in optimizer_state["state"][fqn].items()
                    if isinstance(value, torch.Tensor)]
            if not all(key in in_checkpoint for key in keys):
                del optimizer_state["state"][fqn]
                for key in keys:
                    del tensors[key]
        dcp.load(tensors, storage_reader=reader, no_dist=not dist.is_initialized())
        set_model_state_dict(model, model_state)
        optimizer_state["param_groups"] = saved["optimizer"]["param_groups"]
        for fqn, values in saved["optimizer"]["scalars"].items():
            optimizer_state["state"].setdefault(fqn, {}).update(values)
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(strict=False))

        rank_state = rank_tensors = None
        bytes_read = reader.bytes_read
        if saved["world_size"] == self.world_size:
            name = join(folder, f"rank-{self.rank:05d}")
            state_bytes, tensor_bytes = self.storage.read_bytes(f"{name}.json"), self.storage.read_bytes(
                f"{name}.safetensors")
            rank_state, rank_tensors = json.loads(state_bytes), load(tensor_bytes)
            bytes_read += len(state_bytes) + len(tensor_bytes)
        return Restored(step, saved["shared"], rank_state, rank_tensors, saved["world_size"], bytes_read)

    # -- internals -------------------------------------------------------------------------------

    def _finish_in_background(self, written, step: int, shards: Path, staging: LocalStaging | None) -> None:
        try:
            self._finish(step, shards, staging, written)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread by wait()
            self._failure = exc

    def _finish(self, step: int, shards: Path, staging: LocalStaging | None, written=None) -> None:
        """Finish this rank's write (async) and upload its shards (S3); once every rank has, commit (rank 0)."""
        done = False
        try:
            if written is not None:
                written.result()
            for shard in sorted(shards.glob("*.safetensors")) if shards.is_dir() else []:
                canonical_safetensors_header(shard)  # byte-identical files from identical runs
            if staging is not None and shards.is_dir():  # a rank with nothing of its own (DDP dedup) has no file
                upload_folder(self.storage, shards, join(self.folder(step), "shards"))
            done = True
        finally:  # on a failure too: the other ranks learn of it here (and then raise) instead of waiting
            if staging is not None:
                shutil.rmtree(staging.path, ignore_errors=True)
            everyone = _all_succeeded(done, self._group)
        if not everyone:
            raise RuntimeError(f"checkpoint step {step} is not committed: another rank failed to write or upload "
                               "its shards (its log says why)")
        if self.rank == 0:
            self._commit(step)

    def _commit(self, step: int) -> None:
        commit(self.storage, self.root, step, self.keep_last)


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states, as the `rank_tensors` of a checkpoint (uint8 tensors)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])


def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: dict[str, torch.Tensor] | None
                ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors DCP saves or loads, keyed `model.<fqn>`, `optimizer.<fqn>.<slot>`, `ema.<fqn>`, each this
    rank's own (DTensors under FSDP: no gathering), and the model and optimizer state dicts they are the
    tensors of (a load into the flat dict lands in them)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    tensors = {f"model.{name}": tensor for name, tensor in model_state.items()}
    for fqn, slots in optimizer_state["state"].items():
        tensors |= {f"optimizer.{fqn}.{slot}": value for slot, value in slots.items()
                    if isinstance(value, torch.Tensor)}
    tensors |= {f"ema.{name}": tensor for name, tensor in (ema or {}).items()}
    return tensors, model_state, optimizer_state


def _optimizer_hyperparameters(optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """What of the optimizer's state is not a tensor, as JSON: its groups (lr, betas ... and parameter names)
    and any non-tensor slot."""
    scalars = {fqn: {slot: value for slot, value in slots.items() if not isinstance(value, torch.Tensor)}
               for fqn, slots in optimizer_state["state"].items()}
    return json.loads(json.dumps({"param_groups": optimizer_state["param_groups"],
                                  "scalars": {fqn: values for fqn, values in scalars.items() if values}}))


def _barrier(group) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _all_succeeded(ok: bool, group) -> bool:
    """Whether every rank of `group` is ok: an all-reduce (MIN) of a flag, which is a barrier as well."""
    if not dist.is_initialized():
        return ok
    on_gpu = dist.get_backend(group) == "nccl"  # NCCL reduces only CUDA tensors; gloo (or cpu:gloo,...) CPU ones
    flag = torch.tensor([int(ok)], device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def save_model(storage: Storage, stage_output: str, model: torch.nn.Module, config: dict[str, Any],
               write: bool = True, ema: dict[str, torch.Tensor] | None = None) -> str | None:
    """The stage's final weights (and their EMA beside them), gathered on every rank, written by `write`."""
    model_state = gather_state(model)
    if not write:
        return None
    uri = join(stage_output, "model.safetensors")
    storage.write_bytes(uri, save(_contiguous(model_state)))
    if ema is not None:
        storage.write_bytes(join(stage_output, "ema.safetensors"), save(_contiguous(ema)))
    storage.write_json(join(stage_output, "model.json"), config)
    return uri


def load_model_weights(storage: Storage, uri: str, model: torch.nn.Module) -> list[str]:
    """Start from a previous stage's weights; returns the names that were grown (see `grow_state`)."""
    from atoken.train.model.tokenizer import rename_legacy

    state, grown = grow_state(rename_legacy(load(storage.read_bytes(uri))), model.state_dict())
    model.load_state_dict(state)
    return grown


def grow_state(previous: dict[str, torch.Tensor], target: dict[str, torch.Tensor]
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The previous stage's tensors, fitted into a model whose latent grew (32 → 48 channels in stage 2).

    A tensor of another shape keeps the target's fresh initialisation outside the old extent and takes the old
    values inside it; the KL head's (mean, logvar) halves are grown separately so that old logvar rows stay
    logvar rows. New decoder input columns start at zero, so the decoder's output is unchanged by the growth
    and the new channels are learnt from there. Anything else missing or extra is an error."""
    missing, unknown = sorted(set(target) - set(previous)), sorted(set(previous) - set(target))
    if missing or unknown:
        raise ValueError(f"previous stage's weights do not fit this model: missing {missing[:5]}, "
                         f"unknown {unknown[:5]}")
    state, grown = {}, []
    for name, fresh in target.items():
        old = previous[name]
        if old.shape == fresh.shape:
            state[name] = old
            continue
        if old.dim() != fresh.dim() or any(o > f for o, f in zip(old.shape, fresh.shape, strict=True)):
            raise ValueError(f"{name}: cannot grow {tuple(old.shape)} into {tuple(fresh.shape)}")
        new = fresh.clone()
        if name.startswith("decoder_in."):
            new.zero_()
        if name.startswith("kl.proj."):  # rows are [mean (C), logvar (C)]
            old_half, new_half = old.shape[0] // 2, fresh.shape[0] // 2
            for part in range(2):
                rows = old[part * old_half:(part + 1) * old_half]
                new[part * new_half:part * new_half + old_half, ...][..., : rows.shape[-1]] = rows
        else:
            new[tuple(slice(0, n) for n in old.shape)] = old
        state[name] = new
        grown.append(name)
    return state, grown


def gather_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) model state dict on the CPU, keyed by parameter name, whatever wraps the model
    (plain, DDP or FSDP2). Under FSDP every rank must call it: the shards are gathered collectively."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}
