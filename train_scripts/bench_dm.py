"""Benchmark: DMD2 and SiD with a LoRA generator, time per training iteration and peak memory, for two ways of holding
the real score (the frozen teacher):

  shared         the LoRA generator sits on the teacher's own UNet and the real score is that UNet with its adapters
                 disabled (``DistillationMethod.teacher_mode``), so the frozen teacher is held once (stepdistill);
  separate copy  the same LoRA generator, but the real score is a separate frozen deep copy of the teacher UNet made
                 before the LoRA is added (what a straightforward implementation does; defined here only).

The fake score is a full trainable copy of the teacher in both. Everything else is the real training loop
(``stepdistill.trainer.Trainer``) on the options of ``train_scripts/configs/tiny_digits/{dmd2,sid}.yaml`` with
``use_lora: true``, the GAN off (a clean comparison: the GAN only adds work to the fake score's phase, the same in
both variants) and data-free prompts from ``assets/prompts/tiny-digits-train.txt``. The first ``--warmup``
iterations are not timed; s/iteration is the mean over the timed ones (DMD2 updates its generator only every 5th
iteration, as in the config, so keep --steps a multiple of 5). Each (variant, method, model) runs in its own process
so its peak RSS is its own: VmHWM, not ru_maxrss, which on Linux inherits the parent's peak at exec (see
``peak_rss_mb``). Before training, each run checks that its variant holds the UNets it should (the copy variant one
more UNet than the shared one).

    OMP_NUM_THREADS=1 python train_scripts/bench_dm.py --steps 10 --batch_size 16
    OMP_NUM_THREADS=1 python train_scripts/bench_dm.py --models tiny --steps 20 --json runs/bench_dm.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
WORLD = REPO / "assets" / "tiny-digits-sd"
CONFIGS = REPO / "train_scripts" / "configs" / "tiny_digits"
PROMPTS = REPO / "assets" / "prompts" / "tiny-digits-train.txt"
VARIANTS = ("shared", "copy")
VARIANT_LABELS = {"shared": "LoRA, teacher shared (adapters off)", "copy": "LoRA + separate frozen teacher copy"}
MODEL_LABELS = {"tiny": "tiny-digits UNet (8x8 latents)", "wider": "wider UNet (16x16 latents, 65M params)"}


# ----------------------------------------------------------------------------------------------------- variants
def method_class(method: str, variant: str):
    """DMD2 or SiD as the library builds it ("shared"), or a subclass whose real score is a separate frozen copy."""
    from stepdistill.methods import get_method

    base = get_method(method)
    if variant == "shared":
        return base
    if variant != "copy":
        raise ValueError(f"unknown variant {variant!r}")

    class SeparateCopy(base):
        """The real score is a frozen ``copy.deepcopy`` of the teacher UNet. ``DistributionMatching.build`` copies
        the fake score first and then calls ``make_student``, which adds the LoRA in place: the copy is taken just
        before that, so it is the plain teacher."""

        def make_student(self) -> nn.Module:
            self.real_unet = copy.deepcopy(self.teacher.unet).requires_grad_(False)
            return super().make_student()

        @contextlib.contextmanager
        def teacher_mode(self):
            yield self.real_unet

    SeparateCopy.__name__ = SeparateCopy.__qualname__ = f"{base.__name__}SeparateCopy"
    return SeparateCopy


def config_argv(method: str, model: str | Path, output_dir: str | Path, batch_size: int, max_train_steps: int,
                rank: int) -> list[str]:
    """The tiny-digits config of ``method`` as command-line options, with a LoRA generator, the GAN off, data-free
    prompts and no checkpoints, validation or EMA."""
    import yaml

    options = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())
    for key in ("method", "train_data_dir", "cache_latents", "validation_prompts", "generator_ema_decay"):
        options.pop(key, None)  # no images (the GAN is off); EMA needs a full generator
    options.update(pretrained_model_name_or_path=str(model), output_dir=str(output_dir), use_lora=True,
                   lora_rank=rank, gan=False, prompts_file=str(PROMPTS), train_batch_size=batch_size,
                   max_train_steps=max_train_steps, checkpointing_steps=0, validation_steps=0, lr_warmup_steps=0)
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return argv


def build_method(method: str, variant: str, argv: list[str]):
    """The method object of one variant on the teacher named in ``argv`` (no trainer, no data)."""
    from stepdistill.config import parse_config
    from stepdistill.teacher import Teacher
    from stepdistill.preflight import check_resolution

    cls = method_class(method, variant)
    config = parse_config(cls.config_class, argv)
    check_resolution(config)
    torch.manual_seed(config.seed)
    return cls(config, Teacher.from_pretrained(config.pretrained_model_name_or_path))


def held_unets(method) -> list[nn.Module]:
    """Every distinct UNet the method and its teacher keep a reference to (inside the fake score too)."""
    from diffusers import UNet2DConditionModel

    roots: list = []
    for owner in (method, method.teacher):
        for value in vars(owner).values():
            roots += list(value.values()) if isinstance(value, dict) else [value]
    found: dict[int, nn.Module] = {}
    for root in roots:
        if isinstance(root, nn.Module):
            for module in root.modules():
                if isinstance(module, UNet2DConditionModel):
                    found[id(module)] = module
    return list(found.values())


def held_parameters(unets: list[nn.Module]) -> int:
    """Parameter elements of those UNets, each storage counted once (LoRA weights included)."""
    seen: dict[int, int] = {}
    for unet in unets:
        for p in unet.parameters():
            seen[p.data_ptr()] = p.numel()
    return sum(seen.values())


def check_variant(method, variant: str) -> dict:
    """Assert the variant holds what it should: shared, two UNets (teacher+LoRA generator, fake score) and the real
    score IS the generator's UNet; copy, a third UNet, frozen, without adapters, that is the real score."""
    unets = held_unets(method)
    generator = method.networks["generator"]
    with method.teacher_mode() as real:
        real_score = real
    base = sum(p.numel() for n, p in method.networks["fake_score"].unet.named_parameters())
    lora = sum(p.numel() for p in generator.parameters() if p.requires_grad)
    if variant == "shared":
        assert real_score is generator is method.teacher.unet, "shared: the real score must be the generator's UNet"
        assert len(unets) == 2, f"shared: expected 2 UNets held, found {len(unets)}"
        assert held_parameters(unets) == 2 * base + lora
    else:
        assert real_score is not generator and real_score is method.real_unet, "copy: the real score is the copy"
        assert not getattr(real_score, "_hf_peft_config_loaded", False), "copy: the real score carries no LoRA"
        assert not any(p.requires_grad for p in real_score.parameters()), "copy: the real score is frozen"
        assert len(unets) == 3, f"copy: expected 3 UNets held, found {len(unets)}"
        assert held_parameters(unets) == 3 * base + lora
    return {"unets_held": len(unets), "unet_params_m": held_parameters(unets) / 1e6, "unet_base_params_m": base / 1e6,
            "lora_params_m": lora / 1e6}


# ----------------------------------------------------------------------------------------------------- one run
def one_run(method: str, variant: str, model: str, steps: int, warmup: int, batch_size: int, rank: int) -> dict:
    from bench_lcm import timed_training  # train_scripts/ is on sys.path when this runs as a script

    with tempfile.TemporaryDirectory() as out:
        argv = config_argv(method, model, out, batch_size, warmup + steps, rank)
        result = timed_training(method_class(method, variant), argv, warmup,
                                check=lambda trainer: check_variant(trainer.method, variant))
    timed = result.pop("sec_per_step")
    assert len(timed) == steps, (len(timed), steps)
    return {"method": method, "variant": variant, "s_per_iteration": sum(timed) / len(timed),
            "s_per_iteration_median": sorted(timed)[len(timed) // 2], "timed_iterations": steps, **result}


def _child(method: str, variant: str, model: str, args) -> dict:
    cmd = [sys.executable, __file__, "--_child", method, variant, model, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch_size", str(args.batch_size), "--rank", str(args.rank)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{method} / {variant} / {model}: the benchmark process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed iterations per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before them")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the generator")
    parser.add_argument("--models", nargs="+", choices=tuple(MODEL_LABELS), default=list(MODEL_LABELS))
    parser.add_argument("--methods", nargs="+", choices=("dmd2", "sid"), default=["dmd2", "sid"])
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows to this JSON file")
    parser.add_argument("--_child", nargs=3, metavar=("METHOD", "VARIANT", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    if args._child:
        method, variant, model = args._child
        print(json.dumps(one_run(method, variant, model, args.steps, args.warmup, args.batch_size, args.rank)))
        return

    rows, ratios = [], []
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"tiny": str(WORLD)}
        if "wider" in args.models:
            from bench_lcm import larger_pipeline  # train_scripts/ is on sys.path when this runs as a script

            paths["wider"] = str(larger_pipeline(Path(tmp) / "larger"))
        for model in args.models:
            for method in args.methods:
                pair = {}
                for variant in VARIANTS:
                    r = _child(method, variant, paths[model], args)
                    r.update(model=model, model_label=MODEL_LABELS[model], generator=VARIANT_LABELS[variant])
                    print(f"{method} {model} {variant}: {r['s_per_iteration']:.3f} s/it, "
                          f"{r['peak_rss_mb']:.0f} MB peak RSS, {r['unets_held']} UNets held", file=sys.stderr)
                    pair[variant] = r
                    rows.append(r)
                s, c = pair["shared"], pair["copy"]
                assert c["unets_held"] == s["unets_held"] + 1, "the copy variant must hold exactly one more UNet"
                assert abs(c["unet_params_m"] - s["unet_params_m"] - s["unet_base_params_m"]) < 1e-6
                ratios.append({"method": method, "model": model,
                               "time_shared_over_copy": s["s_per_iteration"] / c["s_per_iteration"],
                               "rss_shared_over_copy": s["peak_rss_mb"] / c["peak_rss_mb"],
                               "rss_saved_mb": c["peak_rss_mb"] - s["peak_rss_mb"],
                               "unet_weights_mb": s["unet_base_params_m"] * 1e6 * 4 / 2 ** 20})

    print(f"\nDMD2 / SiD with a LoRA generator (rank {args.rank}), batch {args.batch_size}, GAN off, "
          f"{args.steps} timed iterations after {args.warmup} warm-up, torch threads {torch.get_num_threads()}\n")
    print("| method | model | generator | UNets held (M params) | s/iteration | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for ratio in ratios:
        for r in rows:
            if (r["method"], r["model"]) == (ratio["method"], ratio["model"]):
                print(f"| {r['method']} | {r['model_label']} | {r['generator']} | {r['unets_held']} "
                      f"({r['unet_params_m']:.1f}) | {r['s_per_iteration']:.3f} | {r['peak_rss_mb']:.0f} |")
        print(f"| {ratio['method']} | {MODEL_LABELS[ratio['model']]} | **ratio shared / copy** | | "
              f"**{ratio['time_shared_over_copy']:.2f}x** | **{ratio['rss_shared_over_copy']:.2f}x** "
              f"({ratio['rss_saved_mb']:+.0f} MB saved; one UNet's fp32 weights: {ratio['unet_weights_mb']:.0f} MB) |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("steps", "warmup", "batch_size", "rank", "models", "methods")}
        Path(args.json).write_text(json.dumps({"settings": {**settings, "torch_threads": torch.get_num_threads()},
                                               "rows": rows, "ratios": ratios}, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
