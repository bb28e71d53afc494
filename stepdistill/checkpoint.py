"""Checkpoints: safetensors for every tensor, JSON for the rest, written atomically.

A checkpoint is written to a temporary sibling directory and renamed into place, so a crash or kill during a save
leaves the previous checkpoint untouched; pruning happens only after the new one exists. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import StepdistillError

STATE_NAME = "state.json"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and _PATTERN.match(p.name) and (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: int(_PATTERN.match(p.name).group(1)))


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}/{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, key = flat.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(output_dir: str | Path, step: int, *, method: str, modules: dict[str, dict[str, torch.Tensor]],
                    optimizers: dict, schedulers: dict, extra: dict | None = None,
                    total_limit: int | None = None) -> Path:
    """Write ``output_dir/checkpoint-{step}``. ``modules``: name → tensors (trainable weights, EMA, ...)."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta: dict[str, Any] = {"method": method, "step": step, "optimizers": {}, "schedulers": {},
                            "extra": extra or {}}
    for name, tensors in modules.items():
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{name}.safetensors")
    for name, opt in optimizers.items():
        tensors, opt_meta = _split_optimizer_state(opt.state_dict())
        save_file(tensors, tmp / f"optimizer-{name}.safetensors")
        meta["optimizers"][name] = opt_meta
    for name, sched in schedulers.items():
        meta["schedulers"][name] = sched.state_dict()  # LambdaLR keeps None for plain functions: JSON-safe
    meta["modules"] = sorted(modules)
    (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1))
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _checked(path: Path, option: str, method: str, fix: str) -> Path:
    """A checkpoint directory named by ``option``, written by ``method``."""
    if not (path / STATE_NAME).is_file():
        raise StepdistillError(f"{option} {path}: not a stepdistill checkpoint (no {STATE_NAME})")
    saved = json.loads((path / STATE_NAME).read_text())
    if saved.get("method") != method:
        raise StepdistillError(f"{option} {path}: it was written by method {saved.get('method')!r}, not {method!r}; "
                               f"{fix}")
    return path


def resolve_checkpoint(output_dir: str | Path, resume: str | None, method: str) -> Path | None:
    """The checkpoint directory to resume from (None to start fresh), checked against the method."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            return None
        path = found[-1]
    else:
        path = Path(resume)
    return _checked(path, "--resume_from_checkpoint", method, f"point it at a {method} run or start fresh")


def check_init_checkpoint(path: str | Path | None, method: str) -> Path | None:
    """``--init_from_checkpoint``: a checkpoint directory written by the same method (weights only are read)."""
    if not path:
        return None
    return _checked(Path(path), "--init_from_checkpoint", method,
                    f"pass a checkpoint-N directory of an earlier {method} run")


def load_checkpoint_weights(path: str | Path) -> dict[str, dict[str, torch.Tensor]]:
    """The module tensors of a checkpoint alone (no optimizer state), by module name."""
    path = Path(path)
    meta = json.loads((path / STATE_NAME).read_text())
    return {name: load_file(path / f"{name}.safetensors") for name in meta["modules"]}


def load_checkpoint(path: str | Path, *, optimizers: dict, schedulers: dict) -> tuple[int, dict, dict]:
    """Restore optimizers and schedulers in place; return (step, module tensors by name, extra)."""
    path = Path(path)
    meta = json.loads((path / STATE_NAME).read_text())
    for name, opt in optimizers.items():
        tensors = load_file(path / f"optimizer-{name}.safetensors")
        opt.load_state_dict(_join_optimizer_state(tensors, meta["optimizers"][name]))
    for name, sched in schedulers.items():
        sched.load_state_dict(meta["schedulers"][name])
    return int(meta["step"]), load_checkpoint_weights(path), meta.get("extra", {})
