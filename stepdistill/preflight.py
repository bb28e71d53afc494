"""Every check a training run makes before any weights load: the base model, the steps, the output directory, the
checkpoint to resume, the resolution (read from the components' config files alone) and the precision options
(mixed precision on this machine, 8-bit Adam, another VAE, a weights variant)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .checkpoint import resolve_checkpoint
from .errors import StepdistillError
from .precision import check_precision, check_vae, check_variant
from .teacher import check_pipeline, pipeline_file


def _check_output_dir(path: str) -> None:
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise StepdistillError(f"--output_dir {path} is not writable ({e.strerror}); pass a directory you can "
                               "write to") from e


def preflight(config, method_cls) -> None:
    """Every check that needs no model weights, before anything expensive is loaded."""
    check_pipeline(str(config.pretrained_model_name_or_path), config.revision, getattr(config, "cache_dir", None))
    check_precision(config)
    if config.max_train_steps < 1:
        raise StepdistillError(f"--max_train_steps {config.max_train_steps}: must be at least 1")
    if config.train_batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise StepdistillError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    bad = [s for s in getattr(config, "save_output_steps", []) if not 0 < s <= config.max_train_steps]
    if bad:
        raise StepdistillError(f"--save_output_steps {bad}: steps must lie in 1..--max_train_steps "
                               f"({config.max_train_steps})")
    _check_output_dir(config.output_dir)
    resolve_checkpoint(config.output_dir, config.resume_from_checkpoint, method_cls.name)
    check_resolution(config)
    check_vae(config, _component_config(str(config.pretrained_model_name_or_path), "vae", config.revision,
                                        getattr(config, "cache_dir", None)))
    check_variant(config)


def _component_config(model: str, subfolder: str, revision=None, cache_dir=None) -> dict:
    """A component's config.json alone (no weights): from the folder, or the hub's small config file (from the
    local cache when HF_HUB_OFFLINE is set)."""
    return json.loads(pipeline_file(model, f"{subfolder}/config.json", revision, cache_dir).read_text())


def check_resolution(config) -> int:
    """The training resolution, checked against the VAE and UNet configs before any weights load."""
    model = str(config.pretrained_model_name_or_path)
    cache_dir = getattr(config, "cache_dir", None)
    vae = _component_config(model, "vae", config.revision, cache_dir)
    unet = _component_config(model, "unet", config.revision, cache_dir)
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    resolution = config.resolution or int(unet["sample_size"]) * vae_factor
    # the VAE downsamples by its factor, the UNet halves the latent once per down block after the first, and the
    # stock SD/SDXL pipelines insist on multiples of 8
    factor = math.lcm(8, vae_factor * 2 ** (len(unet["block_out_channels"]) - 1))
    if resolution % factor:
        raise StepdistillError(f"--resolution {resolution} is not divisible by {factor} (VAE factor {vae_factor} "
                               f"x UNet downsampling, and the pipelines' 8); use a multiple of {factor}, e.g. "
                               f"{max(factor, resolution // factor * factor)}")
    config.resolution = resolution
    return resolution
