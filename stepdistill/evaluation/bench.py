"""The sampling benchmark: what the sampler costs beyond its UNet evaluations (``eval/bench_sampling.py``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from .pipeline import load_pipeline
from .sampler import ForwardMeter, Sampler, cycle_prompts

logger = logging.getLogger(__name__)


def bench_sampling(model: str | Path, prompts: Sequence[str], num_images: int = 250, batch_size: int = 250,
                   repeats: int = 3, teacher_steps: int = 25, guidance_scale: float = 3.0,
                   student_nfe: Sequence[int] = (1, 2, 4), progress: bool = True,
                   agd_dir: str | Path | None = None) -> list[dict]:
    """Images per second of the teacher (DDIM, CFG) and of 1/2/4-evaluation samplers (LCMScheduler, no CFG) on the
    same UNet, through the same :class:`Sampler` the evaluation uses, on ``prompts`` taken round-robin. With
    ``agd_dir``, also the teacher's steps and guidance scale through AGD adapters (one UNet evaluation per step).

    The configurations take turns within each pass and each keeps its fastest timed pass (pass 0 warms up): the
    machine is shared, so drift hits all of them alike and the minimum is the least disturbed estimate. Time inside
    the UNet and the VAE decoder is measured with hooks; what remains is the sampler's own overhead.
    """
    from diffusers import DDIMScheduler, LCMScheduler

    pipe = load_pipeline(str(model), torch.float32, "cpu")
    base_config = pipe.scheduler.config
    prompts = cycle_prompts(prompts, num_images)
    # (name, pipeline, scheduler, steps, guidance scale, images per call)
    # CFG doubles the UNet batch; halving the teacher's images per call keeps every UNet call at batch_size
    # latents, so per-evaluation cost (which depends on the batch through cache effects) is the same for all
    configs = [("teacher: DDIM + CFG", pipe, DDIMScheduler.from_config(base_config), teacher_steps, guidance_scale,
                max(1, batch_size // 2) if guidance_scale > 1 else batch_size)]
    if agd_dir is not None:
        from ..recipe import load

        agd_pipe = load(load_pipeline(str(model), torch.float32, "cpu"), agd_dir)
        configs.append((f"AGD adapters: DDIM, w {guidance_scale:g}", agd_pipe, DDIMScheduler.from_config(base_config),
                        teacher_steps, guidance_scale, batch_size))
    configs += [(f"LCMScheduler, {n} step{'s' if n > 1 else ''}", pipe, LCMScheduler.from_config(base_config), n, 1.0,
                 batch_size) for n in student_nfe]
    samplers = [Sampler(p, {"num_inference_steps": steps, "guidance_scale": w}, time_unet=True)
                for _, p, _, steps, w, _ in configs]
    decode = ForwardMeter(pipe.vae.decoder, time_it=True)
    best: list[dict | None] = [None] * len(configs)
    for rep in range(repeats + 1):
        for k, ((name, p, scheduler, _, _, b), sampler) in enumerate(zip(configs, samplers)):
            p.scheduler = scheduler
            decode.module = p.vae.decoder
            sampler.counter.samples, sampler.counter.seconds, decode.seconds = 0, 0.0, 0.0
            start = time.perf_counter()
            with decode.counting():
                for s in range(0, num_images, b):
                    sampler(prompts[s:s + b], range(s, min(s + b, num_images)))
            run = {"seconds": time.perf_counter() - start, "unet_seconds": sampler.counter.seconds,
                   "decode_seconds": decode.seconds, "nfe": sampler.counter.samples / num_images}
            if rep > 0 and (best[k] is None or run["seconds"] < best[k]["seconds"]):
                best[k] = run
            if progress:
                logger.info("pass %d, %s: %.2f s", rep, name, run["seconds"])
    rows = [{"sampler": name, "steps": steps, "guidance_scale": w, **b, "images_per_second": num_images / b["seconds"]}
            for (name, _, _, steps, w, _), b in zip(configs, best)]
    teacher = rows[0]
    per = 1e3 / num_images
    for r in rows:
        r["speedup"] = r["images_per_second"] / teacher["images_per_second"]
        r["nfe_ratio"] = teacher["nfe"] / r["nfe"]
        r["efficiency"] = r["speedup"] / r["nfe_ratio"]
        r["unet_ms"], r["decode_ms"] = r["unet_seconds"] * per, r["decode_seconds"] * per
        r["other_ms"] = (r["seconds"] - r["unet_seconds"] - r["decode_seconds"]) * per
        # the speed-up a sampler with zero overhead of its own would reach, given the measured UNet and decode
        r["limit_with_decode"] = (teacher["unet_ms"] + teacher["decode_ms"]) / (r["unet_ms"] + r["decode_ms"])
        r["efficiency_with_decode"] = r["speedup"] / r["limit_with_decode"]
    return rows


def format_bench_table(rows: list[dict], num_images: int, batch_size: int) -> str:
    lines = [f"{num_images} images per pass, {batch_size} latents per UNet call (the CFG teacher takes "
             f"{max(1, batch_size // 2)} images per call), fastest timed pass; ms are per image",
             "",
             "| sampler | NFE/image | images/s | speed-up | NFE ratio | speed-up / NFE ratio | limit with decode | "
             "speed-up / that limit | UNet ms | VAE decode ms | other ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['nfe']:g} | {r['images_per_second']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['nfe_ratio']:.1f}x | {r['efficiency']:.2f} | {r['limit_with_decode']:.1f}x | "
                     f"{r['efficiency_with_decode']:.2f} | {r['unet_ms']:.2f} | {r['decode_ms']:.2f} | "
                     f"{r['other_ms']:.2f} |")
    return "\n".join(lines)


def bench_outputs(model: str | Path, outputs: dict[str, str | Path | None], prompts: Sequence[str],
                  num_images: int = 250, batch_size: int = 250, repeats: int = 3, progress: bool = True) -> list[dict]:
    """Images per second of stepdistill outputs, each sampled with its own recipe through ``stepdistill.load`` and
    the evaluation's :class:`Sampler` (``None``: the base model at 25 DDIM steps, CFG 3), beside the parameters of
    the UNet that samples one image (an MSD output: one student's; ``all_parameters`` counts all K). Turns and the
    fastest timed pass as in :func:`bench_sampling`."""
    from diffusers import DDIMScheduler

    from ..recipe import Recipe, load
    from .sampler import sampling_unets

    prompts = cycle_prompts(prompts, num_images)
    runs = []
    for name, out in outputs.items():
        pipe = load_pipeline(str(model), torch.float32, "cpu")
        if out is None:
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
            call = {"num_inference_steps": 25, "guidance_scale": 3.0}
        else:
            pipe, call = load(pipe, out), Recipe.load(out).call_kwargs()
        unets = sampling_unets(pipe)
        per_image = batch_size // 2 if float(call.get("guidance_scale", 1)) > 1 else batch_size
        runs.append((name, Sampler(pipe, call, time_unet=True), max(1, per_image),
                     sum(p.numel() for p in unets[0].parameters()),
                     sum(p.numel() for u in unets for p in u.parameters())))
    best: list[dict | None] = [None] * len(runs)
    for rep in range(repeats + 1):
        for k, (name, sampler, b, _, _) in enumerate(runs):
            sampler.counter.samples, sampler.counter.seconds = 0, 0.0
            start = time.perf_counter()
            for s in range(0, num_images, b):
                sampler(prompts[s:s + b], range(s, min(s + b, num_images)))
            run = {"seconds": time.perf_counter() - start, "unet_seconds": sampler.counter.seconds,
                   "nfe": sampler.counter.samples / num_images}
            if rep > 0 and (best[k] is None or run["seconds"] < best[k]["seconds"]):
                best[k] = run
            if progress:
                logger.info("pass %d, %s: %.2f s", rep, name, run["seconds"])
    return [{"output": name, "parameters": params, "all_parameters": total, **b,
             "images_per_second": num_images / b["seconds"], "unet_ms": b["unet_seconds"] * 1e3 / num_images}
            for (name, _, _, params, total), b in zip(runs, best)]


def format_outputs_table(rows: list[dict]) -> str:
    lines = ["| output | UNet parameters (per image) | all students | NFE/image | images/s | UNet ms/image |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['output']} | {r['parameters'] / 1e6:.3f} M | {r['all_parameters'] / 1e6:.3f} M | "
                     f"{r['nfe']:g} | {r['images_per_second']:.1f} | {r['unet_ms']:.3f} |")
    return "\n".join(lines)
