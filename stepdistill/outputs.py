"""The output contract, one entry per adapter kind: how a student's weights are written, how they are applied to a
stock pipeline, what the model card tells a user to type, and how the pipeline is called.

``stepdistill.load``, the model card, :func:`save_output` and the evaluation look the kind up here
(``output_kind(recipe.adapter)``), so no shared code branches on the adapter. A new kind (AGD's adapters, MSD's
students) is one :class:`OutputKind` subclass and one :func:`register_output` call.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import StepdistillError
from .lora import LORA_WEIGHTS_NAME, save_lora

if TYPE_CHECKING:  # recipe.py imports this module
    from .recipe import Recipe

UNET_DIR = "unet"


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


class OutputKind:
    """What one adapter kind (``Recipe.adapter``) means for the files of an output and for sampling it."""

    name: str

    def save(self, student, output_dir: Path, pipeline_class) -> None:
        """Write the weights of ``student`` (the UNet that samples) into ``output_dir``; nothing else."""
        raise NotImplementedError

    def load(self, pipe, output_dir: Path, recipe: "Recipe", adapter_name: str):
        """Apply the weights in ``output_dir`` to ``pipe`` and return it (the scheduler is the caller's)."""
        raise NotImplementedError

    def card_load_lines(self, recipe: "Recipe") -> str:
        """The model card's line(s) that apply the weights to ``pipe`` from ``student_dir``, the stock way."""
        raise NotImplementedError

    def call_kwargs(self, recipe: "Recipe") -> dict[str, Any]:
        """Arguments for ``pipe(prompt, **kwargs)``."""
        return pipeline_call_kwargs(recipe.guidance_scale, recipe.num_inference_steps, recipe.timesteps, recipe.eta)

    def unet_evals_per_step(self, recipe: "Recipe") -> int:
        """UNet evaluations per image and sampling step before classifier-free guidance (a pipeline that runs CFG,
        guidance_scale > 1 without a guidance embedding, doubles it)."""
        return 1

    @staticmethod
    def _require(output_dir: Path, name: str, what: str) -> None:
        if not (Path(output_dir) / name).exists():
            raise StepdistillError(f"{output_dir}: recipe says {what} but {name} is missing")


class LoraOutput(OutputKind):
    """A LoRA on the base UNet in Diffusers' format: ``pipe.load_lora_weights(dir)``."""

    name = "lora"

    def save(self, student, output_dir, pipeline_class):
        save_lora(student, output_dir, pipeline_class)

    def load(self, pipe, output_dir, recipe, adapter_name):
        self._require(output_dir, LORA_WEIGHTS_NAME, "LoRA")
        pipe.load_lora_weights(output_dir, adapter_name=adapter_name)
        return pipe

    def card_load_lines(self, recipe):
        return "pipe.load_lora_weights(student_dir)"


class FullUNetOutput(OutputKind):
    """A whole UNet (``unet/``, safetensors) that replaces the pipeline's."""

    name = "full_unet"

    def save(self, student, output_dir, pipeline_class):
        student.save_pretrained(Path(output_dir) / UNET_DIR, safe_serialization=True)

    def load(self, pipe, output_dir, recipe, adapter_name):
        from diffusers import UNet2DConditionModel

        self._require(output_dir, f"{UNET_DIR}/", "full UNet")
        # stepdistill writes safetensors; a pickle unet/ is not ours and is not loaded
        unet = UNet2DConditionModel.from_pretrained(Path(output_dir) / UNET_DIR, torch_dtype=pipe.unet.dtype,
                                                    use_safetensors=True)
        pipe.unet = unet.to(pipe.unet.device)
        return pipe

    def card_load_lines(self, recipe):
        return f"pipe.unet = UNet2DConditionModel.from_pretrained(student_dir, subfolder='{UNET_DIR}')"


_KINDS: dict[str, OutputKind] = {}


def register_output(kind: OutputKind) -> None:
    """Make ``kind`` the meaning of ``Recipe.adapter == kind.name`` (a later registration replaces an earlier)."""
    _KINDS[kind.name] = kind


def known_kinds() -> tuple[str, ...]:
    return tuple(_KINDS)


def output_kind(name: str) -> OutputKind:
    """The registered kind called ``name`` (an error naming the known kinds otherwise)."""
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise StepdistillError(f"unknown adapter {name!r}; expected one of {', '.join(_KINDS)}") from None


class AGDOutput(OutputKind):
    """AGD's guidance adapters: weights keyed by the UNet module path they adapt, plus their config. Loading hooks
    them onto the pipeline's UNet and switches the pipeline to one UNet evaluation per step (the adapters get w)."""

    name = "agd"
    WEIGHTS, CONFIG = "agd_adapters.safetensors", "agd_config.json"

    def save(self, student, output_dir, pipeline_class):
        from safetensors.torch import save_file

        config = {"hidden_dim": student.hidden_dim, "mlp_ratio": student.mlp_ratio,
                  "guidance_range": list(student.guidance_range or ()), "signature": student.signature}
        save_file(student.state_dict_by_path(), str(Path(output_dir) / self.WEIGHTS),
                  metadata={"format": "pt", "agd_config": json.dumps(config)})
        (Path(output_dir) / self.CONFIG).write_text(json.dumps(config, indent=2) + "\n")

    def load(self, pipe, output_dir, recipe, adapter_name):
        from safetensors.torch import load_file

        from .agd.adapters import AGDAdapters, adapter_layout

        self._require(output_dir, self.WEIGHTS, "AGD adapters")
        config = json.loads((Path(output_dir) / self.CONFIG).read_text())
        if adapter_layout(pipe.unet) != config["signature"]:
            raise StepdistillError(f"{output_dir}: AGD adapters trained for {recipe.base_model} do not fit the UNet "
                                   f"of {pipe.name_or_path or type(pipe).__name__} (other cross-attention layout or "
                                   "widths); load them into a pipeline of the same base model")
        unet = pipe.unet
        adapters = AGDAdapters(unet, config["hidden_dim"], config["mlp_ratio"], config["guidance_range"] or None)
        adapters.load_state_dict_by_path(load_file(str(Path(output_dir) / self.WEIGHTS)))
        adapters.to(device=unet.device, dtype=unet.dtype).enable_pipeline_mode()
        pipe.agd_adapters = adapters  # stepdistill.agd.disable(pipe) removes them
        return pipe

    def card_load_lines(self, recipe):
        return ("import stepdistill  # AGD adapters attach through stepdistill's hooks\n"
                "pipe = stepdistill.load(pipe, student_dir)  # then pipe(prompt, guidance_scale=w): one UNet pass per step")


class MSDOutput(OutputKind):
    """K students (each a stepdistill LoRA or full-UNet output, ``students/k``) and the router: ``stepdistill.load``
    returns a pipeline that routes every prompt of a call to its student (``stepdistill.msd.routed``). ``msd.json``
    names the students' folders relative to the output (a snapshot's point into the students' snapshots)."""

    name = "msd"
    INDEX = "msd.json"

    def save(self, student, output_dir, pipeline_class):
        import os

        dirs = [Path(os.path.relpath(Path(d).resolve(), Path(output_dir).resolve())).as_posix()
                for d in student.student_dirs]
        if len(dirs) != student.router.num_students:
            raise StepdistillError(f"{len(dirs)} students for a router of {student.router.num_students}")
        student.router.save(output_dir)
        (Path(output_dir) / self.INDEX).write_text(json.dumps({"students": dirs}, indent=1) + "\n")

    def load(self, pipe, output_dir, recipe, adapter_name):
        from .msd.partition import Router
        from .msd.routed import RoutedPipeline
        from .recipe import Recipe

        self._require(output_dir, self.INDEX, "MSD students")
        dirs = [Path(output_dir) / d for d in json.loads((Path(output_dir) / self.INDEX).read_text())["students"]]
        router = Router.load(output_dir)
        if router.num_students != len(dirs):
            raise StepdistillError(f"{output_dir}: the router routes to {router.num_students} students but "
                                   f"{len(dirs)} are on disk; the output is incomplete or mixed up")
        students = [Recipe.load(d) for d in dirs]
        for k, (d, student) in enumerate(zip(dirs, students)):
            if student.base_model != recipe.base_model:
                raise StepdistillError(f"{d}: student {k} was trained from {student.base_model}, the others from "
                                       f"{recipe.base_model}; all students of an MSD output share one base model")
            if student.adapter not in ("lora", "full_unet") or student.adapter != students[0].adapter:
                raise StepdistillError(f"{d}: student {k} is a {student.adapter} output, student 0 a "
                                       f"{students[0].adapter} one; routed loading takes K LoRA or K full-UNet "
                                       "students")
        if students[0].adapter == "full_unet":  # each student its own UNet, swapped in per group of prompts
            from diffusers import UNet2DConditionModel

            unets = [UNet2DConditionModel.from_pretrained(d / UNET_DIR, torch_dtype=pipe.unet.dtype, use_safetensors=True)
                     .to(pipe.unet.device) for d in dirs]
            return RoutedPipeline(pipe, router, unets=unets)
        names = [f"{adapter_name}_student_{k}" for k in range(len(dirs))]
        for d, student, name in zip(dirs, students, names):
            with warnings.catch_warnings():  # K adapters on one UNet is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                output_kind("lora").load(pipe, d, student, name)
        return RoutedPipeline(pipe, router, names)

    def card_load_lines(self, recipe):
        return ("import stepdistill  # routes each prompt to its student\n"
                "pipe = stepdistill.load(pipe, student_dir)")


for _kind in (LoraOutput(), FullUNetOutput(), AGDOutput(), MSDOutput()):
    register_output(_kind)


def save_output(student, output_dir: str | Path, recipe: "Recipe", pipeline_class) -> None:
    """A complete output: the weights (as the recipe's adapter kind writes them), ``stepdistill.json`` and the
    model card ``README.md`` (showing the newest validation grid in ``samples/``, if any). ``pipeline_class`` is
    the base pipeline's class (it writes LoRA files)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    output_kind(recipe.adapter).save(student, output_dir, pipeline_class)
    recipe.save(output_dir)
    grids = sorted((output_dir / "samples").glob("step-*.png"))
    grid = grids[-1].relative_to(output_dir).as_posix() if grids else None
    (output_dir / "README.md").write_text(model_card(recipe, pipeline_class.__name__, sample_grid=grid))


def hub_id(base_model: str) -> str | None:
    """The hub id of a base model: the id itself, the repository of a hub-cache snapshot folder, or None for a
    local folder (it has none)."""
    import re

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(base_model)
    if path.exists():
        match = re.search(r"models--([^/]+)--([^/]+)/snapshots/", path.resolve().as_posix() + "/")
        return f"{match[1]}/{match[2]}" if match else None
    try:
        validate_repo_id(base_model)
    except HFValidationError:
        return None
    return base_model


FAMILY_TAGS = {"sd1": "stable-diffusion", "sd2": "stable-diffusion", "sdxl": "stable-diffusion-xl"}


def card_metadata(recipe: "Recipe", pipeline_class_name: str) -> dict[str, Any]:
    """The card's YAML header as the Hub reads it: base_model (a hub id, left out for a local folder), library,
    pipeline tag, and tags (lora for LoRA outputs, diffusers, text-to-image, the base family, the method)."""
    import logging

    tags = (["lora"] if recipe.adapter == "lora" else []) + [
        "diffusers", "text-to-image", FAMILY_TAGS["sdxl" if "XL" in pipeline_class_name else "sd1"], recipe.method,
        "stepdistill"]
    meta: dict[str, Any] = {"library_name": "diffusers", "pipeline_tag": "text-to-image", "tags": tags}
    base = hub_id(recipe.base_model)
    if base is None:
        logging.getLogger("stepdistill").warning(
            "model card: base model %s is a local folder without a hub id; base_model is left out of the card "
            "(train from the hub id to have it)", recipe.base_model)
    else:
        meta = {"base_model": base, **meta}
    return meta


def _recipe_in_words(recipe: "Recipe") -> str:
    steps = f"timesteps {list(recipe.timesteps)}" if recipe.timesteps else f"{recipe.num_inference_steps} steps"
    kwargs = ", ".join(f"{k}={v!r}" for k, v in recipe.scheduler_kwargs.items())
    words = [f"- scheduler: `{recipe.scheduler}`" + (f" ({kwargs})" if kwargs else ""), f"- {steps}",
             f"- guidance scale {recipe.guidance_scale}" + (" (guidance is distilled in: no CFG pass)"
                                                           if recipe.guidance_scale == 1.0 else "")]
    if recipe.eta is not None:
        words.append(f"- eta {recipe.eta}")
    notes = [recipe.extra.get("note"), (recipe.extra.get("one_step") or {}).get("note")]
    words += [f"- note: {n}" for n in notes if n]
    return "\n".join(words)


def model_card(recipe: "Recipe", pipeline_class_name: str, sample_grid: str | None = None) -> str:
    """The output's ``README.md``: Hub metadata, the sampling recipe in words, the sample grid, and the stock
    Diffusers code that samples it."""
    import yaml

    kind = output_kind(recipe.adapter)
    call = ", ".join(f"{k}={v!r}" for k, v in kind.call_kwargs(recipe).items())
    kwargs = "".join(f", {k}={v!r}" for k, v in recipe.scheduler_kwargs.items())
    header = yaml.safe_dump(card_metadata(recipe, pipeline_class_name), sort_keys=False)
    grid = f"\n![validation samples]({sample_grid})\n" if sample_grid else ""
    return f"""---
{header}---
# {recipe.method} student of `{recipe.base_model}`

Trained with stepdistill ({recipe.method}). Sampling recipe
(`stepdistill.json`):

{_recipe_in_words(recipe)}
{grid}
```python
import torch
from diffusers import {pipeline_class_name}, {recipe.scheduler}, UNet2DConditionModel

student_dir = "path/to/this/folder"
pipe = {pipeline_class_name}.from_pretrained("{recipe.base_model}")
{kind.card_load_lines(recipe)}
pipe.scheduler = {recipe.scheduler}.from_config(pipe.scheduler.config{kwargs})
image = pipe("a prompt", {call}).images[0]
```

or, with stepdistill installed: `pipe = stepdistill.load(pipe, student_dir)`.
"""
