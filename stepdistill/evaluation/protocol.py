"""What makes an evaluation's numbers comparable, recorded beside them: the generation fingerprint a resume must
match (``generation.json``) and the protocol in ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..recipe import Recipe
from .images import IMAGES_DIR
from .pipeline import SamplerSettings
from .registry import Metric, metrics

GENERATION_NAME = "generation.json"
METRICS_NAME = "metrics.json"
SEEDING = "image i uses torch.Generator().manual_seed(seed + i); batches are fixed index ranges of batch_size"
CFG = "Diffusers convention eps_u + w (eps_c - eps_u); on when w > 1 and the UNet is not guidance-conditioned"
TIMING = ("wall clock of the pipeline calls (prompt encoding, UNet, scheduler, VAE decode; not PNG writing) over "
          "every run that generated images for this directory, summed over its processes (so per process)")


def json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def versions() -> dict:
    import diffusers
    import torchmetrics
    import transformers

    from .. import __version__

    return {"stepdistill": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torchmetrics": torchmetrics.__version__}


def read_generation(output_dir: Path) -> dict | None:
    path = output_dir / GENERATION_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def fingerprint(args, base_model: str, is_folder: bool, pipe, call_kwargs: dict, prompts_sha256: str) -> dict:
    """Everything that decides the images: a resume must find the same."""
    return json_safe({
        "model": str(Path(base_model).resolve()) if is_folder else base_model,
        "student": str(Path(args.student).resolve()) if args.student else None,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "call_kwargs": call_kwargs, "seed": args.seed, "dtype": args.dtype, "prompts_sha256": prompts_sha256,
    })


def protocol_record(args, *, num_images: int, prompt_info: dict, scorers: dict[str, Metric], fingerprint: dict,
                    recipe: Recipe | None, settings: SamplerSettings, state: dict, call_kwargs: dict, device: str,
                    output_dir: Path, grid: Path) -> dict:
    """``metrics.json``'s protocol: every registered metric's entries (None for those not run), then the model,
    sampler, seeding, timing and versions."""
    entries: dict[str, Any] = {}
    for name, spec in metrics().items():
        given = scorers[name].protocol() if name in scorers else {}
        for key in spec.protocol_keys:  # metrics may share keys (fid and kid): one that did not run sets none
            if name in scorers or key not in entries:
                entries[key] = given.get(key)
    return json_safe({
        "num_images": num_images,
        "prompts": prompt_info,
        **entries,
        "model": fingerprint["model"], "student": fingerprint["student"],
        "method": recipe.method if recipe else None, "adapter": recipe.adapter if recipe else None,
        "recipe_extra": recipe.extra if recipe else None,
        "scheduler": fingerprint["scheduler"], "scheduler_config": fingerprint["scheduler_config"],
        "num_inference_steps": len(state["timesteps"] or []), "timesteps": state["timesteps"],
        "guidance_scale": settings.guidance_scale, "eta": settings.eta,
        "cfg": CFG,
        "nfe_per_image": state["unet_samples"] / max(state["generated_images"], 1),
        "seconds_per_image": state["generation_seconds"] / max(state["generated_images"], 1),
        "timing": TIMING,
        # the processes of the (last) run that generated images; every image is the same whatever their number
        "num_processes": state.get("num_processes", 1),
        "resolution": [call_kwargs["height"], call_kwargs["width"]], "seed": args.seed, "seeding": SEEDING,
        "batch_size": args.batch_size, "device": device, "dtype": args.dtype,
        "images": str((output_dir / IMAGES_DIR).resolve()), "grid": str(grid.resolve()),
        "versions": versions(),
    })
