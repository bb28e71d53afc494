"""The tiny-digits world's metrics: digits-FID (Fréchet distance on the digits classifier's penultimate features)
and prompt agreement (share of images the classifier reads as the prompted digit), plus the teacher's quality bar."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import StepdistillError
from ..evaluation.fid import extract_features, frechet_distance, stats_from_features
from ..evaluation.images import save_grid
from ..evaluation.sampler import ForwardMeter, cycle_prompts, generate, sampling_unets
from . import data
from .classifier import DigitsClassifier


@dataclass
class DigitsReference:
    """Feature statistics of the real digits (all 1797, quantised to uint8 like any saved image)."""

    mu: object
    sigma: object
    count: int


class DigitsJudge:
    """Scores generated digits against the real ones with the world's classifier."""

    def __init__(self, classifier: DigitsClassifier):
        self.classifier = classifier
        images, labels = data.load_digits_images()
        self.real_images = data.to_uint8(images)
        self.real_labels = labels
        features = extract_features(classifier, self.real_images)
        mu, sigma = stats_from_features(features)
        self.reference = DigitsReference(mu, sigma, len(features))
        self._real_features = features

    @classmethod
    def from_world(cls, world_dir: str | Path) -> "DigitsJudge":
        return cls(DigitsClassifier.load(world_dir))

    def real_vs_real_fid(self, seed: int = 0) -> float:
        """FID between two random halves of the real digits: the floor no generator can go below at this size."""
        perm = torch.randperm(len(self._real_features), generator=torch.Generator().manual_seed(seed))
        a, b = perm[: len(perm) // 2], perm[len(perm) // 2:]
        return frechet_distance(*stats_from_features(self._real_features[a]),
                                *stats_from_features(self._real_features[b]))

    @torch.no_grad()
    def score(self, images_uint8: torch.Tensor, prompts: Sequence[str]) -> dict:
        if len(images_uint8) != len(prompts):
            raise StepdistillError(f"{len(images_uint8)} images but {len(prompts)} prompts")
        if len(images_uint8) < 2:
            raise StepdistillError("digits-FID needs at least 2 images")
        targets = torch.tensor([data.digit_of_prompt(p) if data.digit_of_prompt(p) is not None else -1
                                for p in prompts])
        features = extract_features(self.classifier, images_uint8)
        predicted = self.classifier.head(features.float()).argmax(1)
        known = targets >= 0
        agreement = (predicted[known] == targets[known]).float().mean().item() if known.any() else float("nan")
        fid = frechet_distance(*stats_from_features(features), self.reference.mu, self.reference.sigma)
        return {"digits_fid": fid, "prompt_agreement": agreement, "num_images": len(prompts)}


def quality_table(world_dir: str | Path, num_images: int = 1000, steps: Sequence[int] = (25, 8, 4, 2),
                  guidance_scale: float = 3.0, batch_size: int = 500, seed: int = 0, grid_path: str | None = None,
                  progress: bool = True) -> dict:
    """The teacher's quality bar: DDIM at several step counts on the held-out evaluation prompts."""
    pipe = _ddim_teacher(world_dir)
    judge = DigitsJudge.from_world(world_dir)
    prompts = cycle_prompts(data.eval_prompts(), num_images)
    rows = []
    grids = []
    for n in steps:
        scores, images = score_pipeline(pipe, judge, {"num_inference_steps": n, "guidance_scale": guidance_scale},
                                        prompts, batch_size=batch_size, seed=seed, progress=progress,
                                        desc=f"ddim {n} steps")
        rows.append({"sampler": "DDIM", "steps": n, "guidance_scale": guidance_scale, **scores})
        grids.append(_one_per_digit(images, prompts))
    result = {"rows": rows, "real_vs_real_fid": judge.real_vs_real_fid(seed), "num_images": num_images,
              "prompts": "assets/prompts/tiny-digits-eval.txt"}
    if grid_path:
        save_grid(torch.cat(grids), grid_path, nrow=10)
    return result


def _ddim_teacher(world_dir: str | Path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(world_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe


def _one_per_digit(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The first image generated for each digit 0..9, in order (a grid row)."""
    picks = []
    for d in range(10):
        i = next(i for i, p in enumerate(prompts) if data.digit_of_prompt(p) == d)
        picks.append(images[i])
    return torch.stack(picks)


def format_table(result: dict) -> str:
    ratio = any("fid_vs_teacher" in r for r in result["rows"])
    lines = ["| sampler | steps | guidance | NFE | digits-FID | prompt agreement |" + (" FID / teacher |" if ratio else ""),
             "|---|---|---|---|---|---|" + ("---|" if ratio else "")]
    for r in result["rows"]:
        lines.append(f"| {r['sampler']} | {r['steps']} | {r['guidance_scale']} | {r['nfe']} | "
                     f"{r['digits_fid']:.3f} | {100 * r['prompt_agreement']:.1f} % |"
                     + (f" {r['fid_vs_teacher']:.2f}x |" if ratio else ""))
    lines.append(f"| real vs real (two halves) | | | | {result['real_vs_real_fid']:.3f} | |" + (" |" if ratio else ""))
    return "\n".join(lines)


def score_pipeline(pipe, judge: DigitsJudge, call_kwargs: dict, prompts: Sequence[str] | None = None,
                   num_images: int = 1000, batch_size: int = 500, seed: int = 0, progress: bool = False,
                   desc: str = "sampling") -> tuple[dict, torch.Tensor]:
    """Digits-FID and prompt agreement of ``pipe(prompt, **call_kwargs)`` on the held-out prompts (image i seeded
    ``seed + i``). Returns the scores and the uint8 images."""
    prompts = list(prompts) if prompts is not None else cycle_prompts(data.eval_prompts(), num_images)
    meter = ForwardMeter(sampling_unets(pipe))
    start = time.perf_counter()
    with meter.counting():  # UNet evaluations counted by a hook, not assumed
        images = generate(pipe, prompts, batch_size=batch_size, seed=seed, progress=progress, desc=desc,
                          **call_kwargs)
    seconds = time.perf_counter() - start
    nfe = meter.samples / len(prompts)
    return {**judge.score(images, prompts), "nfe": int(nfe) if nfe == int(nfe) else round(nfe, 2),
            "images_per_second": len(prompts) / seconds}, images


def student_table(world_dir: str | Path, student_dir: str | Path, steps: Sequence[int] = (1, 2, 4),
                  num_images: int = 1000, batch_size: int = 500, seed: int = 0, judge: DigitsJudge | None = None,
                  progress: bool = True, guidance_scales: Sequence[float] | None = None
                  ) -> tuple[list[dict], torch.Tensor]:
    """A stepdistill output, loaded the stock way (weights + the recipe's scheduler), at several step counts (and
    guidance scales: the recipe's by default) on the held-out prompts. Returns the rows and one grid row (digits
    0-9) per setting; NFE is counted by a hook on the UNet."""
    from diffusers import StableDiffusionPipeline

    from ..recipe import Recipe, load

    recipe = Recipe.load(student_dir)
    pipe = load(StableDiffusionPipeline.from_pretrained(world_dir), student_dir)
    judge = judge or DigitsJudge.from_world(world_dir)
    prompts = cycle_prompts(data.eval_prompts(), num_images)
    rows, grids = [], []
    for w in guidance_scales or [recipe.guidance_scale]:
        for n in steps:
            kwargs = recipe.call_kwargs()
            kwargs.pop("timesteps", None)
            kwargs["num_inference_steps"], kwargs["guidance_scale"] = n, w
            if recipe.timesteps and len(recipe.timesteps) == n:
                kwargs.pop("num_inference_steps")
                kwargs["timesteps"] = list(recipe.timesteps)
            scores, images = score_pipeline(pipe, judge, kwargs, prompts, batch_size=batch_size, seed=seed,
                                            progress=progress, desc=f"{recipe.method} {n} steps, w {w:g}")
            rows.append({"sampler": f"{recipe.method} ({recipe.scheduler})", "steps": n, "guidance_scale": w,
                         **scores})
            grids.append(_one_per_digit(images, prompts))
    return rows, torch.cat(grids)


def teacher_grid_row(world_dir: str | Path, seed: int = 0, steps: int = 25, guidance_scale: float = 3.0):
    """One image per digit from the teacher (DDIM, the evaluation prompts), as a grid row."""
    pipe = _ddim_teacher(world_dir)
    prompts = [next(p for p in data.eval_prompts() if data.digit_of_prompt(p) == d) for d in range(10)]
    return generate(pipe, prompts, num_inference_steps=steps, guidance_scale=guidance_scale, seed=seed,
                    progress=False)
