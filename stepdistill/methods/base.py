"""What a distillation method is to the shared loop: networks to train, which phases run on an iteration and the
loss of each, what one phase hands the next, and what it writes at the end. Nothing here parses arguments,
checkpoints, logs or wraps modules for distributed training: the loop does (docs/architecture.md)."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..lora import add_lora
from ..randomness import StepRandom
from ..recipe import Recipe
from ..teacher import Conditioning, Teacher


@dataclass
class PhaseContext:
    """What the loop gives one phase of one iteration (one micro-batch under gradient accumulation)."""

    phase: str  # which network this phase updates
    step: int  # the optimisation step (iteration)
    batch: dict[str, Any]
    rng: StepRandom  # this phase's own random stream
    iteration_rng: StepRandom  # the iteration's stream, for streams a method shares between its phases
    trained: nn.Module  # the phase's network as the loop prepared it (DDP): call it where gradients are wanted
    received: dict[str, Any] = field(default_factory=dict)  # what earlier phases of this iteration handed over


@dataclass
class PhaseOutput:
    loss: torch.Tensor
    logs: dict[str, Any]
    handoff: dict[str, Any] = field(default_factory=dict)  # given to the later phases of the same iteration


class DistillationMethod:
    """A method: ``build`` makes the trainable ``networks`` (one optimiser each), ``phases(step)`` names the
    networks that update on an iteration, in order, and ``loss(ctx)`` is the loss of one phase."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    needs_images: ClassVar[bool] = True
    student_name: ClassVar[str] = "student"  # the network that samples (DMD2/SiD call it "generator")
    # The phase that draws from the iteration's own stream rather than one named after it: single-network methods
    # (LCM, TSCD) draw from it as they did before phases had streams, so their runs reproduce exactly.
    main_stream_phase: ClassVar[str | None] = "student"

    @classmethod
    def requires_images(cls, config) -> bool:
        """Whether this run needs an image dataset (a method may need images only for an optional loss)."""
        return cls.needs_images

    @classmethod
    def fsdp_refusal(cls, config) -> str | None:
        """Why an FSDP launch cannot shard this run's networks (None: it can). FSDP shards whole trainable modules
        (a full student, a full fake score); a LoRA's adapters live inside the frozen UNet they share."""
        if getattr(config, "use_lora", False):
            return ("--use_lora true: a LoRA student's adapters sit inside the shared frozen UNet, which FSDP does "
                    "not shard; launch LoRA runs with DDP (configs/accelerate/ddp.yaml), or train the full UNet with "
                    "--use_lora false")
        return None

    def __init__(self, config, teacher: Teacher, keep=None):
        self.config = config
        self.teacher = teacher
        self.keep = keep  # caption → bool: the part of the prompts this run trains on (an MSD student), or None
        self.networks: dict[str, nn.Module] = {}  # optimiser name → trainable module (as built, never wrapped)
        self.build()

    # ------------------------------------------------------------- to override
    def build(self) -> None:
        raise NotImplementedError

    def phases(self, step: int) -> list[str]:
        """Which networks update on iteration ``step``, in order (two time-scale methods alternate here)."""
        return ["student"]

    def loss(self, ctx: PhaseContext) -> PhaseOutput:
        raise NotImplementedError

    def recipe(self) -> Recipe:
        raise NotImplementedError

    def after_update(self, phase: str, step: int) -> None:
        """Called after an optimiser step of ``phase`` (EMA targets update here)."""

    def ema_copies(self) -> dict[str, nn.Module]:
        """EMA copies the method keeps (a consistency target, a generator EMA), by checkpoint name."""
        return {}

    def extra_state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors besides the trainable weights that a checkpoint must keep: the EMA copies."""
        return {name: {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
                for name, module in self.ema_copies().items()}

    def load_extra_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        for name, module in self.ema_copies().items():
            if name in state:
                module.load_state_dict(state[name])

    def learning_rate(self, name: str) -> float:
        return self.config.learning_rate

    def optimizer_kwargs(self, name: str) -> dict:
        c = self.config
        return {"betas": (c.adam_beta1, c.adam_beta2), "weight_decay": c.adam_weight_decay, "eps": c.adam_epsilon}

    # ------------------------------------------------------------- shared helpers
    def trainable_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for p in self.networks[name].parameters() if p.requires_grad]

    def student_unet(self):
        """The UNet that samples: the teacher's own UNet carrying a LoRA, or a separate full student."""
        return self.networks[self.student_name]

    def make_student(self) -> nn.Module:
        """A LoRA on the teacher's UNet (teacher = adapters off) or a full trainable copy; with --init_from_output,
        holding that output's weights."""
        c = self.config
        if c.use_lora:
            add_lora(self.teacher.unet, c.lora_rank, c.lora_alpha, seed=c.seed)
            student = self.teacher.unet
        else:
            student = copy.deepcopy(self.teacher.unet).requires_grad_(True)
        if getattr(c, "init_from_output", None):  # an earlier output (a pipeline's previous stage): its weights
            from ..students import load_init_output

            load_init_output(student, c)
        return student

    @contextlib.contextmanager
    def teacher_mode(self):
        """Inside: ``self.teacher.unet`` is the frozen teacher (LoRA adapters disabled when they share it). Gradient
        checkpointing of the shared UNet pauses meanwhile: backward would recompute the teacher's forward with the
        adapters back ON (a different graph: CheckpointError, or silently wrong gradients into x)."""
        unet = self.teacher.unet
        shared = self.config.use_lora and getattr(unet, "_hf_peft_config_loaded", False)
        paused = shared and getattr(unet, "is_gradient_checkpointing", False)
        if shared:
            unet.disable_adapters()
        if paused:
            unet.disable_gradient_checkpointing()
        try:
            yield unet
        finally:
            if paused:
                unet.enable_gradient_checkpointing()
            if shared:
                unet.enable_adapters()

    def conditioning(self, prompts: list[str], resolution: int | None = None) -> Conditioning:
        return self.teacher.encode_prompt(prompts, resolution or self.config.resolution).to(self.teacher.device)

    def uncond(self, b: int) -> Conditioning:
        """The empty prompt at the training resolution (SDXL's add_time_ids too)."""
        return self.teacher.uncond(b, self.config.resolution).to(self.teacher.device)

    def clean_latents(self, batch: dict, rng: StepRandom) -> torch.Tensor:
        """z0 for the batch: a VAE posterior sample (from the cache, or encoded now)."""
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(self.teacher.device), batch["latent_std"].to(self.teacher.device)
            return mean + std * rng.randn_like(mean)
        mean, std = self.teacher.latent_dist(batch["pixel_values"])
        return mean + std * rng.randn_like(mean)

    # ------------------------------------------------------------- output
    def sampling_pipeline(self):
        """A stock pipeline over the current student with the recipe's scheduler (for validation grids)."""
        pipe = self.teacher.pipe
        recipe = self.recipe()
        components = dict(pipe.components)
        components["unet"] = self.student_unet()
        components["scheduler"] = recipe.make_scheduler(pipe.scheduler.config)
        if "safety_checker" in components:
            components["requires_safety_checker"] = False
        sampler = type(pipe)(**components)
        sampler.set_progress_bar_config(disable=True)
        return sampler

    @classmethod
    def output_adapter(cls, config) -> str:
        """The output kind this run writes (before anything is built): what preflight checks exports against."""
        return "lora" if getattr(config, "use_lora", False) else "full_unet"

    def student_recipe(self, **settings) -> Recipe:
        """The recipe of this run's student: the base model and adapter kind filled in, ``settings`` for the rest."""
        c = self.config
        settings.setdefault("method", self.name)
        return Recipe(base_model=str(c.pretrained_model_name_or_path),
                      adapter="lora" if c.use_lora else "full_unet", **settings)

    def save_output(self, output_dir: str | Path, module=None) -> None:
        """Weights, recipe and model card, as the output kind of the recipe writes them. ``module``: what to write
        in place of ``output_module()`` (under FSDP, its gathered unsharded copy)."""
        from ..outputs import save_output

        save_output(self.output_module() if module is None else module, output_dir, self.recipe(),
                    type(self.teacher.pipe))

    def output_module(self):
        """What the output kind writes: the sampling UNet (a LoRA student's UNet, a full student), or adapters."""
        return self.student_unet()


@torch.no_grad()
def ema_update(ema: nn.Module, live: nn.Module, decay: float) -> None:
    """ema ← decay · ema + (1 - decay) · live, parameter by parameter, in one fused call."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in live.parameters()], 1 - decay)
