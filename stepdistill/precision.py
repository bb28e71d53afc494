"""Precision and memory: the dtype each network is held in, the optimiser class, and the checks of the precision
options that need no weights (``preflight`` calls ``check_precision``).

Under mixed precision this follows the Diffusers training scripts (examples/consistency_distillation/
train_lcm_distill_lora_sd_wds.py: ``weight_dtype``, ``cast_training_params``): the frozen networks (teacher UNet, VAE,
text encoders) are held in the half-precision weight dtype, every trainable parameter (a LoRA, a full student, the fake
score, GAN heads, AGD adapters) and every EMA copy stays float32, and autocast runs the forward passes in half
precision. A LoRA keeps sharing its frozen base: float32 adapters on a bf16 UNet. Latents, noise and losses stay
float32. Without mixed precision nothing is cast: the float32 path is the one it always was.
"""

from __future__ import annotations

import os

import torch

from .errors import StepdistillError

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_mixed_precision(flag: str | None) -> tuple[str, str]:
    """(mode, the option that set it): an explicit ``--mixed_precision`` wins; else what Accelerate was launched with
    (``accelerate launch --mixed_precision`` and the accelerate config reach the script as
    ACCELERATE_MIXED_PRECISION, which ``Accelerator(mixed_precision=None)`` reads); else "no"."""
    if flag is not None:
        return flag, f"--mixed_precision {flag}"
    env = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if env:
        return env.lower(), f"ACCELERATE_MIXED_PRECISION={env} (accelerate launch / the accelerate config)"
    return "no", "the default"


def weight_dtype(mode: str) -> torch.dtype:
    """The dtype of the frozen weights under Accelerate's mixed-precision mode ("no", "fp16", "bf16", ...)."""
    return WEIGHT_DTYPES.get(str(mode), torch.float32)


def vae_dtype(kind: str, vae_config: dict, dtype: torch.dtype) -> torch.dtype:
    """The VAE's dtype beside frozen weights of ``dtype``. SDXL's stock VAE overflows in fp16 and says so with
    ``force_upcast: true`` in its config: it stays float32, as the Diffusers SDXL training scripts keep it unless an
    fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix, ``force_upcast: false``) is given. SD 1.x/2.x VAEs are held in the
    weight dtype, as the Diffusers SD scripts hold them (their configs predate the key; AutoencoderKL defaults it
    to true)."""
    if dtype != torch.float32 and kind == "sdxl" and vae_config.get("force_upcast", True):
        return torch.float32
    return dtype


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere and later GPUs (Diffusers scripts' --allow_tf32); no effect on CPU."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def keep_trainable_in_float32(method) -> None:
    """Every trainable parameter and every EMA copy of ``method`` in float32 (a full student or fake score copied
    from a half-precision teacher becomes a float32 copy; a LoRA's adapters on a half-precision base are upcast, the
    base stays shared). A no-op when everything is float32 already."""
    for net in method.networks.values():
        for p in net.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # what diffusers.training_utils.cast_training_params does
        # a SharedUNetAdapter (a LoRA fake score) runs a UNet it does not register: its LoRA layers are there
        shared = getattr(net, "shared_unet", None)
        for module in [*net.modules(), *(shared.modules() if shared is not None else ())]:
            base = getattr(module, "base_layer", None)
            if hasattr(module, "cast_input_dtype_enabled") and getattr(base, "weight", torch.empty(0)).dtype in (
                    torch.float16, torch.bfloat16):
                # PEFT upcasts a LoRA layer's input to its float32 adapters and autocast casts it back: a second
                # copy of every adapted layer's input kept for backward. Autocast casts the adapters instead (the
                # switch of peft.helpers.disable_input_dtype_casting); the networks always run under autocast
                module.cast_input_dtype_enabled = False
    for ema in method.ema_copies().values():
        if any(p.dtype != torch.float32 for p in ema.parameters()):
            ema.float()


def optimizer_class(config):
    """AdamW, or bitsandbytes' 8-bit AdamW with ``--use_8bit_adam`` (optimizer states in 8 bits)."""
    if not getattr(config, "use_8bit_adam", False):
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit


def has_accelerator() -> bool:
    """A device on which autocast runs fp16 (Accelerate refuses fp16 on the CPU)."""
    current = getattr(getattr(torch, "accelerator", None), "is_available", None)
    return bool(current()) if current is not None else torch.cuda.is_available()


def check_precision(config) -> None:
    """The precision options' checks that need no weights: fp16 without a GPU, --use_8bit_adam without
    bitsandbytes."""
    mode, source = resolve_mixed_precision(getattr(config, "mixed_precision", None))
    if mode not in ("no", "fp16", "bf16"):
        raise StepdistillError(f"{source}: not a mixed precision this trainer runs; use no, fp16 or bf16")
    if mode == "fp16" and not has_accelerator():
        raise StepdistillError(f"{source}: fp16 mixed precision needs a GPU (Accelerate and torch's CPU autocast do "
                               "not run fp16); on this CPU-only machine use --mixed_precision bf16 or no")
    if getattr(config, "use_8bit_adam", False):
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise StepdistillError("--use_8bit_adam needs bitsandbytes, which is not installed: pip install "
                                   "'stepdistill[8bit]' (or bitsandbytes), or drop --use_8bit_adam") from None


# ------------------------------------------------------------------------------------------------ VAE and variant
VAE_OPTION = "--pretrained_vae_model_name_or_path"


def vae_source(source: str, cache_dir: str | None = None) -> tuple[dict, str | None]:
    """The config and subfolder of a VAE given by ``--pretrained_vae_model_name_or_path``: an AutoencoderKL folder
    or hub id (config.json at its root, as madebyollin/sdxl-vae-fp16-fix has it), or a pipeline's vae/."""
    import json
    from pathlib import Path

    from .teacher import _is_local, hub_file

    if _is_local(source):
        for subfolder in (None, "vae"):
            path = Path(source, subfolder or "", "config.json")
            if path.is_file():
                return json.loads(path.read_text()), subfolder
        raise StepdistillError(f"{VAE_OPTION} {source}: no config.json there (nor vae/config.json); pass an "
                               "AutoencoderKL folder or hub id, e.g. madebyollin/sdxl-vae-fp16-fix")
    try:
        return json.loads(hub_file(source, "config.json", cache_dir=cache_dir).read_text()), None
    except StepdistillError as e:
        raise StepdistillError(f"{VAE_OPTION} {source}: {e}") from None


def check_vae(config, base_vae: dict) -> None:
    """The VAE of ``--pretrained_vae_model_name_or_path`` must read and write the base model's latents: the same
    latent channels, scaling and shift (compared in the two config.json files, before any weights load)."""
    source = getattr(config, "pretrained_vae_model_name_or_path", None)
    if not source:
        return
    vae, _ = vae_source(source, getattr(config, "cache_dir", None))
    defaults = {"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None}  # AutoencoderKL's defaults
    for key, default in defaults.items():
        mine, base = vae.get(key, default), base_vae.get(key, default)
        if mine != base:
            raise StepdistillError(f"{VAE_OPTION} {source}: its {key} is {mine}, the base model's VAE has {base}; the "
                                   "VAE must match the base model's latent space (for SDXL e.g. "
                                   "madebyollin/sdxl-vae-fp16-fix)")


def load_vae(base: str, kind: str, dtype: torch.dtype, vae: str | None, **hub) -> dict:
    """``{"vae": AutoencoderKL}`` when the pipeline's own VAE must not load as the rest does (another VAE is given,
    or it stays float32 beside half-precision weights: ``vae_dtype``), else ``{}``."""
    import json

    from diffusers import AutoencoderKL

    from .teacher import pipeline_file

    if vae is None and dtype == torch.float32:
        return {}
    safe = {k: hub.pop(k) for k in ("use_safetensors",) if k in hub}  # safe_weights.load_kwargs
    if vae is not None:
        from .safe_weights import check_no_pickle

        check_no_pickle(vae, not safe, "--pretrained_vae_model_name_or_path")
        config, subfolder = vae_source(vae, hub.get("cache_dir"))
        source, load = vae, {"cache_dir": hub["cache_dir"]} if hub.get("cache_dir") else {}
    else:
        config = json.loads(pipeline_file(base, "vae/config.json", hub.get("revision"), hub.get("cache_dir"))
                            .read_text())
        source, subfolder, load = base, "vae", hub
    own = vae_dtype(kind, config, dtype)
    if vae is None and own == dtype:
        return {}
    try:
        model = AutoencoderKL.from_pretrained(source, subfolder=subfolder, torch_dtype=own, **load, **safe)
    except OSError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepdistillError(f"{source}: cannot load its VAE ({first_line})") from e
    return {"vae": model}


def check_variant(config) -> None:
    """``--variant V`` needs weights named *.V.safetensors (or .bin) in the UNet folder: of a local folder, or of a hub
    id's cached snapshot when offline (online, the hub may hold them: the loader then says so)."""
    from pathlib import Path

    from .teacher import _is_local, _offline, hub_file

    variant, model = getattr(config, "variant", None), str(config.pretrained_model_name_or_path)
    if not variant:
        return
    if _is_local(model):
        folder = Path(model)
    elif _offline():
        folder = hub_file(model, "model_index.json", config.revision, getattr(config, "cache_dir", None)).parent
    else:
        return
    names = [p.name for p in (folder / "unet").glob("*") if p.suffix in (".safetensors", ".bin")]
    if not any(f".{variant}." in n or f".{variant}-" in n for n in names):
        where = "" if _is_local(model) else " in the local hub cache"
        raise StepdistillError(f"--variant {variant}: {model}/unet has no {variant} weights{where} (files named "
                               f"*.{variant}.safetensors); drop --variant, or pass a model that has them")
