"""The output contract every method shares: ``stepdistill.json`` (the sampling recipe) beside the weights, and
``load(pipe, output_dir)`` that applies any stepdistill output to a stock Diffusers pipeline."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import StepdistillError

RECIPE_NAME = "stepdistill.json"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
ADAPTERS = ("lora", "full_unet", "agd", "msd")


@dataclass
class Recipe:
    """How to sample a student: which weights to apply and which stock scheduler and call arguments to use."""

    method: str
    base_model: str
    adapter: str  # one of ADAPTERS
    scheduler: str  # a Diffusers scheduler class name
    scheduler_kwargs: dict = field(default_factory=dict)
    num_inference_steps: int = 4
    timesteps: list[int] | None = None
    guidance_scale: float = 1.0
    eta: float | None = None
    extra: dict = field(default_factory=dict)  # method-specific settings (e.g. latent scaling for SiD)
    format_version: int = 1

    def save(self, output_dir: str | Path) -> Path:
        path = Path(output_dir) / RECIPE_NAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, output_dir: str | Path) -> "Recipe":
        path = Path(output_dir) / RECIPE_NAME
        if not path.is_file():
            raise StepdistillError(f"{output_dir} is not a stepdistill output (no {RECIPE_NAME}); pass the "
                                   "--output_dir of a train_scripts/train_<method>.py run")
        try:
            raw = json.loads(path.read_text())
            recipe = cls(**raw)
        except (json.JSONDecodeError, TypeError) as e:
            raise StepdistillError(f"{path}: not a valid stepdistill recipe ({e})") from e
        if recipe.adapter not in ADAPTERS:
            raise StepdistillError(f"{path}: unknown adapter {recipe.adapter!r}; expected one of {ADAPTERS}")
        return recipe

    def call_kwargs(self) -> dict[str, Any]:
        """Arguments for ``pipe(prompt, **recipe.call_kwargs())``."""
        return pipeline_call_kwargs(self.guidance_scale, self.num_inference_steps, self.timesteps, self.eta)

    def make_scheduler(self, base_config):
        import diffusers

        cls = getattr(diffusers, self.scheduler, None)
        if cls is None:
            raise StepdistillError(f"recipe names scheduler {self.scheduler!r}, which this diffusers does not have")
        return cls.from_config(base_config, **self.scheduler_kwargs)


def pipeline_call_kwargs(guidance_scale: float, num_inference_steps: int | None, timesteps: list[int] | None,
                         eta: float | None) -> dict[str, Any]:
    """Pipeline call arguments for a sampling setting: explicit timesteps win over a step count; eta only when
    set (pipelines default it to 0)."""
    kwargs: dict[str, Any] = {"guidance_scale": guidance_scale}
    if timesteps:
        kwargs["timesteps"] = list(timesteps)
    else:
        kwargs["num_inference_steps"] = num_inference_steps
    if eta is not None:
        kwargs["eta"] = eta
    return kwargs


def load(pipe, output_dir: str | Path, adapter_name: str = "stepdistill"):
    """Apply a stepdistill output (weights + the recipe's scheduler) to ``pipe`` and return it.

    Call the result with ``pipe(prompt, **stepdistill.Recipe.load(output_dir).call_kwargs())``.
    """
    output_dir = Path(output_dir)
    recipe = Recipe.load(output_dir)
    if recipe.adapter == "lora":
        if not (output_dir / LORA_WEIGHTS_NAME).is_file():
            raise StepdistillError(f"{output_dir}: recipe says LoRA but {LORA_WEIGHTS_NAME} is missing")
        pipe.load_lora_weights(output_dir, adapter_name=adapter_name)
    elif recipe.adapter == "full_unet":
        from diffusers import UNet2DConditionModel

        if not (output_dir / "unet").is_dir():
            raise StepdistillError(f"{output_dir}: recipe says full UNet but unet/ is missing")
        pipe.unet = UNet2DConditionModel.from_pretrained(output_dir / "unet", torch_dtype=pipe.unet.dtype).to(
            pipe.unet.device)
    else:
        raise StepdistillError(f"{output_dir}: adapter {recipe.adapter!r} is not loadable by this version yet")
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    return pipe
