"""The pipeline an evaluation samples with: the student's recipe merged with explicit flags, the scheduler, the
loaded pipeline and the arguments every call gets."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..errors import StepdistillError
from ..recipe import Recipe, pipeline_call_kwargs
from ..teacher import check_supported

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_timesteps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError as e:
        raise StepdistillError(f"--timesteps {text}: expected comma-separated integers, e.g. 999,759,499,259") from e
    if not values:
        raise StepdistillError(f"--timesteps {text!r}: no timesteps given")
    return values


def scheduler_class(name: str):
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise StepdistillError(f"--scheduler {name}: not a Diffusers scheduler class (e.g. DDIMScheduler, "
                               "LCMScheduler, EulerDiscreteScheduler)")
    return cls


@dataclass
class SamplerSettings:
    """The sampling recipe after merging the student's stepdistill.json with explicit flags."""

    scheduler: str | None
    num_inference_steps: int | None
    timesteps: list[int] | None
    guidance_scale: float
    eta: float | None

    def call_kwargs(self) -> dict:
        return pipeline_call_kwargs(self.guidance_scale, self.num_inference_steps, self.timesteps, self.eta)


def sampler_settings(args, recipe: Recipe | None) -> SamplerSettings:
    timesteps = parse_timesteps(args.timesteps)
    steps = args.num_inference_steps
    if recipe is not None:
        if timesteps is None and steps is None:  # an explicit step count replaces the recipe's timesteps
            timesteps = list(recipe.timesteps) if recipe.timesteps else None
            steps = recipe.num_inference_steps
        guidance = recipe.guidance_scale if args.guidance_scale is None else args.guidance_scale
        eta = recipe.eta if args.eta is None else args.eta
    else:
        guidance = 7.5 if args.guidance_scale is None else args.guidance_scale  # Stable Diffusion's default
        eta = args.eta
    if steps is None and timesteps is None:
        steps = 25
    if steps is not None and steps < 1:
        raise StepdistillError(f"--num_inference_steps {steps}: must be at least 1")
    return SamplerSettings(args.scheduler, steps, timesteps, float(guidance), eta)


def device_name(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def load_pipeline(base_model: str, dtype: torch.dtype, device: str, allow_pickle: bool = False):
    from diffusers import DiffusionPipeline

    from ..safe_weights import check_no_pickle, load_kwargs

    check_no_pickle(base_model, allow_pickle)
    try:
        pipe = DiffusionPipeline.from_pretrained(base_model, dtype=dtype, **load_kwargs(allow_pickle))
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepdistillError(f"--pretrained_model_name_or_path {base_model}: cannot load the pipeline "
                               f"({first_line})") from e
    check_supported(type(pipe).__name__, base_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prepare_pipeline(args, base_model: str, recipe: Recipe | None, settings: SamplerSettings, device: str):
    """The pipeline with the student and scheduler applied, and the arguments every call gets."""
    scheduler_cls = scheduler_class(settings.scheduler) if settings.scheduler else None
    pipe = load_pipeline(base_model, DTYPES[args.dtype], device, getattr(args, "allow_pickle", False))
    if recipe is not None:
        from ..recipe import load as apply_student

        apply_student(pipe, args.student)
    if scheduler_cls is not None:
        # from the current config, so the recipe's scheduler_kwargs (e.g. timestep_spacing) carry over
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if settings.timesteps and "timesteps" not in inspect.signature(pipe.scheduler.set_timesteps).parameters:
        raise StepdistillError(f"--timesteps: {type(pipe.scheduler).__name__} does not take custom timesteps; pass "
                               "--num_inference_steps or a scheduler that does (e.g. LCMScheduler)")
    resolution = args.resolution or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return pipe, {**settings.call_kwargs(), "height": resolution, "width": resolution}
