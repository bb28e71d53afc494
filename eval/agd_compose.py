"""AGD adapters beside a step-distilled LoRA of the same base (TSCD or LCM-LoRA): does guidance control survive at
few steps? Scores the LoRA student alone (guidance 1, its recipe's scheduler) and with the AGD adapters at several
guidance scales, on the tiny-digits held-out prompts, UNet evaluations counted by a hook.

    python eval/agd_compose.py --agd runs/agd --lora runs/tscd --steps 4 --guidance 1,2,3,5
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stepdistill  # noqa: E402
from stepdistill.toy import WORLD_DIR  # noqa: E402
from stepdistill.toy.evaluate import DigitsJudge, format_table, score_pipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agd", required=True)
    parser.add_argument("--lora", required=True, help="a LoRA output (TSCD, LCM-LoRA) of the same base")
    parser.add_argument("--model", default=str(WORLD_DIR))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--guidance", default="1,2,3,5")
    parser.add_argument("--num_images", type=int, default=1000)
    args = parser.parse_args()
    from diffusers import StableDiffusionPipeline

    judge = DigitsJudge.from_world(args.model)
    lora = stepdistill.Recipe.load(args.lora)
    kwargs = {**lora.call_kwargs(), "num_inference_steps": args.steps}
    kwargs.pop("timesteps", None)
    rows = []
    pipe = stepdistill.load(StableDiffusionPipeline.from_pretrained(args.model), args.lora)
    scores, _ = score_pipeline(pipe, judge, {**kwargs, "guidance_scale": 1.0}, num_images=args.num_images)
    rows.append({"sampler": f"{lora.method} alone", "steps": args.steps, "guidance_scale": 1.0, **scores})
    # AGD first (it sets its own scheduler), then the LoRA and its scheduler
    pipe = stepdistill.load(StableDiffusionPipeline.from_pretrained(args.model), args.agd)
    pipe = stepdistill.load(pipe, args.lora)
    for w in (float(v) for v in args.guidance.split(",")):
        scores, _ = score_pipeline(pipe, judge, {**kwargs, "guidance_scale": w}, num_images=args.num_images)
        rows.append({"sampler": f"{lora.method} + AGD", "steps": args.steps, "guidance_scale": w, **scores})
    print(format_table({"rows": rows, "real_vs_real_fid": judge.real_vs_real_fid(0)}))


if __name__ == "__main__":
    main()
