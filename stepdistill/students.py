"""Students of another shape than the teacher: a UNet built from a config file or from the teacher's config with
fewer channels (MSD's smaller students, arXiv 2410.23274 section 3.3), or one read from a folder (a TSM-initialised
student). A smaller student starts from random weights; teacher score matching (``methods/tsm.py``) gives it a
stable start before distribution matching."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import option
from .errors import StepdistillError


@dataclass
class StudentShapeOptions:
    """Options of a full student whose shape is not the teacher's (mixed into a method's config)."""

    student_config: str | None = option(None, "UNet config.json of a full student of another shape (random init; "
                                                "needs --use_lora false)")
    student_channel_multiplier: float | None = option(None, "a full student with the teacher's UNet config and "
                                                            "every block's channels times this, e.g. 0.5 (random "
                                                            "init; needs --use_lora false)")
    student_init: str | None = option(None, "a UNet folder the full student starts from, e.g. the unet/ of a "
                                            "`stepdistill train tsm` output (needs --use_lora false)")


def scaled_unet_config(config: dict, multiplier: float) -> dict:
    """The teacher's UNet config with every block's channels times ``multiplier``, rounded to a multiple of the
    group-norm groups (at least one group's worth); attention heads scale along, keeping the width per head where
    the channels allow it (SD 1.5 at 0.5: 160/320/640/640 channels, 4 heads)."""
    if not 0 < multiplier <= 1:
        raise StepdistillError(f"--student_channel_multiplier {multiplier}: must be in (0, 1]")
    groups = int(config.get("norm_num_groups") or 32)
    channels = [max(groups, round(c * multiplier / groups) * groups) for c in config["block_out_channels"]]
    out = dict(config, block_out_channels=channels)
    key = "num_attention_heads" if config.get("num_attention_heads") else "attention_head_dim"
    heads = config.get(key)
    if isinstance(heads, int):
        scaled = max(1, round(heads * multiplier))
        out[key] = scaled if all(c % scaled == 0 for c in channels) else heads
    elif isinstance(heads, (list, tuple)):
        scaled = [max(1, round(h * multiplier)) for h in heads]
        out[key] = scaled if all(c % h == 0 for c, h in zip(channels, scaled)) else list(heads)
    return out


def check_student_options(config) -> None:
    """The student-shape options of ``config`` (``student_config``, ``student_channel_multiplier``,
    ``student_init``), checked before any weights load."""
    chosen = [k for k in ("student_config", "student_channel_multiplier", "student_init") if getattr(config, k)]
    if not chosen:
        return
    if len(chosen) > 1:
        raise StepdistillError(f"pass one of --{', --'.join(chosen)}: each one fixes the student's shape")
    if config.use_lora:
        raise StepdistillError(f"--{chosen[0]} makes a student of its own shape, which a LoRA on the teacher "
                               "cannot be: add --use_lora false")
    if config.student_channel_multiplier is not None:
        scaled_unet_config({"block_out_channels": [32]}, config.student_channel_multiplier)  # range check
    if config.student_config and not Path(config.student_config).is_file():
        raise StepdistillError(f"--student_config {config.student_config}: no such file (a UNet config.json)")
    if config.student_init and not (Path(config.student_init) / "config.json").is_file():
        raise StepdistillError(f"--student_init {config.student_init}: no UNet there (expected config.json and "
                               "weights, e.g. the unet/ folder of a stepdistill tsm output)")
    if config.student_init:
        from .safe_weights import check_no_pickle

        check_no_pickle(config.student_init, getattr(config, "allow_pickle", False), "--student_init")


def build_student_unet(config, teacher_unet):
    """A full student UNet of its own shape (float32, trainable) or None when the student copies the teacher.
    Its inputs and outputs must be the teacher's: same latent channels, text width and prediction."""
    import torch
    from diffusers import UNet2DConditionModel

    if config.student_init:
        from .safe_weights import load_kwargs

        unet = UNet2DConditionModel.from_pretrained(config.student_init,
                                                    **load_kwargs(getattr(config, "allow_pickle", False)))
    elif config.student_config or config.student_channel_multiplier is not None:
        base = dict(teacher_unet.config)
        if config.student_config:
            base = json.loads(Path(config.student_config).read_text())
        else:
            base = scaled_unet_config(base, config.student_channel_multiplier)
        base = {k: v for k, v in base.items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config(base)
    else:
        return None
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        if unet.config[key] != teacher_unet.config[key]:
            raise StepdistillError(f"the student UNet's {key} is {unet.config[key]}, the teacher's "
                                   f"{teacher_unet.config[key]}: a student must read and write the teacher's latents "
                                   "and text embeddings")
    if unet.dtype != torch.float32:  # trainable: float32 also beside a half-precision teacher (precision.py)
        unet = unet.to(dtype=torch.float32)
    return unet.to(teacher_unet.device).requires_grad_(True)


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())
