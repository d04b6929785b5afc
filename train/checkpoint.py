"""Checkpoints: a folder of safetensors plus a small JSON of state, committed atomically.

Layout under a stage's output:
    checkpoints/step-00000200/{model,optimizer}.safetensors, state.json
    checkpoints/latest.json   -> {"step": 200, "folder": ".../step-00000200"}   (written last: the commit)
    model.safetensors, model.json                                           (the stage's final model)
Nothing is pickled: optimizer tensors go to safetensors, its hyper-parameters to JSON.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load, save

from atoken.pipeline.storage import Storage, join


def _full_options(**extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **extra)


def gather_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Whole (unsharded) model and optimizer state dicts keyed by parameter name, whatever wraps the model
    (plain, DDP or FSDP2). Under FSDP every rank must call it: the shards are gathered collectively."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_state = get_model_state_dict(model, options=_full_options())
    optimizer_state = None if optimizer is None else get_optimizer_state_dict(model, optimizer,
                                                                              options=_full_options())
    return model_state, optimizer_state


def save_checkpoint(storage: Storage, stage_output: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], ema: dict[str, torch.Tensor] | None = None, write: bool = True
                    ) -> str | None:
    """Gather (every rank) and write (the rank with `write`) one checkpoint; latest.json last, as the commit."""
    model_state, optimizer_state = gather_state(model, optimizer)
    if not write:
        return None
    folder = join(stage_output, "checkpoints", f"step-{state['step']:08d}")
    storage.write_bytes(join(folder, "model.safetensors"), save(_contiguous(model_state)))
    if ema is not None:
        storage.write_bytes(join(folder, "ema.safetensors"), save(_contiguous(ema)))
    tensors, meta = _split_optimizer_state(optimizer_state)
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    storage.write_bytes(join(folder, "optimizer.safetensors"), save(tensors))
    storage.write_json(join(folder, "state.json"), {**state, "optimizer": meta})
    storage.write_json(join(stage_output, "checkpoints", "latest.json"), {"step": state["step"], "folder": folder})
    return folder


def load_latest_checkpoint(storage: Storage, stage_output: str, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer,
                           ema: dict[str, torch.Tensor] | None = None) -> dict[str, Any] | None:
    """Restore model, optimizer, EMA weights (in place) and RNG from the newest committed checkpoint; None if
    there is none. Every rank reads the whole checkpoint and keeps its own shard (FSDP) or a full copy."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    pointer = join(stage_output, "checkpoints", "latest.json")
    if not storage.exists(pointer):
        return None
    folder = storage.read_json(pointer)["folder"]
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, load(storage.read_bytes(join(folder, "model.safetensors"))), options=options)
    if ema is not None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        saved = load(storage.read_bytes(join(folder, "ema.safetensors")))
        for name, tensor in ema.items():
            if isinstance(tensor, DTensor):  # FSDP: keep this rank's shard of the whole average
                tensor.copy_(distribute_tensor(saved[name].to(tensor.device), tensor.device_mesh, tensor.placements))
            else:
                tensor.copy_(saved[name])
    state = storage.read_json(join(folder, "state.json"))
    tensors = load(storage.read_bytes(join(folder, "optimizer.safetensors")))
    torch.set_rng_state(tensors.pop("rng.torch"))
    cuda_rng = tensors.pop("rng.cuda", None)
    if cuda_rng is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_rng)
    # Not strict: a parameter no task has trained yet (the Gaussian head before stage 3) has no AdamW state in
    # the checkpoint, exactly as in the optimizer that wrote it.
    set_optimizer_state_dict(model, optimizer, _join_optimizer_state(tensors, state.pop("optimizer")),
                             options=StateDictOptions(full_state_dict=True, strict=False))
    return state


def save_model(storage: Storage, stage_output: str, model: torch.nn.Module, config: dict[str, Any],
               write: bool = True, ema: dict[str, torch.Tensor] | None = None) -> str | None:
    """The stage's final weights (and their EMA beside them), gathered on every rank, written by `write`."""
    model_state, _ = gather_state(model)
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
    state, grown = grow_state(load(storage.read_bytes(uri)), model.state_dict())
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


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors as `state.<parameter name>.<slot>` (slot names such as exp_avg hold no dot), the rest as JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.contiguous()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        param_id, name = key.removeprefix("state.").rsplit(".", 1)
        state.setdefault(param_id, {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(param_id, {}).update(values)
    return {"state": state, "param_groups": json.loads(json.dumps(meta["param_groups"]))}
