"""Single-file LoRA exports for the tools people generate images with.

``stepdistill export DIR --format kohya --output FILE.safetensors`` turns a LoRA output (PEFT keys, Diffusers'
``pytorch_lora_weights.safetensors``) into the kohya layout that AUTOMATIC1111, ComfyUI, SD.Next and InvokeAI read:
``lora_unet_<module path with _>.lora_down.weight`` / ``.lora_up.weight`` and a scalar ``.alpha`` per module. The
key renaming is Diffusers' own ``convert_state_dict_to_kohya``; what it gets wrong for us is the alpha (it writes
the rank, i.e. scale 1), so the exported ``.alpha`` is the LoRA's trained alpha. The module paths are Diffusers' UNet
names, which kohya's SD 1.x/2.x LoRAs use too and which ComfyUI (``unet_to_diffusers``) and A1111 translate for SDXL;
Diffusers loads the file with ``pipe.load_lora_weights(FILE)`` (its kohya path, tested to give the images of the
PEFT file).

The file's metadata carries kohya's ``ss_*`` fields, the model-spec architecture and the sampling recipe
(``stepdistill_recipe``), so ``stepdistill.load(pipe, FILE)`` restores the scheduler too and refuses a pipeline of
another base family.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .errors import StepdistillError
from .lora import LORA_WEIGHTS_NAME

FAMILIES = ("sd1", "sd2", "sdxl")
# kohya's ss_base_model_version and the model spec's architecture for each family
_KOHYA_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
_ARCHITECTURE = {"sd1": "stable-diffusion-v1/lora", "sd2": "stable-diffusion-v2/lora",
                 "sdxl": "stable-diffusion-xl-v1-base/lora"}
_FAMILY_NAMES = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
KOHYA_FILE_NAME = "kohya_lora.safetensors"  # what --export kohya writes beside the Diffusers file


def family_of_configs(pipeline_class: str, unet_config: dict, scheduler_config: dict | None = None) -> str:
    """sd1, sd2 or sdxl from a pipeline's configs: SDXL by its pipeline class (or the UNet's text_time embedding),
    SD 2.x by its OpenCLIP-H cross-attention width (1024) or v-prediction, else SD 1.x."""
    if "XL" in pipeline_class or unet_config.get("addition_embed_type") == "text_time":
        return "sdxl"
    if unet_config.get("cross_attention_dim") == 1024 or (scheduler_config or {}).get("prediction_type") == \
            "v_prediction":
        return "sd2"
    return "sd1"


def pipeline_family(pipe) -> str:
    return family_of_configs(type(pipe).__name__, dict(pipe.unet.config), dict(pipe.scheduler.config))


def base_model_family(base_model: str) -> str | None:
    """The family of a base model (folder or hub id, configs only: nothing is downloaded offline), or None when
    its configs cannot be read."""
    from diffusers import DDIMScheduler, DiffusionPipeline, UNet2DConditionModel

    try:
        index = DiffusionPipeline.load_config(base_model)
        unet = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    except Exception:  # not a folder, not in the hub cache offline, not a pipeline: the caller decides
        return None
    try:
        scheduler = DDIMScheduler.load_config(base_model, subfolder="scheduler")
    except Exception:  # no readable scheduler config: the UNet decides
        scheduler = {}
    return family_of_configs(index.get("_class_name", ""), unet, scheduler)


def _family_from_weights(state: dict[str, torch.Tensor]) -> str | None:
    """The family from the widths of the cross-attention keys (real models only: 768 SD 1.x, 1024 SD 2.x,
    2048 SDXL)."""
    widths = {v.shape[1] for k, v in state.items() if ".attn2.to_k." in k and "lora_A" in k}
    return {768: "sd1", 1024: "sd2", 2048: "sdxl"}.get(next(iter(widths), None)) if len(widths) == 1 else None


def _lora_config(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
    raw = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    return {k.split(".", 1)[1]: v for k, v in raw.items() if k.startswith("unet.")}


def to_kohya(output_dir: str | Path, output: str | Path, base_family: str | None = None) -> Path:
    """Write the LoRA of the stepdistill output ``output_dir`` as one kohya-format safetensors file ``output``
    (written to a temporary name, then renamed). ``base_family`` (sd1/sd2/sdxl) defaults to the base model's and,
    when given, must agree with it."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    from .recipe import Recipe

    output_dir, output = Path(output_dir), Path(output)
    recipe = Recipe.load(output_dir)
    if recipe.adapter != "lora":
        what = {"full_unet": "a full UNet (unet/): kohya files hold LoRAs; load it with "
                             "UNet2DConditionModel.from_pretrained(DIR, subfolder='unet'), or train with "
                             "--use_lora true to get an exportable LoRA",
                "agd": "AGD guidance adapters, which are not LoRA layers; load them with stepdistill.load(pipe, DIR)",
                "msd": "K students and a router; export one student's LoRA instead: stepdistill export "
                       f"{output_dir}/students/0 ..."}.get(recipe.adapter, f"a {recipe.adapter} output")
        raise StepdistillError(f"{output_dir}: cannot export {what}")
    if output.suffix != ".safetensors":
        raise StepdistillError(f"--output {output}: a kohya LoRA is one .safetensors file; name it FILE.safetensors")
    if base_family is not None and base_family not in FAMILIES:
        raise StepdistillError(f"--base_family {base_family}: expected one of {', '.join(FAMILIES)}")
    weights = output_dir / LORA_WEIGHTS_NAME
    if not weights.is_file():
        raise StepdistillError(f"{output_dir}: recipe says LoRA but {LORA_WEIGHTS_NAME} is missing")
    state = load_file(str(weights))
    config = _lora_config(weights)
    if config.get("rank_pattern") or config.get("alpha_pattern") or config.get("use_rslora") or config.get("use_dora"):
        raise StepdistillError(f"{weights}: per-module ranks/alphas, rsLoRA or DoRA have no kohya alpha of one "
                               "meaning; export a plain LoRA")
    detected = base_model_family(recipe.base_model) or _family_from_weights(state)
    if base_family and detected and base_family != detected:
        raise StepdistillError(f"--base_family {base_family}: {output_dir} is a LoRA of {recipe.base_model}, an "
                               f"{_FAMILY_NAMES[detected]} model; drop --base_family or pass {detected}")
    family = base_family or detected
    if family is None:
        raise StepdistillError(f"cannot read the configs of {recipe.base_model} (the base model of {output_dir}) "
                               "to tell its family; pass --base_family sd1|sd2|sdxl")
    rank = int(config.get("r") or next(v.shape[0] for k, v in state.items() if "lora_A" in k))
    alpha = float(config.get("lora_alpha") or rank)
    kohya = convert_state_dict_to_kohya(state)
    # Diffusers writes alpha = rank (scale 1); the trained scale is alpha / rank
    kohya = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v.contiguous()) for k, v in kohya.items()}
    metadata = {
        "ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha),
        "ss_base_model_version": _KOHYA_VERSION[family], "ss_v2": str(family == "sd2"),
        "modelspec.architecture": _ARCHITECTURE[family], "modelspec.title": f"{recipe.method} LoRA",
        "stepdistill_family": family, "stepdistill_recipe": json.dumps(dataclasses.asdict(recipe)),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".partial")
    save_file(kohya, str(tmp), metadata=metadata)
    tmp.replace(output)
    return output


def read_kohya_metadata(path: str | Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def load_kohya(pipe, path: str | Path, adapter_name: str = "stepdistill"):
    """Apply an exported kohya file (this module's) to ``pipe``: checks the base family, loads through Diffusers'
    kohya path and sets the recipe's scheduler. Returns the pipeline and the recipe."""
    from .recipe import Recipe

    path = Path(path)
    meta = read_kohya_metadata(path)
    family, have = meta.get("stepdistill_family"), pipeline_family(pipe)
    if family and family != have:
        raise StepdistillError(f"{path} is a LoRA for {_FAMILY_NAMES.get(family, family)} but this is an "
                               f"{_FAMILY_NAMES[have]} pipeline ({type(pipe).__name__}); load it into a pipeline of "
                               "its base model")
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    recipe = Recipe(**json.loads(meta["stepdistill_recipe"])) if "stepdistill_recipe" in meta else None
    if recipe is not None:
        pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    return pipe, recipe
