"""The output contract every method shares: ``stepdistill.json`` (the sampling recipe) beside the weights, and
``load(pipe, output_dir)`` that applies any stepdistill output to a stock Diffusers pipeline. What each adapter
kind writes and how it loads lives in ``outputs.py``."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import StepdistillError
from .lora import LORA_WEIGHTS_NAME  # noqa: F401  (re-exported)
from .outputs import output_kind, pipeline_call_kwargs  # noqa: F401  (pipeline_call_kwargs: re-exported)

RECIPE_NAME = "stepdistill.json"


@dataclass
class Recipe:
    """How to sample a student: which weights to apply and which stock scheduler and call arguments to use."""

    method: str
    base_model: str
    adapter: str  # a registered output kind (stepdistill.outputs), e.g. "lora", "full_unet"
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
        try:
            output_kind(recipe.adapter)
        except StepdistillError as e:
            raise StepdistillError(f"{path}: {e}") from None
        return recipe

    def call_kwargs(self) -> dict[str, Any]:
        """Arguments for ``pipe(prompt, **recipe.call_kwargs())``, as the recipe's output kind calls it."""
        return output_kind(self.adapter).call_kwargs(self)

    def make_scheduler(self, base_config):
        import diffusers

        cls = getattr(diffusers, self.scheduler, None)
        if cls is None:
            raise StepdistillError(f"recipe names scheduler {self.scheduler!r}, which this diffusers does not have")
        return cls.from_config(base_config, **self.scheduler_kwargs)


def load(pipe, output_dir: str | Path, adapter_name: str = "stepdistill"):
    """Apply a stepdistill output (weights + the recipe's scheduler) to ``pipe`` and return it. ``output_dir`` may
    also be a single-file export (``stepdistill export DIR --format kohya``).

    Call the result with ``pipe(prompt, **stepdistill.Recipe.load(output_dir).call_kwargs())``.
    """
    output_dir = Path(output_dir)
    if output_dir.is_file() and output_dir.suffix == ".safetensors":  # a single-file (kohya) export
        from .export import load_kohya

        return load_kohya(pipe, output_dir, adapter_name)[0]
    recipe = Recipe.load(output_dir)
    pipe = output_kind(recipe.adapter).load(pipe, output_dir, recipe, adapter_name)
    pipe.scheduler = recipe.make_scheduler(pipe.scheduler.config)
    return pipe
