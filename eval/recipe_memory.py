"""What each SD 1.5 / SDXL recipe holds on one GPU before activations: the networks as the recipe builds them (built
from the committed public configs on the meta device, no weights read), their bytes under bf16/fp16 mixed precision
(frozen networks in half precision; every trainable parameter float32 with its gradient and AdamW's two moments, 16
bytes; EMA copies float32), and the per-GPU batch the recipe asks for.

    python eval/recipe_memory.py train_scripts/configs/sd15/*.yaml train_scripts/configs/sdxl/*.yaml

Activations are not counted here: they scale with the per-GPU batch and fall several-fold under
--gradient_checkpointing (every recipe turns it on); README's "Real models" section has measured ones.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dm_params import account, from_config, numel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURES = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15", "stabilityai/stable-diffusion-xl-base-1.0": "sdxl"}
HALF, FP32, TRAINED = 2, 4, 16  # bytes per parameter: frozen half precision, an EMA copy, a trainable one (AdamW)


def _config(model: str, part: str) -> dict:
    return json.loads((REPO / "assets" / "real_configs" / model / part / "config.json").read_text())


def text_and_vae_params(model: str) -> int:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    total = 0
    with init_empty_weights():
        total += numel(AutoencoderKL.from_config(_config(model, "vae")).parameters())
        for part in ("text_encoder", "text_encoder_2") if model == "sdxl" else ("text_encoder",):
            c = {k: v for k, v in _config(model, part).items() if not k.startswith("_") and k != "architectures"}
            total += numel(CLIPTextModel(CLIPTextConfig(**c)).parameters())
    return total


def lora_params(unet_config: dict, rank: int) -> int:
    from stepdistill.lora import add_lora

    unet = from_config(unet_config)
    add_lora(unet, rank)
    return numel(p for n, p in unet.named_parameters() if "lora_" in n)


def holdings(recipe: dict, method: str, model: str) -> dict:
    """Parameter counts by role: frozen (half precision), trainable (AdamW, float32), ema (float32)."""
    unet_config = _config(model, "unet")
    resolution = recipe.get("resolution") or (1024 if model == "sdxl" else 512)
    base = numel(from_config(unet_config).parameters())
    lora = recipe.get("use_lora", method in ("lcm", "tscd"))
    rank = recipe.get("lora_rank", 64)
    held = {"frozen": base, "trainable": 0, "ema": 0}
    if method in ("lcm", "tscd"):
        if lora:
            held["trainable"] = lora_params(unet_config, rank)
        else:  # a full student (LCM: with the guidance embedding) and its EMA target beside the frozen teacher
            student = from_config(dict(unet_config, time_cond_proj_dim=recipe.get("time_cond_proj_dim", 256)))
            held["trainable"] = held["ema"] = numel(student.parameters())
        if recipe.get("adversarial_weight"):
            from stepdistill.methods.networks import GANHead

            held["trainable"] += numel(GANHead.for_unet(from_config(unet_config), resolution // 8).parameters())
    elif method in ("dmd2", "sid"):
        fake_rank = recipe.get("fake_score_lora_rank")
        a = account(lambda: from_config(unet_config), resolution // 8, "LoRA" if lora else "full",
                    "LoRA" if fake_rank else "full copy", rank, fake_rank or rank, bool(recipe.get("gan")))
        held["trainable"] = sum(a["trainable"].values())
        if recipe.get("generator_ema_decay"):
            held["ema"] = a["trainable"]["generator"]
    elif method == "agd":
        from stepdistill.agd.adapters import AGDAdapters

        adapters = AGDAdapters(from_config(unet_config), recipe.get("hidden_dim", 320))
        held["trainable"] = numel(adapters.parameters())
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", type=Path)
    args = parser.parse_args()
    print("| recipe | method | trainable (M) | frozen UNet (M) | EMA (M) | UNets + text encoders + VAE, GB | "
          "per-GPU batch (x accumulation) |")
    print("|---|---|---|---|---|---|---|")
    for path in args.recipes:
        recipe = yaml.safe_load(path.read_text())
        method = recipe.get("method", {"lcm_lora": "lcm"}.get(path.stem, path.stem.split("_")[0]))
        if method == "msd":  # K students of its student_method, one at a time
            method = recipe.get("student_method", "dmd2")
        model = FIXTURES[recipe["pretrained_model_name_or_path"]]
        held = holdings(recipe, method, model)
        other = text_and_vae_params(model)
        gb = (held["frozen"] * HALF + held["trainable"] * TRAINED + held["ema"] * FP32 + other * HALF) / 1e9
        batch = f"{recipe.get('train_batch_size', 16)}"
        if recipe.get("gradient_accumulation_steps", 1) > 1:
            batch += f" (x {recipe['gradient_accumulation_steps']})"
        name = f"{path.parent.name}/{path.name}" + (f" (K = {recipe['num_students']}, one at a time)"
                                                    if recipe.get("num_students") else "")
        print(f"| {name} | {method} | {held['trainable'] / 1e6:.1f} | {held['frozen'] / 1e6:.0f} | "
              f"{held['ema'] / 1e6:.0f} | {gb:.1f} | {batch} |")


if __name__ == "__main__":
    main()
