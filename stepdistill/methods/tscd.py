"""Trajectory segmented consistency distillation (Hyper-SD's TSCD; Hyper-SD paper section 3.1).

[0, T) is cut into k segments whose edges are the trailing DDIM timesteps for k steps; the student is consistent
only inside a segment: the consistency step of ``consistency.py`` with the projection = the DDIM jump (x0 and ε
of the network) to the lower edge of the segment holding t (the target is x_prev itself when the teacher's step
already landed on the edge). Stages k = 8 → 4 → 2 → 1 train one LoRA progressively; the result serves every step
count with trailing DDIM ("unified LoRA"). Optional adversarial term: a hinge-loss head on the frozen teacher's
mid-block features (PCM's train_pcm_lora_sd15_adv.py), its weight growing as the segments shrink (Hyper-SD).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import option
from ..errors import StepdistillError
from ..recipe import Recipe
from .base import PhaseContext, PhaseOutput
from .consistency import ConsistencyConfig, ConsistencyDistillation, lower_edge
from .losses import hinge_discriminator_loss, hinge_generator_loss
from .networks import GANHead, mid_block_features


@dataclass
class TSCDConfig(ConsistencyConfig):
    """Trajectory segmented consistency distillation (Hyper-SD TSCD), progressive over segment counts. PCM's LoRA
    recipe (train_pcm_lora_sd15.py; Hyper-SD publishes no training code): rank 64, alpha 8 (PEFT's default: scale
    1/8), lr 5e-6."""

    segments: list[int] = option([8, 4, 2, 1], "segment counts of the stages, trained in order (e.g. 8,4,2,1)")
    stage_steps: list[int] = option([], "iterations per stage (default: max_train_steps split evenly)")
    num_ddim_timesteps: int = option(40, "N of the solver grid; must be a multiple of every segment count so "
                                         "edges fall on trailing DDIM timesteps")
    guidance_scale_min: float = option(3.0, "lowest teacher CFG scale drawn per sample")
    guidance_scale_max: float = option(3.0, "highest teacher CFG scale drawn per sample")
    num_inference_steps: int = option(4, "steps written into the sampling recipe (any of the trained segment "
                                         "counts works)")
    adversarial_weight: float = option(0.0, "weight of the adversarial term at the first stage (0: off); it grows "
                                            "as segments shrink: weight x first_segments / segments")
    adversarial_start_step: int = option(0, "iteration from which the adversarial term is on")
    discriminator_learning_rate: float | None = option(None, "learning rate of the discriminator head "
                                                             "(default: --learning_rate)")

    def validate(self) -> None:
        super().validate()
        if not self.segments or any(k < 1 for k in self.segments):
            raise StepdistillError(f"--segments {self.segments}: give positive segment counts such as 8,4,2,1")
        bad = [k for k in self.segments if self.num_ddim_timesteps % k or 1000 % k]
        if bad:
            raise StepdistillError(f"--num_ddim_timesteps {self.num_ddim_timesteps} is not a multiple of segment "
                                   f"counts {bad}: segment edges would miss the grid (use 40 for 8,4,2,1)")
        if self.stage_steps and len(self.stage_steps) != len(self.segments):
            raise StepdistillError(f"--stage_steps has {len(self.stage_steps)} entries for {len(self.segments)} "
                                   "stages")
        if self.stage_steps and sum(self.stage_steps) != self.max_train_steps:
            self.max_train_steps = sum(self.stage_steps)
        if self.adversarial_weight < 0:
            raise StepdistillError(f"--adversarial_weight {self.adversarial_weight}: must be >= 0 (0 turns it off)")
        if self.adversarial_weight and not self.use_lora:
            raise StepdistillError("--adversarial_weight needs --use_lora true: the discriminator's backbone is the "
                                   "frozen teacher, i.e. the shared UNet with its adapters off")


class TSCD(ConsistencyDistillation):
    name = "tscd"
    config_class = TSCDConfig

    def build(self) -> None:
        super().build()
        c = self.config
        if c.stage_steps:
            bounds = c.stage_steps
        else:
            base, rest = divmod(c.max_train_steps, len(c.segments))
            bounds = [base + (i < rest) for i in range(len(c.segments))]
        self.stage_ends = torch.tensor(bounds).cumsum(0).tolist()
        if c.adversarial_weight:
            # PCM's adversarial head: trained on the FROZEN teacher's mid-block features (the shared UNet with its
            # adapters off, so no second UNet is held); only the head trains
            latent = c.resolution // self.teacher.vae_scale_factor
            self.networks["discriminator"] = GANHead.for_unet(self.teacher.unet, latent).to(self.teacher.device)

    def learning_rate(self, name: str) -> float:
        if name == "discriminator" and self.config.discriminator_learning_rate is not None:
            return self.config.discriminator_learning_rate
        return self.config.learning_rate

    # ------------------------------------------------------------- schedule
    def segments_at(self, step: int) -> int:
        for k, end in zip(self.config.segments, self.stage_ends):
            if step < end:
                return k
        return self.config.segments[-1]

    def adversarial_on(self, step: int) -> bool:
        return bool(self.config.adversarial_weight) and step >= self.config.adversarial_start_step

    def phases(self, step: int) -> list[str]:
        """The student, then (with the adversarial term) the head on the student's detached jump."""
        return ["student", "discriminator"] if self.adversarial_on(step) else ["student"]

    # ------------------------------------------------------------- projection
    def end_point(self, t, step):
        return lower_edge(t, self.segments_at(step), self.teacher.num_train_timesteps)

    def project(self, out, x, t, end):
        at_end = (t == end).view(-1, *([1] * (x.ndim - 1)))  # the teacher's step already landed on the edge
        return torch.where(at_end, x, self.teacher.ddim_step(out, x, t, end))

    # ------------------------------------------------------------- losses
    def discriminate(self, head, x: torch.Tensor, t: torch.Tensor, cond, grad_into_x: bool) -> torch.Tensor:
        """Head logits on the frozen teacher's mid-block features; the trunk keeps a graph only when gradients must
        reach x (the student's adversarial term), not when the head itself trains."""
        with self.teacher_mode() as unet, torch.set_grad_enabled(grad_into_x and torch.is_grad_enabled()):
            features = mid_block_features(unet, x, t, **cond.unet_kwargs())
        return head(features.float())

    def loss(self, ctx: PhaseContext) -> PhaseOutput:
        if ctx.phase == "discriminator":
            return self.discriminator_loss(ctx)
        c = self.config
        terms = self.consistency_terms(ctx)
        loss = self.loss_fn(terms.prediction, terms.target)
        segments = self.segments_at(ctx.step)
        logs = {"loss": loss.detach(), "segments": float(segments)}
        handoff = {}
        if self.adversarial_on(ctx.step):
            weight = c.adversarial_weight * c.segments[0] / segments  # Hyper-SD: grows as the segments shrink
            adversarial = hinge_generator_loss(
                self.discriminate(self.networks["discriminator"], terms.prediction, terms.end, terms.cond, True))
            loss = loss + weight * adversarial
            logs["loss_adv"] = adversarial.detach()
            handoff["adversarial_batch"] = (terms.prediction.detach(), terms.target, terms.end, terms.cond)
        return PhaseOutput(loss, logs, handoff)

    def discriminator_loss(self, ctx: PhaseContext) -> PhaseOutput:
        """Hinge loss on the student's jump (fake) against the teacher trajectory's point at the same edge."""
        prediction, target, edge, cond = ctx.received["adversarial_batch"]
        loss = hinge_discriminator_loss(self.discriminate(ctx.trained, target, edge, cond, False),
                                        self.discriminate(ctx.trained, prediction, edge, cond, False))
        return PhaseOutput(loss, {"loss_disc": loss.detach()})

    def recipe(self) -> Recipe:
        c = self.config
        return self.student_recipe(
            scheduler="DDIMScheduler",
            scheduler_kwargs={"timestep_spacing": "trailing", "clip_sample": False, "set_alpha_to_one": False},
            num_inference_steps=c.num_inference_steps, guidance_scale=1.0, eta=0.0,
            extra={"trained_segments": list(c.segments),
                   "one_step": {"scheduler": "TCDScheduler", "eta": 1.0,
                                "note": "for 1 step, TCD with eta 1.0 (pass eta explicitly)"}},
        )
