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


def remove_stale_temporaries(output_dir: str | Path) -> list[Path]:
    """Delete the temporary folders of saves that never finished (a process killed while writing a checkpoint):
    called when a run starts, when no save of its own is under way. Returns what it deleted."""
    stale = sorted(Path(output_dir).glob(".checkpoint-*.tmp-*")) if Path(output_dir).is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


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
    try:
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
    except BaseException:  # a full disk, an interrupt: no half-written temporary stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


# ------------------------------------------------------------------------------------------ sharded (FSDP) checkpoints
# Under FSDP a checkpoint is written by every process: torch.distributed.checkpoint (DCP) saves each process's shards
# of the networks, their AdamW states and the EMA copies ("copies") into checkpoint-N/shards/, one safetensors file
# per process (DCP's HuggingFaceStorageWriter with save_distributed: each file's header records where its shards sit
# in the full tensors, so loading reshards to any process count, and nothing is pickled, unlike DCP's default
# FileSystemWriter, whose .metadata file is a pickle). The main process writes state.json (format "sharded", the
# optimizers' param groups, the schedulers) and renames the folder into place, as for the unsharded checkpoints.
SHARDED_FORMAT = "sharded"
SHARDS_DIR = "shards"


def checkpoint_format(path: str | Path) -> str:
    """"sharded" (written under FSDP) or "safetensors" (one file per module, written by the main process)."""
    return json.loads((Path(path) / STATE_NAME).read_text()).get("format", "safetensors")


def _inner(optimizer):
    """The torch optimizer inside Accelerate's AcceleratedOptimizer."""
    return getattr(optimizer, "optimizer", optimizer)


def _trainable_state(net) -> dict:
    """The network's trainable tensors (sharded DTensors under FSDP), by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    return {k: v for k, v in get_model_state_dict(net).items() if k in trainable}


def _module_state(module) -> dict:
    """Every tensor of a module (an EMA copy: frozen, all of it), sharded under FSDP."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(module)


def _param_groups(net, optimizer) -> list[dict]:
    """The optimizer's param groups (hyperparameters) with parameter names in place of indices."""
    names = {id(p): n for n, p in net.named_parameters()}
    return [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
            for g in optimizer.param_groups]


def _optimizer_state(net, optimizer) -> dict:
    """AdamW's per-parameter state by parameter name ({} before its first step: DCP's get_optimizer_state_dict
    would initialise an empty optimizer with a zero-gradient step)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(net, optimizer)["state"] if optimizer.state else {}


def _flatten(tree: dict, prefix: str = "") -> dict:
    """DCP's flat keys of a nested dict: the path joined by dots (torch/distributed/checkpoint/_nested_dict.py)."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_sharded_checkpoint(output_dir: str | Path, step: int, *, method: str, networks: dict, optimizers: dict,
                            schedulers: dict, copies: dict, total_limit: int | None, is_main: bool, barrier,
                            num_processes: int) -> Path:
    """Every process: write ``output_dir/checkpoint-{step}`` with its shards (a collective). ``networks``: name ->
    FSDP-sharded trainable module; ``copies``: name -> sharded EMA copy; ``barrier``: waits for every process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f".checkpoint-{step}.tmp-sharded"  # one name for every process
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    state = {"model": {n: _trainable_state(net) for n, net in networks.items()},
             "optimizer": {n: _optimizer_state(net, _inner(optimizers[n])) for n, net in networks.items()},
             "copies": {n: _module_state(m) for n, m in copies.items()}}
    # every file is fsynced by the writer (FileSystemWriter sync_files=True) before save returns on any process;
    # a failed write on any process raises on every process (DCP gathers the errors)
    try:
        dcp.save(state, storage_writer=HuggingFaceStorageWriter(str(tmp / SHARDS_DIR), save_distributed=True))
    except BaseException as e:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        # DCP's CheckpointException holds each failed process's error: a full disk raises that OSError (on every
        # process alike), so that the trainer names the cause
        failed = [exc for exc, _ in getattr(e, "failures", {}).values() if isinstance(exc, OSError)]
        if failed:
            raise failed[0] from e
        raise
    barrier()
    failure = None  # the main process's own write fails alone: it still meets the others at the last barrier, and
    if is_main:     # the caller's all-process check (Trainer._any_process) stops every process together
        meta: dict[str, Any] = {
            "method": method, "step": step, "format": SHARDED_FORMAT, "num_processes": num_processes,
            "networks": sorted(networks), "copies": sorted(copies), "modules": sorted([*networks, *copies]),
            "optimizers": {n: {"param_groups": _param_groups(net, _inner(optimizers[n]))}
                           for n, net in networks.items()},
            "schedulers": {n: s.state_dict() for n, s in schedulers.items()}, "extra": {}}
        try:
            (tmp / STATE_NAME).write_text(json.dumps(meta, indent=1))
            with open(tmp / STATE_NAME, "rb") as fh:
                os.fsync(fh.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failure = e
        if failure is None and total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    if failure is not None:
        raise failure
    return final


def _sharded_shapes(path: Path) -> dict[str, tuple]:
    """The flat keys of a sharded checkpoint and the full shape of each, read from the safetensors headers."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    metadata = HuggingFaceStorageReader(str(path / SHARDS_DIR)).read_metadata().state_dict_metadata
    return {k: tuple(getattr(md, "size", ())) for k, md in metadata.items()}


def _check_fit(path: Path, option: str, name: str, wanted: dict, saved: dict, prefix: str,
               foreign_is_error: bool) -> list[str]:
    """Keys of ``wanted`` (a network's tensors) that the checkpoint lacks; a shape that differs is an error, and so
    is a tensor the network does not have when ``foreign_is_error``."""
    missing = []
    for key, tensor in wanted.items():
        shape = saved.get(prefix + key)
        if shape is None:
            missing.append(key)
        elif shape != tuple(tensor.shape):
            raise StepdistillError(f"{option} {path}: {name}'s {key} is {list(shape)} there, {list(tensor.shape)} in "
                                   "this run: another model, LoRA setting or student shape")
    if foreign_is_error:
        foreign = sorted(k[len(prefix):] for k in saved if k.startswith(prefix) and k[len(prefix):] not in wanted)
        if foreign:
            raise StepdistillError(f"{option} {path}: {len(foreign)} tensors of {name} do not fit this run (e.g. "
                                   f"{foreign[0]}): another model, LoRA rank or student shape")
    return missing


def _load_sharded(path: Path, state: dict) -> None:
    """Read the entries of ``state`` (nested, DCP's layout) in place, resharded to this run's layout."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    dcp.load(state, storage_reader=HuggingFaceStorageReader(str(path / SHARDS_DIR)))


def load_sharded_checkpoint(path: str | Path, *, networks: dict, optimizers: dict, schedulers: dict,
                            copies: dict) -> int:
    """Resume from a sharded checkpoint into this run's networks, sharded (FSDP, any process count) or whole (a run
    without FSDP: every process reads the full tensors). Every process calls it. Returns the step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, \
        set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = json.loads((path / STATE_NAME).read_text())
    option = "--resume_from_checkpoint"
    saved = _sharded_shapes(path)
    state: dict[str, dict] = {"model": {}, "optimizer": {}, "copies": {}}
    for name, net in networks.items():
        wanted = _trainable_state(net)
        missing = _check_fit(path, option, name, wanted, saved, f"model.{name}.", foreign_is_error=False)
        if missing:
            raise StepdistillError(f"{path}: checkpoint lacks {len(missing)} trainable tensors of {name} (e.g. "
                                   f"{missing[0]}): a different LoRA rank or model?")
        state["model"][name] = wanted
        # get_optimizer_state_dict initialises a fresh optimizer's state (one step at lr 0 with zero gradients: the
        # weights do not move); only the entries the checkpoint has are read, and loading replaces the whole state
        template = get_optimizer_state_dict(net, _inner(optimizers[name]))["state"]
        prefix = f"optimizer.{name}."
        state["optimizer"][name] = {fqn: entry for fqn, entry in template.items()
                                    if all(f"{prefix}{fqn}.{k}" in saved for k in entry)}
    for name in meta.get("copies", []):
        if name in copies:
            state["copies"][name] = _module_state(copies[name])
    _load_sharded(path, state)
    for name, net in networks.items():
        set_model_state_dict(net, state["model"][name], options=StateDictOptions(strict=False))
        # strict=False: parameters without saved state (a GAN head before the GAN starts) get none, as in the run
        # that wrote the checkpoint (Optimizer.load_state_dict replaces the whole state)
        set_optimizer_state_dict(net, _inner(optimizers[name]),
                                 {"state": state["optimizer"][name],
                                  "param_groups": meta["optimizers"][name]["param_groups"]},
                                 options=StateDictOptions(strict=False))
    for name, tensors in state["copies"].items():
        set_model_state_dict(copies[name], tensors)
    for name, sched in schedulers.items():
        sched.load_state_dict(meta["schedulers"][name])
    return int(meta["step"])


def _shard_like(full: dict, template: dict) -> dict:
    """Full tensors (every process read the same file) as this process's shards of ``template``'s tensors, with no
    communication (``distribute_tensor(src_data_rank=None)`` keeps each process's own chunk of its local data).
    ``set_model_state_dict(full_state_dict=True)`` would instead scatter every tensor from process 0."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for key, value in full.items():
        like = template.get(key)
        if isinstance(value, dict):
            out[key] = _shard_like(value, like or {})
        elif isinstance(like, DTensor):
            out[key] = distribute_tensor(value.to(like.device, like.dtype), like.device_mesh, like.placements,
                                         src_data_rank=None)
        elif torch.is_tensor(like):
            out[key] = value.to(like.device, like.dtype)
        else:
            out[key] = value
    return out


def load_unsharded_into_sharded(path: str | Path, *, networks: dict, optimizers: dict, schedulers: dict,
                                copies: dict) -> int:
    """Resume an FSDP run from a checkpoint written without FSDP (one safetensors file per module): every process
    reads the full tensors and keeps its shards of them. Every process calls it. Returns the step."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, \
        set_model_state_dict, set_optimizer_state_dict

    path = Path(path)
    meta = json.loads((path / STATE_NAME).read_text())
    modules = load_checkpoint_weights(path)
    lenient = StateDictOptions(strict=False)
    for name, net in networks.items():
        names = [n for n, p in net.named_parameters() if p.requires_grad]
        missing = set(names) - set(modules.get(name, {}))
        if missing:
            raise StepdistillError(f"{path}: checkpoint lacks {len(missing)} trainable tensors of {name} (e.g. "
                                   f"{sorted(missing)[0]}): a different LoRA rank or model?")
        set_model_state_dict(net, _shard_like(modules[name], _trainable_state(net)), options=lenient)
        # the unsharded format numbers the parameters in the optimizer's order (the network's trainable ones);
        # the template (a fresh optimizer's state, initialised at lr 0) gives each entry's placement
        osd = _join_optimizer_state(load_file(path / f"optimizer-{name}.safetensors"), meta["optimizers"][name])
        template = get_optimizer_state_dict(net, _inner(optimizers[name]))["state"]
        state = _shard_like({names[i]: entry for i, entry in osd["state"].items()}, template)
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]
        set_optimizer_state_dict(net, _inner(optimizers[name]), {"state": state, "param_groups": groups},
                                 options=lenient)
    for name, module in copies.items():
        if name in modules:
            set_model_state_dict(module, _shard_like(modules[name], _module_state(module)))
    for name, sched in schedulers.items():
        sched.load_state_dict(meta["schedulers"][name])
    return int(meta["step"])


def load_weights_any(path: str | Path, *, networks: dict, copies: dict, option: str = "--init_from_checkpoint") \
        -> dict[str, int]:
    """``--init_from_checkpoint`` where the checkpoint is sharded or this run is (FSDP): the networks' weights and the
    EMA copies, nothing else. A tensor the checkpoint lacks keeps its initialisation (a GAN head new in this stage);
    a tensor of the checkpoint this run lacks, or of another shape, is an error. Returns the kept count per
    network. Every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    path = Path(path)
    sharded = checkpoint_format(path) == SHARDED_FORMAT
    if sharded:
        saved = _sharded_shapes(path)
        names = {k.split(".")[1] for k in saved if k.startswith(("model.", "copies."))}
        flat = None
    else:
        flat = load_checkpoint_weights(path)
        names = set(flat)
        saved = {f"{'copies' if n in copies else 'model'}.{n}.{k}": tuple(v.shape)
                 for n, tensors in flat.items() for k, v in tensors.items()}
    lacking = [k for k in copies if k not in names]
    if lacking:
        raise StepdistillError(f"{option} {path}: the checkpoint has no {', '.join(lacking)}; start the EMA in the "
                               "run that writes the checkpoint, or drop it")
    kept, state = {}, {"model": {}, "copies": {}}
    for group, modules, trainable in (("model", networks, True), ("copies", copies, False)):
        for name, module in modules.items():
            wanted = _trainable_state(module) if trainable else _module_state(module)
            missing = _check_fit(path, option, name, wanted, saved, f"{group}.{name}.", foreign_is_error=True)
            kept[name] = len(missing)
            state[group][name] = {k: v for k, v in wanted.items() if k not in missing}
    if sharded:
        _load_sharded(path, state)
        for group, modules in (("model", networks), ("copies", copies)):
            for name, tensors in state[group].items():
                set_model_state_dict(modules[name], tensors, options=StateDictOptions(strict=False))
    else:
        for group, modules in (("model", networks), ("copies", copies)):
            for name, wanted in state[group].items():
                tensors = {k: v for k, v in flat[name].items() if k in wanted}
                set_model_state_dict(modules[name], _shard_like(tensors, wanted),
                                     options=StateDictOptions(strict=False))
    return kept
