"""``stepdistill agd ...``: adapter guidance distillation's own commands. ``trajectories`` samples the guided
trajectories AGD's adapters train on (``stepdistill.agd.trajectories``)."""

from __future__ import annotations

from ..errors import StepdistillError


def parse_guidance_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise StepdistillError(f"--guidance_range {text}: expected two comma-separated numbers low,high, e.g. "
                               "1,12") from None
    return lo, hi


def _trajectories(args) -> None:
    import torch

    from ..prompts import read_prompts
    from ..teacher import Teacher
    from .trajectories import TrajectorySpec, check_folder, check_settings, make_trajectories, prompts_sha256

    guidance_range = parse_guidance_range(args.guidance_range)
    check_settings(guidance_range, args.trajectory_steps, args.num_trajectories, args.batch_size, args.resolution)
    prompts = read_prompts(args.prompts_file)
    settings = {"base_model": str(args.pretrained_model_name_or_path), "prompts_sha256": prompts_sha256(prompts),
                "num_trajectories": args.num_trajectories, "guidance_range": list(guidance_range),
                "steps": args.trajectory_steps, "batch_size": args.batch_size, "seed": args.seed}
    check_folder(args.output_dir, settings)  # before loading a model; the full spec is checked again below
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Teacher.from_pretrained(args.pretrained_model_name_or_path, device=device).pipe
    spec = TrajectorySpec.for_pipeline(pipe, args.pretrained_model_name_or_path, prompts,
                                       num_trajectories=args.num_trajectories, guidance_range=guidance_range,
                                       steps=args.trajectory_steps, batch_size=args.batch_size, seed=args.seed,
                                       resolution=args.resolution)
    out = make_trajectories(pipe, prompts, args.output_dir, spec, progress=not args.no_progress)
    print(f"{spec.num_trajectories} trajectories x {args.trajectory_steps} steps in {out}")


def register(subparsers) -> None:
    """Add ``agd`` and its subcommands to the ``stepdistill`` command's subparsers."""
    agd = subparsers.add_parser("agd", help="adapter guidance distillation (AGD): its trajectories")
    commands = agd.add_subparsers(dest="agd_command", required=True)
    p = commands.add_parser("trajectories", help="sample guided (CFG) trajectories: the states AGD trains on",
                            description="Sample the base pipeline with classifier-free guidance (one w per batch, "
                                        "uniform in --guidance_range) and store every step's conditional UNet "
                                        "input, timestep, w, conditioning and CFG output. A rerun resumes.")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="base pipeline folder or hub id")
    p.add_argument("--prompts_file", required=True, help="one prompt per line; cycled through")
    p.add_argument("--output_dir", required=True, help="receives manifest.json and shard-NNNNN.safetensors")
    p.add_argument("--guidance_range", default="1,12", help="low,high of w (official on SD: 1,12)")
    p.add_argument("--trajectory_steps", type=int, default=25, help="sampler steps per trajectory")
    p.add_argument("--num_trajectories", type=int, default=500, help="trajectories to sample")
    p.add_argument("--batch_size", type=int, default=16, help="trajectories per pipeline call and shard (one w each)")
    p.add_argument("--seed", type=int, default=0, help="trajectory i starts from the noise of seed + i")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the pipeline's native size)")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_trajectories)
