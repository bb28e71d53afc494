"""LoRA on a Diffusers UNet: add, save in Diffusers' format (rank and alpha travel in the file's metadata, so a
stock ``pipe.load_lora_weights(dir)`` restores the right scale), and read back."""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

# LCM-LoRA's targets (Luo et al. 2023, arXiv:2311.05556): attention projections, the transformer's in/out
# projections and feed-forward, and every ResNet / resampling convolution and time-embedding projection: the
# default ``lora_target_modules`` of Diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
ADAPTER_NAME = "default"


def add_lora(unet, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS, seed: int | None = None,
             adapter_name: str = ADAPTER_NAME) -> None:
    """Attach a trainable LoRA (PEFT) to ``unet`` and freeze everything else. ``alpha`` defaults to ``rank``
    (scale 1), LCM-LoRA's choice; PEFT's own default of 8 would silently scale a rank-64 LoRA by 1/8."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    if seed is not None:  # LoRA's A matrices are random: seeded, every process starts from the same adapter
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    unet.add_adapter(config, adapter_name=adapter_name)
    if seed is not None:
        torch.random.set_rng_state(state)


# ------------------------------------------------------------------ several adapters on one UNet
# DMD2 / SiD with --fake_score_lora_rank: the generator (adapter "default"), the fake score (FAKE_SCORE_ADAPTER) and
# the teacher (adapters off) are one UNet. PEFT's switches (set_adapter, enable_adapters) also set requires_grad:
# on for the adapter they activate, off for the others. Here both adapters train all along (each with its own
# optimiser, collected once), so every switch below keeps the requires_grad flags as they were.
FAKE_SCORE_ADAPTER = "fake_score"


def adapter_layers(module) -> list:
    """The PEFT adapter layers inside ``module`` (the UNet, or one block of it)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def add_second_lora(unet, adapter_name: str, rank: int, alpha: float | None = None, seed: int | None = None,
                    targets=DEFAULT_TARGETS) -> None:
    """One more trainable LoRA on a UNet that may carry others: the base stays frozen, the adapters already there
    keep their requires_grad flags, and which adapters are active is left as it was."""
    layers = adapter_layers(unet)
    before = active_adapter(unet, layers) if layers else None
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    with warnings.catch_warnings():  # PEFT warns that a second adapter makes a model multi-adapter: it is meant to
        warnings.filterwarnings("ignore", message="Already found a `peft_config`")
        add_lora(unet, rank, alpha, targets, seed, adapter_name=adapter_name)
    for p, flag in flags:
        p.requires_grad_(flag)
    set_active_adapter(unet, before)


def active_adapter(module, layers=None) -> tuple[str, ...] | None:
    """The adapters the layers of ``module`` run (None: adapters disabled, the frozen base). Every switch here sets
    all layers alike, so the first layer speaks for all."""
    layers = adapter_layers(module) if layers is None else layers
    if not layers:
        return None
    return None if layers[0].disable_adapters else tuple(layers[0].active_adapters)


def set_active_adapter(module, names, layers=None) -> None:
    """Run only ``names`` (an adapter name, a tuple of names, or None for none: the frozen base) in every adapter
    layer of ``module``, keeping each parameter's requires_grad."""
    layers = adapter_layers(module) if layers is None else layers
    names = (names,) if isinstance(names, str) else names
    if all(hasattr(layer, "_active_adapter") and hasattr(layer, "_disable_adapters") for layer in layers):
        # the two fields PEFT's switches write (BaseTunerLayer.set_adapter / enable_adapters), without their
        # requires_grad passes: 30 ms -> 2 ms per switch on SDXL's 788 adapter layers (CPU)
        for layer in layers:
            if names is not None:
                layer._active_adapter = list(names)
            layer._disable_adapters = names is None
        return
    for layer in layers:  # through PEFT's API, undoing its requires_grad changes
        flags = [(p, p.requires_grad) for p in layer.parameters()]
        if names is None:
            layer.enable_adapters(False)
        else:
            layer.set_adapter(list(names))
            if layer.disable_adapters:
                layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


@contextlib.contextmanager
def using_adapter(module, names, layers=None):
    """Inside: ``module`` runs only ``names`` (None: no adapter); afterwards whatever ran before. Yields ``module``."""
    layers = adapter_layers(module) if layers is None else layers
    names = (names,) if isinstance(names, str) else names
    before = active_adapter(module, layers)
    switch = before != names
    if switch:
        set_active_adapter(module, names, layers)
    try:
        yield module
    finally:
        if switch:
            set_active_adapter(module, before, layers)


def adapter_checkpointing(block, *args):
    """Diffusers' gradient-checkpointing function (non-reentrant, as Diffusers' own) that recomputes ``block`` in
    backward with the adapters that were active when it ran forward. Diffusers' default recomputes with whatever is
    active at backward time: the generator's adapter for a fake-score or teacher forward that ran under another,
    which raises torch's CheckpointError (recomputed tensors differ) or, where the shapes happen to agree, gives
    silently wrong gradients."""
    from torch.utils.checkpoint import checkpoint

    layers = adapter_layers(block)
    state = active_adapter(block, layers)
    return checkpoint(block.__call__, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), using_adapter(block, state, layers)))


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter's weights with PEFT keys (``...lora_A.weight`` / ``...lora_B.weight``).

    Not converted to the legacy ``lora.down``/``lora.up`` names: that conversion renames only attention
    projections, and Diffusers 0.42 then drops those on load (a silent loss of every attention LoRA). The PEFT
    names load completely with ``load_lora_weights``.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)


def save_lora(unet, output_dir: str | Path, pipeline_class) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` loadable by ``pipeline_class.load_lora_weights``."""
    output_dir = Path(output_dir)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(unet).items()}
    metadata = unet.peft_config[ADAPTER_NAME].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])
    pipeline_class.save_lora_weights(output_dir, unet_lora_layers=state, weight_name=LORA_WEIGHTS_NAME,
                                     unet_lora_adapter_metadata=metadata, safe_serialization=True)
    return output_dir / LORA_WEIGHTS_NAME


def trainable_state_dict(module) -> dict[str, torch.Tensor]:
    """Only the parameters that train (a LoRA's, or everything for a full model): what a checkpoint must keep."""
    return {n: p.detach().cpu().contiguous() for n, p in module.named_parameters() if p.requires_grad}
