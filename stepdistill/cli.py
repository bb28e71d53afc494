"""The ``stepdistill`` command. Subcommands: ``train METHOD``, ``toy build|export-data|quality``, ``eval``,
``ref-stats``, ``export``, ``demo``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .errors import DEBUG_FLAG, StepdistillError, report, split_debug


def _toy_build(args) -> None:
    from .toy.build import BuildConfig, build

    cfg = BuildConfig(seed=args.seed)
    if args.fast:  # a smoke-test world: same code path, minutes → seconds, no quality promise
        cfg.vae_steps, cfg.unet_steps, cfg.classifier_steps = 30, 30, 30
    summary = build(args.output_dir, cfg)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}, indent=2))


def _toy_export(args) -> None:
    from .toy.export import export_data

    out = export_data(args.directory, seed=args.seed)
    print(f"wrote {out}/metadata.jsonl and the digit images")


def _toy_quality(args) -> None:
    from .toy.evaluate import format_table, quality_table, student_table

    _require_world(args.model)
    if args.student:
        from .recipe import Recipe

        Recipe.load(args.student)  # a clear error before any sampling
    steps = _numbers("--steps", args.steps or ("25" if args.student else "25,8,4,2"), int, "25,8,4,2")
    scales = _numbers("--guidance_scale", args.guidance_scale, float, "2,3,5")
    if args.student:
        _numbers("--student_steps", args.student_steps, int, "1,2,4")
        if args.student_guidance:
            _numbers("--student_guidance", args.student_guidance, float, "2,3,5")
    result = None
    for w in scales:  # the teacher at each guidance scale (CFG)
        part = quality_table(args.model, num_images=args.num_images, steps=steps, guidance_scale=w,
                             batch_size=args.batch_size, seed=args.seed,
                             grid_path=None if (args.student or len(scales) > 1) else args.grid)
        result = part if result is None else {**result, "rows": result["rows"] + part["rows"]}
    if args.student:
        from .evaluation import save_grid

        student_steps = [int(s) for s in args.student_steps.split(",")]
        student_scales = [float(w) for w in args.student_guidance.split(",")] if args.student_guidance else None
        rows, grid = student_table(args.model, args.student, student_steps, args.num_images, args.batch_size,
                                   args.seed, guidance_scales=student_scales)
        teachers = list(result["rows"])
        result["rows"] += rows
        for r in result["rows"]:  # against the teacher at the same guidance scale where there is one
            same = [t for t in teachers if t["guidance_scale"] == r["guidance_scale"]] or teachers
            r["fid_vs_teacher"] = r["digits_fid"] / same[0]["digits_fid"]
        if args.grid:
            from .toy.evaluate import teacher_grid_row

            teacher = [teacher_grid_row(args.model, args.seed, steps[0], w) for w in scales]
            student = list(grid.split(10))
            if len(student_steps) == 1 and student_scales == scales:  # rows: CFG at w, then the student at w
                rows_ = [r for pair in zip(teacher, student) for r in pair]
            else:
                rows_ = teacher + student
            save_grid(torch_cat(rows_), args.grid, nrow=10)
    print(format_table(result))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))


def _numbers(flag: str, text, kind: type, example: str) -> list:
    """A comma-separated list of numbers of a ``stepdistill toy quality`` option, or one line naming it."""
    try:
        values = [kind(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    least = 1 if kind is int else 0  # step counts from 1; guidance scales from 0 (unconditional)
    if not values or any(v < least for v in values):
        noun = "integers >= 1" if kind is int else "numbers >= 0"
        raise StepdistillError(f"{flag} {text}: expected comma-separated {noun}, e.g. {example}")
    return values


def torch_cat(items):
    import torch

    return torch.cat(items)


def _demo(args) -> None:
    from .demo import run_demo

    _require_world(args.model)
    run_demo(args.output_dir, model=args.model, num_images=args.num_images)


def _export(args) -> None:
    from .export import to_kohya

    out = to_kohya(args.directory, args.output, base_family=args.base_family)
    print(f"wrote {out}")


def _require_world(path: str) -> None:
    p = Path(path)
    if not (p / "model_index.json").is_file():
        raise StepdistillError(f"{path} is not a Diffusers pipeline folder; build the world with `stepdistill toy "
                               "build` or pass --model")
    if not (p / "digits_classifier.safetensors").is_file():
        raise StepdistillError(f"{path} has no digits_classifier.safetensors; it is not a tiny-digits world")


TRAIN_USAGE = "stepdistill train METHOD [--config FILE.yaml] [options] | stepdistill train --config FILE.yaml [options]"


def train_command(argv: list[str]) -> int:
    """``stepdistill train METHOD [options]``: ``train_scripts/train_<METHOD>.py`` with the same options, errors
    (one line, exit status 2) and output."""
    from .api import main as train_main
    from .methods import METHODS

    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: {TRAIN_USAGE}\n\nTrain a distillation method; METHOD is one of {', '.join(METHODS)}, msd.\n"
              "`stepdistill train METHOD --help` lists that method's options. A config that names its method (method: "
              "METHOD) or a pipeline of stages (stages: [...], README: Pipelines of stages) runs without one: "
              "`stepdistill train --config FILE.yaml --output_dir DIR`.")
        return 0
    if argv and argv[0].startswith("-") and any(a == "--config" or a.startswith("--config=") for a in argv):
        # the config names its method (method:) or its stages (stages:)
        return train_main(None, argv, prog="stepdistill train")
    if not argv or argv[0].startswith("-"):
        print(f"error: name a method first, or a config that names one: {TRAIN_USAGE}, METHOD one of "
              f"{', '.join(METHODS)}, msd", file=sys.stderr)
        return 2
    return train_main(argv[0], argv[1:], prog=f"stepdistill train {argv[0]}")


class OneLineParser(argparse.ArgumentParser):
    """A bad command line is one StepdistillError line naming the argument and the help to read, not a usage dump
    (its subcommands' parsers are of this class too: argparse makes them with the parent's class)."""

    def error(self, message: str):
        raise StepdistillError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from .toy import WORLD_DIR

    parser = OneLineParser(prog="stepdistill", description=__doc__)
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help="on bad input, also print the traceback (any command; may follow the subcommand)")
    sub = parser.add_subparsers(dest="command", required=True)
    # listed here for --help; main() hands `train ...` to train_command before this parser sees it
    sub.add_parser("train", add_help=False, usage=TRAIN_USAGE,
                   help="train a distillation method (`stepdistill train METHOD --help` lists its options)")

    toy = sub.add_parser("toy", help="the embedded tiny-digits world").add_subparsers(dest="toy_command",
                                                                                      required=True)
    p = toy.add_parser("build", help="train the tiny-digits pipeline and classifier from scratch")
    p.add_argument("--output_dir", default=str(WORLD_DIR))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fast", action="store_true", help="a few steps only, for smoke tests")
    p.set_defaults(func=_toy_build)

    p = toy.add_parser("export-data", help="write the digits as an image folder with metadata.jsonl")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_toy_export)

    p = toy.add_parser("quality", help="the teacher's quality bar: DDIM at several step counts")
    p.add_argument("--model", default=str(WORLD_DIR))
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--steps", default=None, help="teacher DDIM step counts (default 25,8,4,2; 25 with --student)")
    p.add_argument("--student", default=None, help="also evaluate this stepdistill output, loaded the stock way")
    p.add_argument("--student_steps", default="1,2,4", help="student step counts")
    p.add_argument("--student_guidance", default=None,
                   help="student guidance scales, e.g. 2,3,5 for AGD (default: the recipe's)")
    p.add_argument("--guidance_scale", default="3.0", help="teacher CFG scale(s), e.g. 2,3,5")
    p.add_argument("--batch_size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default=None, help="write one image per digit per step count as a PNG grid")
    p.add_argument("--output_json", default=None)
    p.set_defaults(func=_toy_quality)

    p = sub.add_parser("demo", help="the main job on the tiny-digits world; writes runs/demo/")
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--model", default=str(WORLD_DIR))
    p.add_argument("--num_images", type=int, default=1000)
    p.set_defaults(func=_demo)
    p = sub.add_parser("export", help="write a LoRA output as one file for other tools (kohya: A1111, ComfyUI)")
    p.add_argument("directory", help="a stepdistill output folder with a LoRA")
    p.add_argument("--format", default="kohya", choices=("kohya",), help="kohya: lora_unet_* keys with .alpha")
    p.add_argument("--output", required=True, help="the .safetensors file to write")
    p.add_argument("--base_family", default=None, choices=("sd1", "sd2", "sdxl"),
                   help="the base model family (default: read from the base model's configs)")
    p.set_defaults(func=_export)
    from .agd.cli import register as register_agd
    from .evaluation import register as register_evaluation

    register_evaluation(sub)
    register_agd(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Bad input, from the command line on, is one line on stderr (``stepdistill: error: ...``) and exit status 2;
    ``--debug`` anywhere on the command line adds the traceback."""
    argv, debug = split_debug(sys.argv[1:] if argv is None else list(argv))
    if argv[:1] == ["train"]:  # the method's own parser takes the rest (and its --help)
        return train_command(argv[1:] + ([DEBUG_FLAG] if debug else []))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except StepdistillError as e:
        return report(e, "stepdistill: error: ", debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
