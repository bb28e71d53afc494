"""Networks that are not UNets: DMD2's GAN head, the mid-block feature trunk that both DMD2's head (on the fake
score) and TSCD's adversarial term (on the frozen teacher) read, and the fake score (a full copy, or one LoRA adapter
of a UNet the generator and the teacher share)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..lora import adapter_checkpointing, adapter_layers, using_adapter


class GANHead(nn.Sequential):
    """DMD2's classifier on a UNet's mid-block output (sd_guidance.py cls_pred_branch):
    [Conv4×4 s2 → GroupNorm → SiLU] while the map is larger than 4×4 (once on SD1.5's 8×8, three times on SDXL's
    32×32), then a conv covering the whole map (the paper's 4×4 s4 on a 4×4 map; 2×2 on a tiny UNet) → GroupNorm →
    SiLU → Conv1×1 → one logit per sample. GroupNorm keeps 32 groups on wide maps (1280 channels: 40 per group)
    but at least 16 channels per group on narrow ones: on the 1×1 map a one-channel group normalises to 0."""

    def __init__(self, channels: int, size: int):
        groups = math.gcd(channels, min(32, max(1, channels // 16)))
        layers: list[nn.Module] = []
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), nn.GroupNorm(groups, channels),
                       nn.SiLU()]
            size = (size - 2) // 2 + 1
        layers += [nn.Conv2d(channels, channels, size, stride=size), nn.GroupNorm(groups, channels), nn.SiLU(),
                   nn.Conv2d(channels, 1, 1)]
        super().__init__(*layers)

    @classmethod
    def for_unet(cls, unet, latent_size: int) -> "GANHead":
        """A head sized for ``unet``'s mid block at latents of ``latent_size``."""
        channels = int(unet.config.block_out_channels[-1])
        return cls(channels, latent_size // 2 ** (len(unet.config.block_out_channels) - 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features).flatten()


class _MidBlockReached(Exception):
    def __init__(self, features: torch.Tensor):
        super().__init__("mid-block output")
        self.features = features


def mid_block_features(unet, sample, timestep, *args, **kwargs) -> torch.Tensor:
    """The UNet's mid-block output: the forward pass stops there (a forward hook raises), so the up blocks never
    run — DMD2's classify_forward does the same (sd_unified_model.py)."""
    def stop(module, inputs, output):
        raise _MidBlockReached(output)

    handle = unet.mid_block.register_forward_hook(stop)
    kwargs["return_dict"] = False
    try:
        unet(sample, timestep, *args, **kwargs)
        raise RuntimeError("the UNet never reached its mid block")
    except _MidBlockReached as reached:
        return reached.features
    finally:
        handle.remove()


class FakeScore(nn.Module):
    """F: a full trainable copy of the teacher UNet, plus the GAN head when the GAN is on, as ONE module so that
    one optimiser (and one DDP wrapper) trains both. ``forward(..., classify=True)`` returns the head's logits on
    the mid-block features."""

    def __init__(self, unet: nn.Module, head: GANHead | None = None):
        super().__init__()
        self.unet = unet
        self.head = head

    def forward(self, sample, timestep, *args, classify: bool = False, **kwargs):
        if not classify:
            return self.unet(sample, timestep, *args, **kwargs)
        return self.head(mid_block_features(self.unet, sample, timestep, *args, **kwargs).float())

    def enable_gradient_checkpointing(self):
        self.unet.enable_gradient_checkpointing()


class SharedUNetAdapter(nn.Module):
    """One LoRA adapter of a UNet that other networks share (DMD2 / SiD with --fake_score_lora_rank: the generator's
    adapter, the fake score's adapter and the teacher are one set of UNet weights; ProlificDreamer's VSD trains its
    variational score as a LoRA on the frozen diffusion model the same way). Its forward runs the shared UNet with
    only this adapter active (and the GAN head on the mid-block features with ``classify=True``, as ``FakeScore``),
    then puts back whatever was active. The UNet is NOT a submodule: this module's parameters are the adapter's
    LoRA matrices (and the head), so that its optimiser, its DDP wrapper and its checkpoint hold exactly those."""

    def __init__(self, unet: nn.Module, adapter: str, head: GANHead | None = None):
        super().__init__()
        object.__setattr__(self, "shared_unet", unet)  # plain attribute: not registered, not in parameters()
        self.adapter = adapter
        self._layers = adapter_layers(unet)
        lora, ids = {}, {id(m) for m in self._layers}
        for path, layer in unet.named_modules():
            if id(layer) in ids:
                parts = {k: getattr(layer, k)[adapter] for k in ("lora_A", "lora_B") if adapter in getattr(layer, k)}
                if parts:
                    lora[path.replace(".", "/")] = nn.ModuleDict(parts)  # the same modules the UNet runs
        if not lora:
            raise ValueError(f"the UNet carries no adapter named {adapter!r}")
        self.lora = nn.ModuleDict(lora)
        self.head = head

    def forward(self, sample, timestep, *args, classify: bool = False, **kwargs):
        with using_adapter(self.shared_unet, self.adapter, self._layers) as unet:
            if not classify:
                return unet(sample, timestep, *args, **kwargs)
            return self.head(mid_block_features(unet, sample, timestep, *args, **kwargs).float())

    def enable_gradient_checkpointing(self):
        # the recomputation in backward must run the adapter that ran forward, not whichever is active by then
        self.shared_unet.enable_gradient_checkpointing(adapter_checkpointing)
