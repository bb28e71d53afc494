"""Benchmark: LCM-LoRA training-step throughput and peak memory, stepdistill against a straightforward
implementation built like the Diffusers example (a separate frozen teacher UNet, cond and uncond as two UNet calls,
text and images encoded every step). Same model, data, batch and LoRA. Each (implementation, model) runs in its own
process so peak RSS is its own.

    python train_scripts/bench_lcm.py                 # the tiny-digits UNet and a wider 65M-parameter UNet
    python train_scripts/bench_lcm.py --steps 30 --batch_size 32
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "assets" / "tiny-digits-sd"


def larger_pipeline(directory: Path) -> Path:
    """The tiny-digits VAE and text encoder with a wider three-level UNet (16x16 latents, 32x32 images, ~65M
    parameters: its weights, like a real UNet's, are a visible share of memory)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(WORLD)
    torch.manual_seed(0)
    pipe.unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(128, 256, 512),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=pipe.text_encoder.config.hidden_size, attention_head_dim=16, norm_num_groups=32)
    pipe.save_pretrained(directory)
    return directory


def peak_rss_mb() -> tuple[float, float]:
    """This process's peak RSS in MB: VmHWM (the high-water mark of its own address space since exec) and
    ``ru_maxrss``. On Linux ru_maxrss is not the process's own: at exec the kernel folds the parent's high-water
    mark into it, so every child of a parent that once held 700 MB reports at least 700 MB. VmHWM is what the table
    shows (ru_maxrss where /proc is missing)."""
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024, maxrss
    except OSError:
        pass
    return maxrss, maxrss


def one_run(impl: str, model: str, steps: int, batch_size: int, rank: int) -> dict:
    from stepdistill.lora import add_lora
    from stepdistill.methods.consistency import boundary_scalings, consistency_loss, skipping_grid
    from stepdistill.teacher import Teacher

    import torch.nn.functional as F

    from stepdistill.toy.data import load_digits_images

    torch.manual_seed(0)
    teacher = Teacher.from_pretrained(model)
    size = teacher.default_resolution
    images = load_digits_images()[0][:batch_size] * 2 - 1
    pixels = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    cached = teacher.latent_dist(pixels) if impl == "stepdistill" else None  # --cache_latents
    prompts = [f"a handwritten digit {w}" for w in ("one", "two", "three", "four")] * (batch_size // 4 + 1)
    prompts = prompts[:batch_size]
    grid = skipping_grid(1000, 50)
    separate_teacher = copy.deepcopy(teacher.unet) if impl == "naive" else None
    add_lora(teacher.unet, rank, seed=0)
    unet = teacher.unet
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    tok = teacher.pipe.tokenizer

    def fscale(out, x, t):
        c_skip, c_out = boundary_scalings(t)
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * teacher.to_x0(out, x, t)

    def step():
        if impl == "naive":  # the Diffusers example encodes every batch with the VAE
            with torch.no_grad():
                z0 = teacher.encode_images(pixels)
        else:
            z0 = cached[0] + cached[1] * torch.randn_like(cached[0])
        t = grid[torch.randint(0, 50, (batch_size,))]
        t_prev = (t - 20).clamp(min=0)
        x = teacher.add_noise(z0, torch.randn_like(z0), t)
        w = 1 + 7 * torch.rand(batch_size)
        if impl == "naive":  # the Diffusers-example shape: encode text every step, two teacher calls
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            uncond_ids = tok([""] * batch_size, padding="max_length", max_length=tok.model_max_length,
                             return_tensors="pt").input_ids
            with torch.no_grad():
                emb = teacher.pipe.text_encoder(ids)[0]
                uemb = teacher.pipe.text_encoder(uncond_ids)[0]
            out = unet(x, t, emb).sample
            with torch.no_grad():
                c = separate_teacher(x, t, emb).sample
                u = separate_teacher(x, t, uemb).sample
                eps = u + w.view(-1, 1, 1, 1) * (c - u)
                x_prev = teacher.ddim_step(eps, x, t, t_prev)
                target = fscale(unet(x_prev, t_prev, emb).sample, x_prev, t_prev)
        else:  # stepdistill: cached prompts, one batched CFG call, the teacher = the same UNet without adapters
            from stepdistill.methods.consistency import guided_solver_step

            cond = teacher.encode_prompt(prompts)
            out = teacher.predict(x, t, cond, unet=unet)
            with torch.no_grad():
                unet.disable_adapters()
                x_prev = guided_solver_step(teacher, unet, x, t, t_prev, cond, w)
                unet.enable_adapters()
                target = fscale(teacher.predict(x_prev, t_prev, cond, unet=unet), x_prev, t_prev)
        loss = consistency_loss(fscale(out, x, t), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    peak_mb = peak_rss_mb()[0]
    return {"impl": impl, "steps_per_s": steps / elapsed, "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--_child", nargs=2, metavar=("IMPL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(one_run(args._child[0], args._child[1], args.steps, args.batch_size, args.rank)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        models = {"tiny-digits UNet (8x8 latents)": str(WORLD),
                  "wider UNet (16x16 latents, 65M params)": str(larger_pipeline(Path(tmp) / "larger"))}
        rows = []
        for label, model in models.items():
            result = {}
            for impl in ("naive", "stepdistill"):
                cmd = [sys.executable, __file__, "--_child", impl, model, "--steps", str(args.steps),
                       "--batch_size", str(args.batch_size), "--rank", str(args.rank)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=True)
                result[impl] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((label, result))
    print(f"\nLCM-LoRA training step, batch {args.batch_size}, LoRA rank {args.rank}, {args.steps} timed steps, "
          f"torch threads {torch.get_num_threads()}\n")
    print("| model | Diffusers-example style (steps/s) | stepdistill (steps/s) | speed-up | peak RSS example (MB) "
          "| peak RSS stepdistill (MB) |")
    print("|---|---|---|---|---|---|")
    for label, r in rows:
        n, s = r["naive"], r["stepdistill"]
        print(f"| {label} | {n['steps_per_s']:.2f} | {s['steps_per_s']:.2f} | "
              f"{s['steps_per_s'] / n['steps_per_s']:.2f}x | {n['peak_rss_mb']:.0f} | {s['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
