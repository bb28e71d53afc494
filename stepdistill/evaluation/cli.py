"""The arguments of ``stepdistill eval`` and ``stepdistill ref-stats`` (also ``eval/evaluate.py`` and
``eval/ref_stats.py``) and their registration on the ``stepdistill`` command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .clip import CLIP_PROTOCOLS
from .extractors import DEFAULT_FID_RESIZE, FID_RESIZES
from .images import CROP_LANCZOS, RESIZE_RULES, canonical_preprocess
from .pipeline import DTYPES
from .protocol import METRICS_NAME
from .ref_stats import run_ref_stats
from .registry import extractors, metrics
from .run import run_eval
from .shard import is_main_process


def _add_extractor_args(parser) -> None:
    names = ", ".join(repr(name) for name in extractors())
    parser.add_argument("--fid_extractor", default="inception",
                        help=f"FID features: one of {names} ('inception': 2048-d, needs torch-fidelity) or "
                             "MODULE:CALLABLE returning an nn.Module that maps uint8 (N,3,H,W) images to (N,D) "
                             "features")
    parser.add_argument("--inception_weights", default=None,
                        help="local pt_inception-2015-12-05 weights (.pth state dict, read with weights_only=True, or "
                             ".safetensors; otherwise torch-fidelity downloads them)")
    parser.add_argument("--fid_resize", choices=list(FID_RESIZES), default=DEFAULT_FID_RESIZE,
                        help="Inception's resize to 299: 'torchmetrics' (torch bilinear with antialias, torchmetrics' "
                             "default), 'legacy_tf' (TensorFlow 1.x bilinear, the original FID code) or 'clean' "
                             "(clean-fid: PIL bicubic in float, what GigaGAN/DMD2/SiD-LSG report)")
    for spec in extractors().values():
        if spec.add_arguments is not None:
            spec.add_arguments(parser)
    parser.add_argument("--preprocess", type=canonical_preprocess, choices=sorted(RESIZE_RULES), default="none",
                        help=f"'{CROP_LANCZOS}' (old name 'clean'): center crop + PIL Lanczos to 256 for real and "
                             "generated images, the COCO-2014 image step of GigaGAN/DMD2/SiD-LSG")


def _add_run_args(parser) -> None:
    parser.add_argument("--batch_size", type=int, default=64, help="images per pipeline call and per scoring step")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``stepdistill eval`` / ``eval/evaluate.py``."""
    g = parser.add_argument_group("model and sampler (explicit flags override the student's recipe)")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="base pipeline folder or hub id (default: the student's recorded base model)")
    g.add_argument("--student", default=None, help="a stepdistill output directory (has stepdistill.json)")
    g.add_argument("--allow_pickle", action="store_true",
                   help="also load a base model stored as pickle (.bin): it can run code; default: safetensors only")
    g.add_argument("--scheduler", default=None, help="a Diffusers scheduler class name, e.g. LCMScheduler")
    g.add_argument("--num_inference_steps", type=int, default=None)
    g.add_argument("--timesteps", default=None, help="comma-separated timesteps, e.g. 999,759,499,259")
    g.add_argument("--guidance_scale", type=float, default=None,
                   help="Diffusers convention: eps_u + w (eps_c - eps_u), CFG only when w > 1")
    g.add_argument("--eta", type=float, default=None)
    g.add_argument("--resolution", type=int, default=None, help="default: the pipeline's native size")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    _add_run_args(g)

    g = parser.add_argument_group("prompts")
    g.add_argument("--prompts_file", default=None, help="one prompt per line")
    g.add_argument("--captions_file", default=None,
                   help="a .txt caption list (every line one caption, verbatim: GigaGAN's COCO-2014 30k list, "
                        "assets/prompts/coco2014-30k-gigagan.txt), COCO-style JSON ({'annotations': [{'image_id', "
                        "'caption'}]}) or CSV with image_id and caption columns (the first caption of each image)")
    g.add_argument("--num_images", type=int, default=None,
                   help="default: one image per prompt; more cycles through the prompts")
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("metrics")
    g.add_argument("--metrics", nargs="+", default=["fid"], metavar="METRIC",
                   help=f"any of {', '.join(metrics())} (space- or comma-separated)")
    g.add_argument("--reference_dir", default=None, help="real images for FID")
    g.add_argument("--reference_stats", default=None, help="a .npz written by ref-stats")
    g.add_argument("--clip_model", default=None, help="CLIP folder or hub id for the CLIP score")
    g.add_argument("--clip_protocol", choices=list(CLIP_PROTOCOLS), default="torchmetrics",
                   help="'torchmetrics': max(100 * mean cosine, 0) on the prompt; 'paper': the COCO tables of "
                        "GigaGAN/DMD2/SiD-LSG, raw mean cosine with the 'A photo depicts' prefix and their image "
                        "preprocessing (use laion/CLIP-ViT-g-14-laion2B-s12B-b42K)")
    g.add_argument("--kid_subset_size", type=int, default=1000,
                   help="KID: images per subset (torchmetrics' and clean-fid's 1000)")
    g.add_argument("--kid_subsets", type=int, default=100, help="KID: subsets averaged (torchmetrics' 100)")
    _add_extractor_args(g)

    parser.add_argument("--output_dir", required=True,
                        help="receives images/, grid.png and metrics.json; rerunning resumes")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return parser


def add_ref_stats_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``stepdistill ref-stats`` / ``eval/ref_stats.py``."""
    parser.add_argument("--reference_dir", required=True, help="a folder of real images")
    parser.add_argument("--output", required=True, help="the .npz to write")
    parser.add_argument("--captions_file", default=None,
                        help="COCO JSON or CSV with image ids: use only the listed images (file names ending with "
                             "the id, e.g. COCO_val2014_000000391895.jpg), the real side of those captions")
    parser.add_argument("--keep_features", action="store_true",
                        help="also save the features themselves (KID needs them; N x D float64)")
    _add_extractor_args(parser)
    _add_run_args(parser)
    parser.add_argument("--no_progress", action="store_true")
    return parser


def _print_eval(args) -> None:
    result = run_eval(args)
    if not is_main_process():  # a sharded run prints once
        return
    keys = [key for spec in metrics().values() for key in spec.result_keys]
    scores = {k: result[k] for k in keys if k in result}
    p = result["protocol"]
    print(json.dumps({**scores, "num_images": p["num_images"], "nfe_per_image": p["nfe_per_image"],
                      "seconds_per_image": p["seconds_per_image"]}, indent=2))
    print(f"wrote {Path(args.output_dir) / METRICS_NAME}")


def _print_ref_stats(args) -> None:
    meta = run_ref_stats(args)
    print(f"wrote {args.output}: {meta['num_images']} images, {meta['feature_extractor']['name']}, "
          f"preprocess {meta['preprocess']}{', with features' if meta['has_features'] else ''}")


def register(subparsers) -> None:
    """Add ``eval`` and ``ref-stats`` to the ``stepdistill`` command."""
    names = ", ".join(metrics())
    p = subparsers.add_parser("eval", help=f"generate images and score them ({names})")
    add_eval_args(p)
    p.set_defaults(func=_print_eval)
    p = subparsers.add_parser("ref-stats", help="FID reference statistics (.npz) of a folder of real images")
    add_ref_stats_args(p)
    p.set_defaults(func=_print_ref_stats)
