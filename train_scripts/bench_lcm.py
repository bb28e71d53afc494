"""Benchmark: LCM-LoRA training-step throughput and peak memory, stepdistill against a straightforward
implementation built like the Diffusers example (a separate frozen teacher UNet, cond and uncond as two UNet calls,
text and images encoded every step). Same model, images, batch, LoRA rank, guidance range and loss. Each
(implementation, model) runs in its own process so peak RSS is its own.

The stepdistill side is the library as users run it: ``stepdistill.trainer.Trainer`` with the registered LCM
method (``--cache_latents``, cached prompt embeddings, cond and uncond in one teacher call, the teacher = the
student's UNet with its adapters off), timed by the loop's own ``sec_per_step`` (``logs.jsonl``) after the warm-up
iterations, without the final checkpoint, output and validation grid. The example side is written out below.

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


def read_logs(output_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "logs.jsonl").read_text().splitlines() if line.strip()]


def timed_training(method_cls, argv: list[str], warmup: int, check=None) -> dict:
    """The real training loop (``stepdistill.trainer.Trainer``) for the iterations ``argv`` asks for, without the
    final checkpoint, output and validation grid (they would add to the peak RSS). Returns the loop's own
    ``sec_per_step`` of every iteration after the first ``warmup``, the generator updates among them (DMD2/SiD),
    the process's peak RSS and what ``check(trainer)`` returns (called before training)."""
    from stepdistill.config import parse_config
    from stepdistill.trainer import Trainer

    result: dict = {}

    class BenchTrainer(Trainer):
        def _save_checkpoint(self) -> None:
            pass

        def finish(self) -> Path:
            result["peak_rss_mb"], result["ru_maxrss_mb"] = peak_rss_mb()
            return self.output_dir

    trainer = BenchTrainer(parse_config(method_cls.config_class, argv), method_cls)
    if check is not None:
        result.update(check(trainer))
    trainer.train()
    logs = read_logs(trainer.output_dir)[warmup:]
    result["sec_per_step"] = [r["sec_per_step"] for r in logs]
    result["generator_updates_timed"] = sum("lr_generator" in r for r in logs)
    return result


def stepdistill_run(model: str, steps: int, batch_size: int, rank: int, warmup: int = 3) -> dict:
    """The library's LCM-LoRA training for ``warmup + steps`` iterations on the first ``batch_size`` digits."""
    from stepdistill.methods import get_method

    with tempfile.TemporaryDirectory() as out:
        argv = ["--pretrained_model_name_or_path", model, "--output_dir", out, "--train_data_dir",
                "builtin:tiny-digits", "--max_train_samples", str(batch_size), "--cache_latents", "true",
                "--train_batch_size", str(batch_size), "--max_train_steps", str(warmup + steps), "--use_lora", "true",
                "--lora_rank", str(rank), "--learning_rate", "1e-4", "--guidance_scale_min", "1",
                "--guidance_scale_max", "8", "--num_ddim_timesteps", "50", "--checkpointing_steps", "0",
                "--validation_steps", "0", "--seed", "0"]
        result = timed_training(get_method("lcm"), argv, warmup)
    timed = result.pop("sec_per_step")
    assert len(timed) == steps, (len(timed), steps)
    return {"impl": "stepdistill", "steps_per_s": len(timed) / sum(timed), "peak_rss_mb": result["peak_rss_mb"]}


def example_run(model: str, steps: int, batch_size: int, rank: int, warmup: int = 3) -> dict:
    """The LCM-LoRA step as the Diffusers example (train_lcm_distill_lora_sd_wds.py) writes it: VAE- and
    text-encode every batch, a separate frozen teacher UNet, cond and uncond as two calls, gradient clipping."""
    import torch.nn.functional as F

    from stepdistill.lora import add_lora
    from stepdistill.teacher import Teacher
    from stepdistill.toy.data import load_digits_images

    torch.manual_seed(0)
    teacher = Teacher.from_pretrained(model)
    size = teacher.default_resolution
    images = load_digits_images()[0][:batch_size] * 2 - 1
    pixels = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    prompts = [f"a handwritten digit {w}" for w in ("one", "two", "three", "four")] * (batch_size // 4 + 1)
    prompts = prompts[:batch_size]
    grid = torch.arange(1, 51) * 20 - 1  # the skipping-step grid, N = 50
    separate_teacher = copy.deepcopy(teacher.unet)
    add_lora(teacher.unet, rank, seed=0)
    unet = teacher.unet
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    tok = teacher.pipe.tokenizer

    def fscale(out, x, t):  # the example's scalings_for_boundary_conditions (sigma_data 0.5, timestep scaling 10)
        scaled = t.double() * 10
        c_skip, c_out = (0.25 / (scaled ** 2 + 0.25)).float(), (scaled / (scaled ** 2 + 0.25).sqrt()).float()
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * teacher.to_x0(out, x, t)

    def tokens(texts):
        return tok(texts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids

    def step():
        with torch.no_grad():
            z0 = teacher.encode_images(pixels)
            emb = teacher.pipe.text_encoder(tokens(prompts))[0]
            uemb = teacher.pipe.text_encoder(tokens([""] * batch_size))[0]
        t = grid[torch.randint(0, 50, (batch_size,))]
        t_prev = (t - 20).clamp(min=0)
        x = teacher.add_noise(z0, torch.randn_like(z0), t)
        w = 1 + 7 * torch.rand(batch_size)
        out = unet(x, t, emb).sample
        with torch.no_grad():
            c = separate_teacher(x, t, emb).sample
            u = separate_teacher(x, t, uemb).sample
            eps = u + w.view(-1, 1, 1, 1) * (c - u)
            x_prev = teacher.ddim_step(eps, x, t, t_prev)
            target = fscale(unet(x_prev, t_prev, emb).sample, x_prev, t_prev)
        pred = fscale(out, x, t)
        loss = (torch.sqrt((pred.float() - target.float()) ** 2 + 1e-3 ** 2) - 1e-3).mean()  # pseudo-Huber
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = time.perf_counter() - start
    return {"impl": "naive", "steps_per_s": steps / elapsed, "peak_rss_mb": peak_rss_mb()[0]}


def one_run(impl: str, model: str, steps: int, batch_size: int, rank: int) -> dict:
    return (stepdistill_run if impl == "stepdistill" else example_run)(model, steps, batch_size, rank)


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
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
                if out.returncode != 0:
                    sys.stderr.write(out.stderr[-4000:])
                    raise SystemExit(f"{impl} / {label}: the benchmark process failed (exit {out.returncode})")
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
