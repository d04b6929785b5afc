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


def save_checkpoint(storage: Storage, stage_output: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> str:
    folder = join(stage_output, "checkpoints", f"step-{state['step']:08d}")
    storage.write_bytes(join(folder, "model.safetensors"), save(_contiguous(model.state_dict())))
    tensors, meta = _split_optimizer_state(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    storage.write_bytes(join(folder, "optimizer.safetensors"), save(tensors))
    storage.write_json(join(folder, "state.json"), {**state, "optimizer": meta})
    storage.write_json(join(stage_output, "checkpoints", "latest.json"), {"step": state["step"], "folder": folder})
    return folder


def load_latest_checkpoint(storage: Storage, stage_output: str, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Restore model, optimizer and RNG from the newest committed checkpoint; None if there is none."""
    pointer = join(stage_output, "checkpoints", "latest.json")
    if not storage.exists(pointer):
        return None
    folder = storage.read_json(pointer)["folder"]
    model.load_state_dict(load(storage.read_bytes(join(folder, "model.safetensors"))))
    state = storage.read_json(join(folder, "state.json"))
    tensors = load(storage.read_bytes(join(folder, "optimizer.safetensors")))
    torch.set_rng_state(tensors.pop("rng.torch"))
    optimizer.load_state_dict(_join_optimizer_state(tensors, state.pop("optimizer")))
    return state


def save_model(storage: Storage, stage_output: str, model: torch.nn.Module, config: dict[str, Any]) -> str:
    uri = join(stage_output, "model.safetensors")
    storage.write_bytes(uri, save(_contiguous(model.state_dict())))
    storage.write_json(join(stage_output, "model.json"), config)
    return uri


def load_model_weights(storage: Storage, uri: str, model: torch.nn.Module) -> None:
    model.load_state_dict(load(storage.read_bytes(uri)))


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().contiguous() for name, tensor in state.items()}


def _split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
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
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": json.loads(json.dumps(meta["param_groups"]))}
