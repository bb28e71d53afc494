"""Adapter guidance distillation (Jensen et al. 2025, "Efficient Distillation of Classifier-Free Guidance using
Adapters"; official code cristianpjensen/agd, agd/sd/train.py and agd/sd/sample_trajectories.py).

Algorithm:
  0. once: sample the base pipeline with ordinary CFG, w ~ U[guidance_range] per batch of prompts, and store every
     step's state (x_t, t, w, the prompt's conditioning) with the CFG output uncond + w (cond - uncond) in the
     model's prediction type (stepdistill.agd.trajectories) — states of GUIDED trajectories, the paper's main point;
  1. each iteration: states drawn uniformly from the store;
     L = MSE(UNet_with_adapters(x_t, t, c; w), stored CFG output)   — only the adapters train, the UNet is frozen.
The result samples with guidance_scale = w in ONE UNet evaluation per step (stepdistill.agd.adapters).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import LR_SCHEDULERS, TrainConfig, option
from ..errors import StepdistillError
from ..prompts import read_prompts
from ..recipe import Recipe
from .base import DistillationMethod, PhaseContext, PhaseOutput

logger = logging.getLogger("stepdistill")


@dataclass
class AGDConfig(TrainConfig):
    """Adapter guidance distillation: adapters that give the frozen UNet CFG in one forward pass, for a range of
    guidance scales (Imagen convention, 1 = none)."""

    hidden_dim: int = option(320, "width d of every adapter (official 320)")
    mlp_ratio: float = option(4.0, "width of the guidance-scale MLP, as a multiple of d")
    guidance_range: list[float] = option([1.0, 12.0], "lo,hi: the guidance scales trained (official SD: 1,12)")
    trajectory_steps: int = option(25, "sampler steps of the stored CFG trajectories (official: 999); the output "
                                       "samples best at this step count")
    num_trajectories: int = option(500, "CFG trajectories to store (official: 500 COCO captions)")
    trajectory_batch_size: int = option(16, "trajectories sampled per call; they share one w")
    trajectory_dir: str | None = option(None, "where the trajectories are (made when missing; default: a folder "
                                              "under ~/.cache/stepdistill/agd named after their settings)")
    num_inference_steps: int | None = option(None, "sampler steps written into the recipe (default: "
                                                   "--trajectory_steps; official SD sampling: 50)")
    inference_guidance_scale: float = option(3.0, "the guidance scale written into the recipe (any w in the "
                                                  "trained range works)")
    learning_rate: float = option(1e-4, "learning rate of the adapters (official 1e-4)")
    lr_scheduler: str = option("cosine", "a diffusers.optimization schedule (official: cosine after 10 % warm-up)",
                               choices=LR_SCHEDULERS)
    use_lora: bool = option(False, "unused by AGD (the adapters are not a LoRA)")

    def validate(self) -> None:
        if len(self.guidance_range) != 2 or not 1 <= self.guidance_range[0] <= self.guidance_range[1]:
            raise StepdistillError(f"--guidance_range {','.join(map(str, self.guidance_range))}: give lo,hi with "
                                   "1 <= lo <= hi, e.g. 1,12")
        if self.guidance_range[1] >= 30:
            raise StepdistillError(f"--guidance_range: {self.guidance_range[1]:g} is too high (the pipeline's "
                                   "guidance embedding carries w < 30 exactly)")
        if min(self.hidden_dim, self.trajectory_steps, self.num_trajectories, self.trajectory_batch_size,
               self.num_inference_steps or 1) < 1:
            raise StepdistillError("--hidden_dim, --trajectory_steps, --num_trajectories, --trajectory_batch_size "
                                   "and --num_inference_steps must be at least 1")
        if self.hidden_dim % 2:
            raise StepdistillError(f"--hidden_dim {self.hidden_dim}: must be even (sinusoidal position encoding)")
        if not self.prompts_file:
            raise StepdistillError("AGD samples its own CFG trajectories: pass --prompts_file (one prompt per line)")


class AGD(DistillationMethod):
    name = "agd"
    config_class = AGDConfig
    needs_images = False

    student_name = "adapters"
    main_stream_phase = "adapters"

    @classmethod
    def fsdp_refusal(cls, config):
        return ("AGD trains small adapters hooked onto the frozen UNet, which FSDP does not shard (nor need to); "
                "launch it with DDP (configs/accelerate/ddp.yaml)")

    def phases(self, step: int) -> list[str]:
        return ["adapters"]

    def build(self) -> None:
        from ..agd.adapters import AGDAdapters, parameter_share

        c, teacher = self.config, self.teacher
        self.states = self._trajectories()  # sampled with the plain base pipeline, before any adapter exists
        adapters = AGDAdapters(teacher.unet, c.hidden_dim, c.mlp_ratio, tuple(c.guidance_range))
        self.networks["adapters"] = adapters.to(teacher.device).attach()
        n, total = parameter_share(adapters)
        logger.info("AGD adapters on %d cross-attentions: %.2fM parameters = %.1f %% of the UNet's %.1fM",
                    len(adapters.adapters), n / 1e6, 100 * n / total, total / 1e6)

    def trajectory_spec(self):
        from ..agd.trajectories import TrajectorySpec

        c = self.config
        prompts = read_prompts(c.prompts_file)
        return prompts, TrajectorySpec.for_pipeline(
            self.teacher.pipe, str(c.pretrained_model_name_or_path), prompts, num_trajectories=c.num_trajectories,
            guidance_range=tuple(c.guidance_range), steps=c.trajectory_steps, batch_size=c.trajectory_batch_size,
            seed=c.seed, resolution=c.resolution)

    def trajectory_dir(self, spec) -> Path:
        if self.config.trajectory_dir:
            return Path(self.config.trajectory_dir)
        return Path.home() / ".cache" / "stepdistill" / "agd" / f"trajectories-{spec.sha256()[:12]}"

    def _trajectories(self):
        from ..agd.trajectories import load_states, make_trajectories

        prompts, spec = self.trajectory_spec()
        folder = self.trajectory_dir(spec)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        if not dist or torch.distributed.get_rank() == 0:
            make_trajectories(self.teacher.pipe, prompts, folder, spec)  # resumes; reuses a complete folder
        if dist:
            torch.distributed.barrier()
        logger.info("AGD trajectories: %s", folder)
        return load_states(folder, spec)

    def loss(self, ctx: PhaseContext) -> PhaseOutput:
        c, device = self.config, self.teacher.device
        index = ctx.rng.randint(0, len(self.states), c.train_batch_size)
        s = {k: v.to(device) for k, v in self.states.get(index).items()}
        kwargs = {"encoder_hidden_states": s["prompt_embeds"]}
        if "pooled_prompt_embeds" in s:
            kwargs["added_cond_kwargs"] = {"text_embeds": s["pooled_prompt_embeds"], "time_ids": s["add_time_ids"]}
        out = ctx.trained(s["x_t"], s["t"], s["w"], **kwargs)
        loss = F.mse_loss(out.float(), s["target"].float())
        return PhaseOutput(loss, {"loss": loss.detach()})

    def sampling_pipeline(self):
        self.networks["adapters"].enable_pipeline_mode()
        return super().sampling_pipeline()

    def student_unet(self):
        return self.teacher.unet  # the UNet that samples: the frozen base with the adapters hooked on

    def output_module(self):
        return self.networks["adapters"]

    @classmethod
    def output_adapter(cls, config) -> str:
        return "agd"

    def recipe(self) -> Recipe:
        c = self.config
        return Recipe(method="agd", base_model=str(c.pretrained_model_name_or_path), adapter="agd",
                      scheduler=type(self.teacher.pipe.scheduler).__name__, num_inference_steps=c.num_inference_steps or c.trajectory_steps,
                      guidance_scale=c.inference_guidance_scale,
                      extra={"guidance_range": list(c.guidance_range),
                             "note": "pass guidance_scale=w within guidance_range: one UNet evaluation per step"})
