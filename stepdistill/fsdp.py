"""FSDP2 through Accelerate's FSDP plugin, for runs whose trainable networks are whole modules (full-UNet students,
a full fake score): the launch checks ``preflight`` makes, the Accelerator's FSDP state, the pieces of the training
loop that differ when parameters are sharded DTensors, and the full-weight output.

An FSDP launch is an ``accelerate launch`` with an FSDP config (``configs/accelerate/fsdp.yaml``): Accelerate turns
the config into ``ACCELERATE_USE_FSDP`` and ``FSDP_*`` environment variables, which its
``FullyShardedDataParallelPlugin()`` reads. ``Accelerator.prepare(network, optimizer)`` then shards each network
(``fully_shard`` on every module of the wrap policy's classes, then on the network itself) and points the optimizer
at the sharded parameters. The frozen teacher is not prepared: every process holds it whole, in the weight dtype.
Checkpoints under FSDP are sharded (``checkpoint.save_sharded_checkpoint``); the output is written once, by the main
process, from the gathered full weights (``save_full_output``).
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import StepdistillError

logger = logging.getLogger("stepdistill")

FSDP_CONFIG = "configs/accelerate/fsdp.yaml"
DDP_CONFIG = "configs/accelerate/ddp.yaml"


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("true", "1", "yes")


def fsdp_requested() -> bool:
    """An FSDP launch: what ``accelerate launch`` sets for a config with ``distributed_type: FSDP``
    (accelerate/utils/launch.py: ``ACCELERATE_USE_FSDP``)."""
    return _env_flag("ACCELERATE_USE_FSDP")


def check_launch(config, method_cls) -> None:
    """DeepSpeed and the FSDP settings this trainer does not run are one-line errors before any weights load."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        raise StepdistillError(
            "DeepSpeed launch (ACCELERATE_USE_DEEPSPEED=true, an accelerate config with distributed_type DEEPSPEED): "
            "not supported yet, its ZeRO states would not be stepdistill checkpoints; launch with "
            f"--config_file {FSDP_CONFIG} (full UNets, sharded) or {DDP_CONFIG}")
    if not fsdp_requested():
        return
    launch = "FSDP launch (ACCELERATE_USE_FSDP=true)"
    version = os.environ.get("FSDP_VERSION", "1").strip()  # Accelerate's default is FSDP1
    if version != "2":
        raise StepdistillError(f"{launch} with fsdp_version {version}: stepdistill runs FSDP2 only; set "
                               f"fsdp_version: 2 in the accelerate config (as {FSDP_CONFIG} does)")
    if _env_flag("FSDP_ACTIVATION_CHECKPOINTING"):
        raise StepdistillError(f"{launch} with fsdp_activation_checkpointing: not supported (it rewraps the UNet "
                               "blocks, and checkpoints would name their weights differently); set it to false and "
                               "pass --gradient_checkpointing true (Diffusers' per-block checkpointing)")
    if getattr(config, "use_8bit_adam", False):
        raise StepdistillError(f"{launch} with --use_8bit_adam: bitsandbytes' 8-bit states are not kept for sharded "
                               "parameters; drop --use_8bit_adam (FSDP already shards AdamW's states) or launch "
                               f"with {DDP_CONFIG}")
    reason = method_cls.fsdp_refusal(config)
    if reason:
        raise StepdistillError(f"{launch}: {reason}")


def launch_plugin():
    """The FSDP plugin of an FSDP launch (None otherwise), read from the environment as Accelerate reads it, with
    one change: FSDP's mixed-precision policy keeps float32. Parameters are gathered and gradients reduced in
    float32, and ``accelerator.autocast()`` runs the half-precision compute exactly as without FSDP (trainable
    networks float32, frozen ones in the weight dtype: stepdistill/precision.py). Accelerate's default for
    bf16/fp16 (AcceleratorState -> ``fsdp_plugin.set_mixed_precision``, only when the plugin has no policy) would
    cast every parameter and reduce gradients in half precision."""
    if not fsdp_requested():
        return None
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import MixedPrecisionPolicy

    plugin = FullyShardedDataParallelPlugin()
    if plugin.mixed_precision_policy is None:
        plugin.mixed_precision_policy = MixedPrecisionPolicy()
    return plugin


def activate(accelerator, plugin) -> bool:
    """Whether this run shards its networks with FSDP2 (an FSDP launch with more than one process). Accelerate 1.16
    switches to FSDP only for accelerator devices (state.py, AcceleratorState.__init__: the MULTI_GPU/MULTI_XPU/...
    branch); a CPU launch (gloo) stays MULTI_CPU and would silently train DDP-style. There the trainer sets the
    state Accelerate sets on a GPU: the plugin, and the distributed type FSDP in both shared states, AcceleratorState
    and PartialState (state.py: ``PartialState._shared_state["distributed_type"] = self.distributed_type``).
    PartialState matters: every later ``AcceleratorState()`` (an AcceleratedOptimizer makes one) copies PartialState's
    fields over its own, and a MULTI_CPU there would turn the next ``prepare`` into DDP. Everything after that
    (prepare -> _prepare_fsdp2 -> fsdp2_prepare_model -> fully_shard) is Accelerate's own code, on either device.
    (One consequence of the FSDP PartialState: ``wait_for_everyone`` passes ``device_ids`` to the gloo barrier, as
    on a GPU; on a CPU-only machine torch maps it to the CPU.)"""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if plugin is None:
        return False
    if accelerator.num_processes == 1:
        logger.info("FSDP launch with one process: nothing to shard, the networks train whole (checkpoints in the "
                    "unsharded format)")
        return False
    if accelerator.device.type == "cpu" and accelerator.distributed_type in (DistributedType.MULTI_CPU,
                                                                             DistributedType.FSDP):
        # FSDP already: an earlier training of this process (one launch, several trainings) promoted PartialState
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    if not accelerator.is_fsdp2:
        raise StepdistillError(f"FSDP launch: Accelerate set up {accelerator.distributed_type}, not FSDP2; launch "
                               f"with --config_file {FSDP_CONFIG}")
    if plugin.auto_wrap_policy is None:
        logger.warning("FSDP without an auto-wrap policy: each network is one FSDP unit, gathered whole in every "
                       f"forward; {FSDP_CONFIG} wraps each UNet block")
    return True


def shard_copies(accelerator, modules: dict) -> None:
    """Shard frozen copies that follow a trained network (EMA targets) with the same plugin and wrap policy: their
    shards then line up with the network's, so an EMA update is local to each process (``torch._foreach_lerp_`` on
    DTensors of equal placement) and their forward gathers like the network's. Every unit of a copy reshards after
    forward: Accelerate keeps the root's and the final norm's parameters gathered after forward for the backward
    that follows (fsdp2_prepare_model: the root's reshard_after_forward left to torch, which makes it False; the
    "tail" group with False), and a copy never runs backward, so its ``parameters()`` would stay gathered plain
    tensors beside the network's DTensors."""
    from accelerate.utils import fsdp2_prepare_model

    for module in modules.values():
        fsdp2_prepare_model(accelerator, module)
        module.set_reshard_after_forward(True, recurse=True)


def sharded_params(name: str, module, optimizer) -> list:
    """The parameters an optimizer steps: after ``Accelerator.prepare`` under FSDP2, the sharded DTensor parameters
    that replaced the module's originals (accelerate fsdp2_switch_optimizer_parameters). Checks that the module
    was sharded: a prepare that fell back to DDP would train correctly but hold every weight on every process."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        raise RuntimeError(f"FSDP launch: Accelerate prepared {name} as {type(module).__name__}, not as an FSDP "
                           "module")
    return [p for group in optimizer.param_groups for p in group["params"]]


def drop_stray_grads(params) -> None:
    """Under FSDP the loop cannot restrict backward to one network with ``backward(inputs=...)``: the sharded
    parameters are not in the autograd graph (FSDP2 computes with gathered copies and reduce-scatters their
    gradients into the shards afterwards), so ``inputs=`` would compute nothing. A generator loss that flows
    through the fake score therefore leaves gradients on the fake score too; its phase drops them before its own
    backward (phases run in order, each network's own gradients were set to None after its last step)."""
    for p in params:
        p.grad = None


def clip_grad_norm_(accelerator, params, max_norm: float) -> torch.Tensor:
    """Gradient clipping over one network's sharded parameters: the global norm over all shards. Not
    ``Accelerator.clip_grad_norm_``: under FSDP it looks for the prepared model whose parameter list equals
    ``params`` by comparing the lists element by element, and two networks with the same number of parameters (a
    generator and a fake score, both UNet copies) make it compare DTensors, whose truth value is ambiguous."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    accelerator.unscale_gradients()  # fp16's grad scaler (Accelerate's FSDP2 scaler), as clip_grad_norm_ does
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norm = get_total_norm(grads, 2.0)
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, norm)
    return norm


def _plain_class(module):
    """The class ``fully_shard`` derived the module's class from (it makes ``FSDP<Name>`` subclasses)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def full_copy(module):
    """Every process: gather ``module``'s full weights (a collective). The main process gets a plain, unsharded
    module of the same class and config on the CPU; the others get None. The copy is built on the meta device
    and takes the gathered tensors as they are (``assign``), so the main process holds the weights once."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not state:  # cpu_offload: the full state dict lands on rank 0 only
        return None
    cls = _plain_class(module)
    with torch.device("meta"):
        plain = cls.from_config(module.config) if hasattr(cls, "from_config") else None
    if plain is None:
        raise StepdistillError(f"FSDP output: cannot rebuild a {cls.__name__} from its config")
    plain.load_state_dict(state, assign=True)
    left = [n for n, t in [*plain.named_parameters(), *plain.named_buffers()] if t.is_meta]
    if left:
        raise StepdistillError(f"FSDP output: {len(left)} tensors of {cls.__name__} were not in the gathered "
                               f"weights (e.g. {left[0]})")
    return plain.eval()


def save_full_output(method, output_dir, is_main: bool) -> None:
    """The method's output (``method.save_output``'s files) from the gathered full weights of the sampling UNet
    (the generator, its EMA, the full student): every process takes part in the gathering, the main process alone
    writes."""
    plain = full_copy(method.output_module())
    if is_main:
        method.save_output(output_dir, plain)
