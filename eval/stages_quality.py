"""Before and after a distribution-matching stage: the TSCD LoRA of a ``tscd_then_dm.yaml`` pipeline (its first
stage) and the refined LoRA (the pipeline's output), each at 1, 2 and 4 steps on the tiny-digits world, with
digits-FID, its ratio to the teacher's (25 DDIM steps, CFG 3), prompt agreement and NFE.

Both LoRAs are sampled the stock way (``stepdistill.load``: ``load_lora_weights`` + a recipe's scheduler) with both
samplers: TSCD's (trailing DDIM, any step count) and the DM stage's (``LCMScheduler`` at its trained timesteps, one
step). A sampler is applied to the other stage's LoRA through a folder holding that LoRA and that recipe
(``PIPELINE/quality/``), so every row is what a user gets with ``pipe.load_lora_weights`` and that recipe.

    stepdistill train --config train_scripts/configs/tiny_digits/tscd_then_dm.yaml --output_dir runs/tscd_then_dm
    python eval/stages_quality.py runs/tscd_then_dm [--num_images 1000] [--output_json runs/tscd_then_dm/quality.json]

The bar (issue 17): the refined LoRA at one step (its own recipe) at most 1.0x the teacher's digits-FID.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # running the file directly puts eval/ on sys.path, not the repository root

BAR = 1.0


def view(folder: Path, weights_from: Path, recipe_from: Path) -> Path:
    """A stepdistill output folder holding the LoRA of ``weights_from`` and the recipe of ``recipe_from``."""
    from stepdistill.lora import LORA_WEIGHTS_NAME
    from stepdistill.recipe import RECIPE_NAME

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    shutil.copy(weights_from / LORA_WEIGHTS_NAME, folder / LORA_WEIGHTS_NAME)
    shutil.copy(recipe_from / RECIPE_NAME, folder / RECIPE_NAME)
    return folder


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pipeline", type=Path, help="the --output_dir of a tscd_then_dm.yaml pipeline")
    parser.add_argument("--model", default=str(REPO / "assets" / "tiny-digits-sd"), help="the tiny-digits world")
    parser.add_argument("--steps", default="1,2,4", help="step counts of the trailing-DDIM rows")
    parser.add_argument("--num_images", type=int, default=1000)
    parser.add_argument("--batch_size", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_json", default=None)
    args = parser.parse_args(argv)

    from stepdistill.recipe import Recipe
    from stepdistill.toy.evaluate import DigitsJudge, quality_table, student_table

    record = json.loads((args.pipeline / "stages.json").read_text())
    stages = record["stages"]
    if not record.get("final") or len(stages) < 2:
        raise SystemExit(f"{args.pipeline}: not a finished pipeline of two or more stages (stages.json)")
    before, after = Path(stages[0]["dir"]), args.pipeline
    if not before.is_absolute() and not before.exists():
        before = args.pipeline / "stages" / before.name
    steps = [int(s) for s in args.steps.split(",")]
    one_step = Recipe.load(after)
    teacher = quality_table(args.model, num_images=args.num_images, steps=[25], guidance_scale=3.0,
                            batch_size=args.batch_size, seed=args.seed)
    teacher_fid = teacher["rows"][0]["digits_fid"]
    judge = DigitsJudge.from_world(args.model)
    work = args.pipeline / "quality"
    settings = [  # (LoRA, sampler, folder, steps)
        ("TSCD LoRA (stage 0)", f"{stages[0]['method']} recipe: trailing DDIM", before, steps),
        ("TSCD LoRA (stage 0)", f"{one_step.method} recipe: {one_step.scheduler} {one_step.timesteps}",
         view(work / "tscd_lora-dm_sampler", before, after), [len(one_step.timesteps or [1])]),
        ("refined LoRA (output)", f"{one_step.method} recipe: {one_step.scheduler} {one_step.timesteps}", after,
         [len(one_step.timesteps or [1])]),
        ("refined LoRA (output)", f"{stages[0]['method']} recipe: trailing DDIM",
         view(work / "refined_lora-tscd_sampler", after, before), steps),
    ]
    rows = []
    for lora, sampler, folder, counts in settings:
        found, _ = student_table(args.model, folder, counts, args.num_images, args.batch_size, args.seed,
                                 judge=judge, progress=False)
        for r in found:
            rows.append({"lora": lora, "sampler": sampler, "steps": r["steps"], "nfe": r["nfe"],
                         "digits_fid": r["digits_fid"], "fid_vs_teacher": r["digits_fid"] / teacher_fid,
                         "prompt_agreement": r["prompt_agreement"]})
            print(f"{lora}, {sampler}, {r['steps']} steps: digits-FID {r['digits_fid']:.3f} "
                  f"({r['digits_fid'] / teacher_fid:.2f}x)", flush=True)
    lines = [f"Teacher (DDIM 25 steps, CFG 3): digits-FID {teacher_fid:.3f}; {args.num_images} images per row.", "",
             "| LoRA | sampler | steps | NFE | digits-FID | FID / teacher | prompt agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['lora']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['digits_fid']:.3f} | "
                     f"{r['fid_vs_teacher']:.2f}x | {100 * r['prompt_agreement']:.1f} % |")
    refined = next(r for r in rows if r["lora"].startswith("refined") and r["sampler"].startswith(one_step.method))
    verdict = "met" if refined["fid_vs_teacher"] <= BAR else "not met"
    lines += ["", f"One step, refined LoRA: {refined['fid_vs_teacher']:.2f}x the teacher's digits-FID "
                  f"(bar <= {BAR:.1f}x: {verdict})."]
    print("\n".join(lines))
    result = {"teacher_fid": teacher_fid, "num_images": args.num_images, "rows": rows, "bar": BAR,
              "one_step_ratio": refined["fid_vs_teacher"], "bar_met": verdict == "met"}
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
