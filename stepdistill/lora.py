"""LoRA on a Diffusers UNet: add, save in Diffusers' format (rank and alpha travel in the file's metadata, so a
stock ``pipe.load_lora_weights(dir)`` restores the right scale), and read back."""

from __future__ import annotations

from pathlib import Path

import torch

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"

# LCM-LoRA's targets (Luo et al. 2023, arXiv:2311.05556): attention projections, the transformer's in/out
# projections and feed-forward, and every ResNet / resampling convolution and time-embedding projection: the
# default ``lora_target_modules`` of Diffusers' examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py.
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
ADAPTER_NAME = "default"


def add_lora(unet, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS, seed: int | None = None) -> None:
    """Attach a trainable LoRA (PEFT) to ``unet`` and freeze everything else. ``alpha`` defaults to ``rank``
    (scale 1), LCM-LoRA's choice; PEFT's own default of 8 would silently scale a rank-64 LoRA by 1/8."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(targets))
    if seed is not None:  # LoRA's A matrices are random: seeded, every process starts from the same adapter
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    if seed is not None:
        torch.random.set_rng_state(state)


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
