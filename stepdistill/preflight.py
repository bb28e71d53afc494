"""Every check a training run makes before any weights load: the base model, the steps, the output directory, the
checkpoint to resume, the resolution (read from the components' config files alone), the precision options
(mixed precision on this machine, 8-bit Adam, another VAE, a weights variant) and the launch (DeepSpeed refused; FSDP
only for full networks)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from .checkpoint import check_init_checkpoint, resolve_checkpoint
from .data import data_source
from .errors import StepdistillError
from .fsdp import check_launch
from .precision import check_precision, check_vae, check_variant
from .teacher import check_pipeline, pipeline_file


def check_output_dir(path: str, option: str = "--output_dir", create: bool = True) -> None:
    """``path`` exists or can be made, and takes a file: found now, not when the first output is written. With
    ``create=False`` nothing is made: the nearest existing folder on the path must be a writable directory."""
    out = Path(path)
    if not create:
        existing = next(p for p in [out, *out.absolute().parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            why = "Not a directory" if not existing.is_dir() else "Permission denied"
            raise StepdistillError(f"{option} {path} is not writable ({why}: {existing}); pass a directory you can "
                                   "write to")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise StepdistillError(f"{option} {path} is not writable ({e.strerror}); pass a directory you can "
                               "write to") from None


def preflight(config, method_cls) -> None:
    """Every check that needs no model weights, before anything expensive is loaded."""
    check_pipeline(str(config.pretrained_model_name_or_path), config.revision, getattr(config, "cache_dir", None))
    from .safe_weights import check_no_pickle

    check_no_pickle(config.pretrained_model_name_or_path, getattr(config, "allow_pickle", False))
    check_launch(config, method_cls)
    check_precision(config)
    if config.max_train_steps < 1:
        raise StepdistillError(f"--max_train_steps {config.max_train_steps}: must be at least 1")
    if config.train_batch_size < 1 or config.gradient_accumulation_steps < 1:
        raise StepdistillError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    bad = [s for s in getattr(config, "save_output_steps", []) if not 0 < s <= config.max_train_steps]
    if bad:
        raise StepdistillError(f"--save_output_steps {bad}: steps must lie in 1..--max_train_steps "
                               f"({config.max_train_steps})")
    check_lr_schedule(config)
    check_lora(config)
    data_source(config, method_cls.requires_images(config))
    check_output_dir(config.output_dir)
    resolve_checkpoint(config.output_dir, config.resume_from_checkpoint, method_cls.name)
    check_init_checkpoint(getattr(config, "init_from_checkpoint", None), method_cls.name)
    from .students import check_init_output

    check_init_output(config, method_cls)
    check_resolution(config)
    check_vae(config, _component_config(str(config.pretrained_model_name_or_path), "vae", config.revision,
                                        getattr(config, "cache_dir", None)))
    check_variant(config)
    check_outputs(config, method_cls)


def check_lora(config) -> None:
    """A LoRA student's rank and alpha (PEFT takes a rank of 0 only to fail with a traceback, and an alpha of 0
    trains an adapter whose scale is 0)."""
    if not getattr(config, "use_lora", False):
        return
    if config.lora_rank < 1:
        raise StepdistillError(f"--lora_rank {config.lora_rank}: a LoRA needs rank >= 1 (e.g. 64, LCM-LoRA's); "
                               "for no LoRA pass --use_lora false")
    if config.lora_alpha is not None and config.lora_alpha <= 0:
        raise StepdistillError(f"--lora_alpha {config.lora_alpha:g}: must be > 0 (the adapter's scale is "
                               "alpha/rank); drop it for alpha = rank")


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def trackers(report_to: str | None) -> list[str]:
    """The trackers --report_to names (all: both)."""
    if not report_to:
        return []
    return list(TRACKER_PACKAGES) if report_to == "all" else [report_to]


def check_outputs(config, method_cls) -> None:
    """Trackers installed, exports that fit the output kind, a Hub target for --push_to_hub."""
    import importlib.util

    for name in trackers(getattr(config, "report_to", None)):
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise StepdistillError(f"--report_to {config.report_to}: the {name} package is not installed; "
                                   f"pip install {TRACKER_PACKAGES[name]} (or `pip install stepdistill[tracking]`)")
    kind = method_cls.output_adapter(config)
    if getattr(config, "export", None) and kind != "lora":
        raise StepdistillError(f"--export {','.join(config.export)}: this run's output is {kind}, not a LoRA; "
                               "kohya files hold LoRAs: train with --use_lora true, or drop --export")
    if getattr(config, "push_to_hub", False):
        if not config.hub_model_id:
            raise StepdistillError("--push_to_hub needs --hub_model_id USER/NAME (the Hub repository to upload to)")
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(config.hub_model_id)
        except HFValidationError as e:
            raise StepdistillError(f"--hub_model_id {config.hub_model_id}: not a Hub repository id ({e})") from None
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            raise StepdistillError("--push_to_hub needs the network, but HF_HUB_OFFLINE is set; unset it or drop "
                                   "--push_to_hub (upload later with `huggingface-cli upload`)")


def check_lr_schedule(config) -> None:
    """Schedule options the chosen --lr_scheduler would ignore are errors, never silently dropped (diffusers'
    get_scheduler passes each option only to the schedules that take it)."""
    name = config.lr_scheduler
    if config.lr_warmup_steps < 0:
        raise StepdistillError(f"--lr_warmup_steps {config.lr_warmup_steps}: must be >= 0")
    if config.lr_warmup_steps and name in ("constant", "piecewise_constant"):
        fix = "constant_with_warmup" if name == "constant" else "a schedule with warm-up, or drop --lr_warmup_steps"
        raise StepdistillError(f"--lr_warmup_steps {config.lr_warmup_steps} has no effect with --lr_scheduler "
                               f"{name}: use --lr_scheduler {fix}")
    for option, value, takes in (("lr_step_rules", config.lr_step_rules, "piecewise_constant"),
                                 ("lr_num_cycles", config.lr_num_cycles, "cosine_with_restarts"),
                                 ("lr_power", config.lr_power, "polynomial")):
        if value is not None and name != takes:
            raise StepdistillError(f"--{option} {value} has no effect with --lr_scheduler {name}: only "
                                   f"{takes} takes it")
    if name == "piecewise_constant":
        if not config.lr_step_rules:
            raise StepdistillError("--lr_scheduler piecewise_constant needs --lr_step_rules, e.g. "
                                   "'1:100,0.1:200,0.01' (x1 before update 100, x0.1 before 200, then x0.01)")
        import torch
        from diffusers.optimization import get_piecewise_constant_schedule

        try:  # the rules are parsed when the schedule is made
            get_piecewise_constant_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0),
                                            config.lr_step_rules)
        except ValueError:
            raise StepdistillError(f"--lr_step_rules {config.lr_step_rules!r}: expected multiplier:update pairs "
                                   "and a last multiplier, e.g. '1:100,0.1:200,0.01'") from None


def _component_config(model: str, subfolder: str, revision=None, cache_dir=None) -> dict:
    """A component's config.json alone (no weights): from the folder, or the hub's small config file (from the
    local cache when HF_HUB_OFFLINE is set)."""
    return json.loads(pipeline_file(model, f"{subfolder}/config.json", revision, cache_dir).read_text())


def check_resolution(config) -> int:
    """The training resolution, checked against the VAE and UNet configs before any weights load."""
    model = str(config.pretrained_model_name_or_path)
    cache_dir = getattr(config, "cache_dir", None)
    config.resolution = model_resolution(model, config.resolution, config.revision, cache_dir)
    return config.resolution


def model_resolution(model: str, resolution: int | None, revision=None, cache_dir=None) -> int:
    """``resolution`` (default: the model's own), checked against the VAE and UNet configs of ``model`` before any
    weights load: training and ``stepdistill eval`` alike."""
    vae = _component_config(model, "vae", revision, cache_dir)
    unet = _component_config(model, "unet", revision, cache_dir)
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    resolution = resolution or int(unet["sample_size"]) * vae_factor
    # the VAE downsamples by its factor, the UNet halves the latent once per down block after the first, and the
    # stock SD/SDXL pipelines insist on multiples of 8
    factor = math.lcm(8, vae_factor * 2 ** (len(unet["block_out_channels"]) - 1))
    if resolution < 1:
        raise StepdistillError(f"--resolution {resolution}: must be a positive multiple of {factor}, e.g. "
                               f"{int(unet['sample_size']) * vae_factor} (the model's own)")
    if resolution % factor:
        raise StepdistillError(f"--resolution {resolution} is not divisible by {factor} (VAE factor {vae_factor} "
                               f"x UNet downsampling, and the pipelines' 8); use a multiple of {factor}, e.g. "
                               f"{max(factor, resolution // factor * factor)}")
    return resolution
