"""UNet weight copies and trainable parameters of DMD2 / SiD's networks with a full or a LoRA fake score
(--fake_score_lora_rank), and a rough memory bound for the weights and their optimiser state.

  tiny   the tiny-digits teacher; the copies are also measured on DMD2 as training builds it (distinct base-weight
         tensors the teacher and the networks hold, over one UNet's count).
  sd15, sd21, sdxl   from the published UNet configs (below), on the meta device: no weights are read.

Memory: frozen base weights at --frozen_bytes per parameter (2: bf16/fp16; the trainer today keeps the base in
float32, 4); every trainable parameter at 16 bytes (float32 weight, gradient, AdamW's two moments). Activations,
the VAE and the text encoders are not counted.

    OMP_NUM_THREADS=1 python eval/dm_params.py [--models tiny,sd15,sdxl] [--lora_rank 64] [--fake_score_lora_rank 64]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.lora import FAKE_SCORE_ADAPTER, add_lora, add_second_lora  # noqa: E402
from stepdistill.methods.networks import GANHead  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
_SD = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
           block_out_channels=[320, 640, 1280, 1280],
           down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
# unet/config.json of stable-diffusion-v1-5, stable-diffusion-2-1 and stable-diffusion-xl-base-1.0 (the fields
# that set the parameter count); resolution: their native one (latent = resolution / 8)
CONFIGS = {
    "sd15": (dict(_SD, cross_attention_dim=768, attention_head_dim=8), 512),
    "sd21": (dict(_SD, sample_size=96, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20],
                  use_linear_projection=True), 768),
    "sdxl": (dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=32,
                  block_out_channels=[320, 640, 1280], transformer_layers_per_block=[1, 2, 10],
                  down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                  up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                  cross_attention_dim=2048, attention_head_dim=[5, 10, 20], use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816), 1024),
}
SETUPS = (  # (generator, fake score)
    ("LoRA", "full copy"), ("LoRA", "LoRA"), ("full", "full copy"), ("full", "LoRA"))


def numel(params) -> int:
    return sum(p.numel() for p in params)


def from_config(config: dict):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def account(unet_factory, latent: int, generator: str, fake: str, rank: int, fake_rank: int, gan: bool) -> dict:
    """Build the networks the way DistributionMatching.build does and count what they hold."""
    teacher = unet_factory()
    base = numel(teacher.parameters())
    nets: dict[str, list] = {}
    copies = 1  # the teacher
    if fake == "full copy":
        fake_unet = copy.deepcopy(teacher)
        nets["fake_score"] = list(fake_unet.parameters())
        copies += 1
    if generator == "LoRA":
        add_lora(teacher, rank, seed=0)
        nets["generator"] = [p for n, p in teacher.named_parameters() if ".default." in n]
    else:
        nets["generator"] = list(copy.deepcopy(teacher).parameters())
        copies += 1
    if fake == "LoRA":
        add_second_lora(teacher, FAKE_SCORE_ADAPTER, fake_rank, seed=1)
        nets["fake_score"] = [p for n, p in teacher.named_parameters() if f".{FAKE_SCORE_ADAPTER}." in n]
    if gan:
        nets["fake_score"] += list(GANHead.for_unet(teacher, latent).parameters())
    trainable = {k: numel(v) for k, v in nets.items()}
    return {"base": base, "copies": copies, "trainable": trainable}


def measured_copies(generator: str, fake: str, rank: int, fake_rank: int) -> float:
    """DMD2 on the tiny-digits teacher as the trainer builds it: the distinct non-LoRA UNet tensors reachable from
    the teacher and the networks, over one UNet's parameter count."""
    from stepdistill.config import parse_config
    from stepdistill.methods.dmd2 import DMD2
    from stepdistill.teacher import Teacher

    argv = ["--pretrained_model_name_or_path", str(REPO / "assets" / "tiny-digits-sd"), "--prompts_file",
            str(REPO / "assets" / "prompts" / "tiny-digits-train.txt"), "--use_lora", str(generator == "LoRA"),
            "--lora_rank", str(rank), "--fake_score_lora_rank", str(fake_rank if fake == "LoRA" else 0),
            "--resolution", "64"]
    config = parse_config(DMD2.config_class, argv)
    method = DMD2(config, Teacher.from_pretrained(config.pretrained_model_name_or_path))
    modules = [method.teacher.unet] + [getattr(n, "shared_unet", n) for n in method.networks.values()]
    held = {}
    for module in modules:
        for name, p in module.named_parameters():
            if "lora_" not in name and not name.startswith("head."):
                held[id(p)] = p.numel()
    one = numel(p for n, p in method.teacher.unet.named_parameters() if "lora_" not in n)
    return sum(held.values()) / one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny,sd15,sdxl")
    parser.add_argument("--lora_rank", type=int, default=64, help="the generator's LoRA rank")
    parser.add_argument("--fake_score_lora_rank", type=int, default=64)
    parser.add_argument("--tiny_ranks", default="16,16", help="generator,fake LoRA ranks on the tiny UNet "
                                                            "(rank 64 is above full rank there)")
    parser.add_argument("--frozen_bytes", type=float, default=2.0)
    parser.add_argument("--no_gan", action="store_true")
    args = parser.parse_args()

    print("UNet weight copies: the teacher's, plus one per full network (a LoRA sits on the teacher's); memory: "
          f"frozen base {args.frozen_bytes:g} B/param, trainable 16 B/param, no activations")
    print("| model | generator | fake score | UNet weight copies | trainable: generator | trainable: fake score "
          "(+ GAN head) | weights + grads + AdamW, GB |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        if model == "tiny":
            from diffusers import UNet2DConditionModel

            def factory():
                return UNet2DConditionModel.from_pretrained(REPO / "assets" / "tiny-digits-sd" / "unet")

            latent = 8
            rank, fake_rank = map(int, args.tiny_ranks.split(","))
        else:
            config, resolution = CONFIGS[model]

            def factory(config=config):
                return from_config(config)

            latent = resolution // 8
            rank, fake_rank = args.lora_rank, args.fake_score_lora_rank
        for generator, fake in SETUPS:
            a = account(factory, latent, generator, fake, rank, fake_rank, not args.no_gan)
            if model == "tiny":
                measured = measured_copies(generator, fake, rank, fake_rank)
                assert measured == a["copies"], (generator, fake, measured, a["copies"])
            # frozen base copies: the teacher always; a full network's copy is trainable, not frozen
            full = sum(1 for k in a["trainable"] if (k == "generator" and generator == "full")
                       or (k == "fake_score" and fake == "full copy"))
            frozen = (a["copies"] - full) * a["base"]
            train = sum(a["trainable"].values())
            gb = (frozen * args.frozen_bytes + train * 16) / 1e9
            g = f"LoRA r{rank}" if generator == "LoRA" else "full"
            f = f"LoRA r{fake_rank}" if fake == "LoRA" else "full copy"
            print(f"| {model} ({a['base'] / 1e6:.1f}M) | {g} | {f} | {a['copies']} | "
                  f"{a['trainable']['generator'] / 1e6:.2f}M | {a['trainable']['fake_score'] / 1e6:.2f}M | {gb:.3g} |")


if __name__ == "__main__":
    main()
