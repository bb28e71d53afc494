"""Benchmark at real size: one LoRA training step of LCM and of DMD2 (batch 1) on UNets built from the real SD 1.5
and SDXL configs (``assets/real_configs``; random weights, no hub), float32 against bf16 mixed precision, through the
library's own ``Trainer`` and methods (the loop without its final checkpoint, output and validation grid:
``bench_lcm.timed_training``).

Each measured configuration runs in a fresh process and reports the peak RSS of the whole process (VmHWM, loading
included), the peak RSS of the training step alone (VmHWM reset through /proc/self/clear_refs once the models have
loaded) and the step's seconds on this CPU (the loop's own ``sec_per_step``: one step, first-call overheads
included; other jobs on the machine slow it, so the load average is printed). A second table accounts for the memory
each configuration needs: parameters (frozen ones in their dtype, trainable ones float32), gradients (float32,
trainable parameters only), AdamW states (2 x float32 per trainable parameter) and activations, and the GPU that
therefore holds it (their sum: a bound, since gradients are created while activations are freed). Activations are
measured where the configuration ran (the peak RSS once the step's forward passes are done, minus what was resident
before the step: the tensors saved for backward, the no-grad forwards' temporaries, the autocast cache and allocator
slack) and estimated from measured runs otherwise; every computed number is marked.

What runs here by default (``--measure``): SD 1.5 LCM-LoRA in float32 and bf16, and SDXL LCM-LoRA in bf16 at 512x512
(``--sdxl_resolution``; its 1024x1024 activations are the 512x512 ones x4, by pixels). DMD2 is computed: its full
float32 fake score (weights, gradients, AdamW states: 16 bytes per parameter, 12.8 GiB on SD 1.5) plus the teacher
does not fit beside other jobs in this machine's 23 GiB. Text encoders are tiny (2 layers, the real widths the UNet
reads) unless ``--text_encoder real``: prompts are encoded once before training, so the text encoders add only their
resident weights, which the accounting counts at real size (SD 1.5's CLIP-L 123M parameters; SDXL's two: 817M).

    OMP_NUM_THREADS=2 python train_scripts/bench_real_size.py
    OMP_NUM_THREADS=2 python train_scripts/bench_real_size.py --measure sd15-lcm-lora-fp32,sd15-lcm-lora-bf16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL_CONFIGS = REPO / "assets" / "real_configs"
GIB = 2 ** 30
GPUS = (24, 40, 80)
CUDA_OVERHEAD_GIB = 1.0  # CUDA context and allocator slack on a GPU, added before choosing one
# name: (model, method, mixed precision)
RUNS = {f"{model}-{method}-lora-{prec}": (model, method, {"fp32": "no", "bf16": "bf16"}[prec])
        for model in ("sd15", "sdxl") for method in ("lcm", "dmd2") for prec in ("fp32", "bf16")}
DEFAULT_MEASURE = "sd15-lcm-lora-fp32,sd15-lcm-lora-bf16,sdxl-lcm-lora-bf16"
NATIVE = {"sd15": 512, "sdxl": 1024}  # the pipelines' own resolution: UNet sample_size x VAE factor 8


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def argv_of(model_dir: str, method: str, precision: str, output_dir: str, resolution: int) -> list[str]:
    """The run's options: the method's defaults (LoRA rank 64), batch 1, one step, the digits as data (their
    captions for DMD2's prompts; their images, resized, for LCM's VAE encoding in the step)."""
    argv = ["--pretrained_model_name_or_path", model_dir, "--output_dir", output_dir, "--train_data_dir",
            "builtin:tiny-digits", "--max_train_samples", "1", "--train_batch_size", "1", "--max_train_steps", "1",
            "--checkpointing_steps", "0", "--validation_steps", "0", "--mixed_precision", precision,
            "--use_lora", "true", "--resolution", str(resolution)]
    if method == "dmd2":
        argv += ["--gan", "false"]
    return argv


# ----------------------------------------------------------------------------------------------------- accounting
def memory_of(frozen_modules: list, trainable: list) -> dict:
    """Bytes of the frozen parameters of ``frozen_modules`` (in their dtype, each storage once) and of the trainable
    parameters (float32), their gradients (float32) and AdamW states (exp_avg, exp_avg_sq: 2 x float32)."""
    train = {id(p): p for p in trainable}
    frozen = {id(p): p for m in frozen_modules for p in m.parameters() if id(p) not in train and not p.requires_grad}
    n_train = sum(p.numel() for p in train.values())
    return {"frozen_params_m": sum(p.numel() for p in frozen.values()) / 1e6, "trainable_params_m": n_train / 1e6,
            "params_bytes": sum(p.numel() * p.element_size() for p in frozen.values()) + 4 * n_train,
            "grads_bytes": 4 * n_train, "optimizer_bytes": 8 * n_train}


def text_encoder_bytes(model: str, precision: str) -> int:
    """The real-size text encoders' weights (frozen, in the weight dtype), counted on the meta device."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        path = REAL_CONFIGS / model / name / "config.json"
        if path.is_file():
            config = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("architectures", "model_type")}
            with init_empty_weights():
                total += sum(p.numel() for p in cls(CLIPTextConfig(**config)).parameters())
    return total * (2 if precision == "bf16" else 4)


def held_unets(trainer) -> int:
    from diffusers import UNet2DConditionModel

    return len({id(m) for net in list(trainer.method.networks.values()) + [trainer.teacher.unet]
                for m in net.modules() if isinstance(m, UNet2DConditionModel)})


def child(name: str, model_dir: str, resolution: int) -> dict:
    """One configuration, in this (fresh) process."""
    import torch

    from bench_lcm import timed_training  # train_scripts/ is on sys.path when this runs as a script
    from stepdistill.methods import get_method

    model, method, precision = RUNS[name]
    info: dict = {}

    def before_training(trainer) -> dict:
        teacher, networks = trainer.teacher, trainer.method.networks
        with torch.no_grad():  # weights loaded by mmap are resident only once read: read one value per page
            for module in teacher.pipe.components.values():
                for p in module.parameters() if isinstance(module, torch.nn.Module) else ():
                    p.reshape(-1)[::512].sum()
        info.update(memory_of([teacher.unet, teacher.vae], [p for n in networks for p in trainer.params[n]]))
        info.update(unets_held=held_unets(trainer), unet_dtype=str(teacher.weight_dtype)[6:],
                    unet_params_m=sum(p.numel() for n, p in teacher.unet.named_parameters() if "lora_" not in n) / 1e6,
                    vae_dtype=str(teacher.vae.dtype)[6:],
                    generator_shares_teacher=networks.get("generator") is teacher.unet if method == "dmd2" else None,
                    load_peak_kib=status_kib("VmHWM"), resident_before_step_kib=status_kib("VmRSS"))
        loss = trainer.method.loss

        def loss_and_peak(ctx):  # the peak so far once each phase's forward passes are done
            out = loss(ctx)
            info.setdefault("forward_peaks_kib", []).append(status_kib("VmHWM"))
            return out

        trainer.method.loss = loss_and_peak
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: from here on, the step's peak
        return {}

    with tempfile.TemporaryDirectory() as out:
        result = timed_training(get_method(method), argv_of(model_dir, method, precision, out, resolution), 0,
                                check=before_training)
    step_peak = result["peak_rss_mb"] * 1024  # KiB: VmHWM since the reset
    info.update(sec_per_step=result["sec_per_step"][0], step_peak_kib=step_peak, resolution=resolution,
                process_peak_kib=max(step_peak, info["load_peak_kib"]), torch_threads=torch.get_num_threads(),
                # the forward passes' peak above the resident weights: the tensors saved for backward, the no-grad
                # forwards' temporaries (teacher, target, VAE) and the autocast cache, before the first gradient and
                # optimizer state exist (LCM's step peaks there: its backward frees more than the gradients take)
                activations_bytes=(max(info["forward_peaks_kib"]) - info["resident_before_step_kib"]) * 1024)
    return info


def computed(name: str) -> dict:
    """The counts of a configuration not run here, from the same builders on the meta device (the library's
    add_lora, its VAE dtype rule; the fake score a float32 UNet)."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from stepdistill.lora import add_lora
    from stepdistill.precision import vae_dtype

    model, method, precision = RUNS[name]
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def config(sub):
        return {k: v for k, v in json.loads((REAL_CONFIGS / model / sub / "config.json").read_text()).items()
                if not k.startswith("_")}

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config("unet")).to(dtype)
        vae = AutoencoderKL.from_config(config("vae"))
        fake = UNet2DConditionModel.from_config(config("unet")) if method == "dmd2" else None
        vae.to(vae_dtype("sdxl" if model == "sdxl" else "sd", config("vae"), dtype)).requires_grad_(False)
        add_lora(unet, 64)
    trainable = [p for p in unet.parameters() if p.requires_grad] + (list(fake.parameters()) if fake else [])
    info = memory_of([unet, vae], trainable)
    info.update(unets_held=2 if fake else 1, unet_dtype=str(dtype)[6:], vae_dtype=str(vae.dtype)[6:],
                unet_params_m=sum(p.numel() for n, p in unet.named_parameters() if "lora_" not in n) / 1e6,
                generator_shares_teacher=True if fake else None, computed=True)
    return info


def native_activations(name: str, rows: dict) -> float | None:
    """A measured configuration's activations at its model's own resolution (x pixels from a smaller one)."""
    r = rows.get(name)
    if r is None or r.get("computed"):
        return None
    return r["activations_bytes"] * (NATIVE[RUNS[name][0]] / r["resolution"]) ** 2


def estimate_activations(name: str, rows: dict) -> tuple[float | None, str]:
    """Activations at the model's own resolution: measured (scaled by pixels where measured smaller), else a measured
    configuration of the same model (the same method first) times the ratios measured on SD 1.5 between the
    precisions, and between the methods (DMD2 ~ LCM where SD 1.5's DMD2 did not run: each phase of its step holds
    one UNet forward with gradient at batch 1, as LCM's student does)."""
    model, method, precision = RUNS[name]
    prec = "fp32" if precision == "no" else "bf16"
    r = rows[name]
    if not r.get("computed"):
        scale = (NATIVE[model] / r["resolution"]) ** 2
        note = "measured" if scale == 1 else f"measured at {r['resolution']}px, x{scale:g} for {NATIVE[model]}px"
        return r["activations_bytes"] * scale, note
    for anchor_method in dict.fromkeys((method, "lcm")):
        for anchor_prec in dict.fromkeys((prec, "bf16" if prec == "fp32" else "fp32")):
            anchor = f"{model}-{anchor_method}-lora-{anchor_prec}"
            value = native_activations(anchor, rows)
            if value is None:
                continue
            notes = [f"estimated: {anchor}"]
            if anchor_prec != prec:
                num, den = (native_activations(f"sd15-{anchor_method}-lora-{p}", rows) for p in (prec, anchor_prec))
                if not num or not den:
                    continue
                value, _ = value * num / den, notes.append(f"x SD1.5 {prec}/{anchor_prec} {num / den:.2f}")
            if anchor_method != method:
                num, den = (native_activations(f"sd15-{m}-lora-{prec}", rows) for m in (method, anchor_method))
                ratio = num / den if num and den else 1.0
                notes.append(f"x {method}/{anchor_method} {ratio:.2f}" + ("" if num and den else " (assumed)"))
                value *= ratio
            return value, " ".join(notes)
    return None, "not estimated (no measured configuration to scale)"


# ----------------------------------------------------------------------------------------------------- main
def gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.2f}"


def fits(total_bytes) -> str:
    if total_bytes is None:
        return "?"
    need = total_bytes / GIB + CUDA_OVERHEAD_GIB
    return next((f"{g} GB" for g in GPUS if need <= g), "> 80 GB")  # 24/40/80 GB cards hold that many GiB


def run_child(name: str, model_dir: Path, resolution: int) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error"}
    proc = subprocess.run([sys.executable, __file__, "--_child", name, str(model_dir), str(resolution)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{name}: the benchmark process failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", default=DEFAULT_MEASURE,
                        help=f"configurations to run here (the others are computed); any of {', '.join(RUNS)}")
    parser.add_argument("--sdxl_resolution", type=int, default=512,
                        help="resolution of the measured SDXL runs (1024: its own; 512 keeps a step within minutes "
                             "on a CPU)")
    parser.add_argument("--work_dir", default=os.path.join(tempfile.gettempdir(), "stepdistill-bench-real"),
                        help="where the random-weight pipeline folders are built (reused)")
    parser.add_argument("--text_encoder", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the rows to this JSON file")
    parser.add_argument("--_child", nargs=3, metavar=("NAME", "MODEL_DIR", "RESOLUTION"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        name, model_dir, resolution = args._child
        print(json.dumps(child(name, model_dir, int(resolution))))
        return
    measure = [m for m in args.measure.split(",") if m]
    unknown = [m for m in measure if m not in RUNS]
    if unknown:
        parser.error(f"unknown configurations {unknown}; choose from {', '.join(RUNS)}")

    from stepdistill.testing import build_pipeline_from_configs

    rows: dict[str, dict] = {}
    for name, (model, _, _) in RUNS.items():
        if name not in measure:
            rows[name] = computed(name)
            continue
        folder = build_pipeline_from_configs(Path(args.work_dir) / f"{model}-{args.text_encoder}",
                                             REAL_CONFIGS / model, text_encoder=args.text_encoder)
        resolution = args.sdxl_resolution if model == "sdxl" else NATIVE[model]
        rows[name] = r = run_child(name, folder, resolution)
        print(f"{name} at {resolution}px: {r['sec_per_step']:.1f} s/step, peak {r['process_peak_kib'] / 2 ** 20:.2f} "
              f"GiB (the step {r['step_peak_kib'] / 2 ** 20:.2f} GiB)", file=sys.stderr, flush=True)
    for name, r in rows.items():
        r["activations_native_bytes"], r["activations_note"] = estimate_activations(name, rows)
        r["text_encoders_bytes"] = text_encoder_bytes(RUNS[name][0], RUNS[name][2])
        parts = [r[k] for k in ("params_bytes", "text_encoders_bytes", "grads_bytes", "optimizer_bytes",
                                "activations_native_bytes")]
        r["total_bytes"] = None if None in parts else sum(parts)

    threads = next((r["torch_threads"] for r in rows.values() if "torch_threads" in r), None)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n### Measured on this CPU ({os.cpu_count()} cores, torch threads {threads}, load average {load}; batch 1, "
          f"LoRA rank 64, one step; text encoders {args.text_encoder})\n")
    print("| configuration | resolution | UNet / VAE dtype | UNets held | s/step | peak RSS, whole process (GiB) | "
          "peak RSS, the step (GiB) | bf16 / fp32 peak (process, step) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        if r.get("computed"):
            continue
        ratio = "-"
        fp32 = rows.get(name.replace("-bf16", "-fp32"))
        if name.endswith("-bf16") and fp32 and not fp32.get("computed") and fp32["resolution"] == r["resolution"]:
            ratio = (f"**{r['process_peak_kib'] / fp32['process_peak_kib']:.2f}x**, "
                     f"{r['step_peak_kib'] / fp32['step_peak_kib']:.2f}x")
        print(f"| {name} | {r['resolution']} | {r['unet_dtype']} / {r['vae_dtype']} | {r['unets_held']} | "
              f"{r['sec_per_step']:.0f} | {r['process_peak_kib'] / 2 ** 20:.2f} | {r['step_peak_kib'] / 2 ** 20:.2f} | "
              f"{ratio} |")
    print("\n### Memory each configuration needs at its own resolution (GiB; frozen parameters in their dtype, "
          "trainable ones float32; text encoders at real size; AdamW: 2 float32 states per trainable parameter)\n")
    print("| configuration | numbers | frozen / trainable params (M) | parameters | text encoders | gradients | "
          "optimizer | activations | total | fits (+1 GiB CUDA context) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        source = "computed" if r.get("computed") else "counted in the run"
        print(f"| {name} | {source} | {r['frozen_params_m']:.0f} / {r['trainable_params_m']:.1f} | "
              f"{gib(r['params_bytes'])} | {gib(r['text_encoders_bytes'])} | {gib(r['grads_bytes'])} | "
              f"{gib(r['optimizer_bytes'])} | {gib(r['activations_native_bytes'])} ({r['activations_note']}) | "
              f"{gib(r['total_bytes'])} | {fits(r['total_bytes'])} |")
    print("\nDMD2 with a LoRA generator holds 2 UNets (the teacher's, carrying the generator's LoRA, which is also the "
          "real score with its adapters off; the fake score) where a separate frozen teacher would hold 3:")
    for name, r in rows.items():
        if RUNS[name][1] == "dmd2":
            unet_bytes = r["unet_params_m"] * 1e6 * (2 if RUNS[name][2] == "bf16" else 4)
            print(f"- {name}: UNets held {r['unets_held']}, the generator is the teacher's UNet: "
                  f"{r['generator_shares_teacher']}; a separate teacher copy would add {gib(unet_bytes)} GiB "
                  f"({r['unet_dtype']})")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
