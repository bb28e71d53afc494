"""``stepdistill ref-stats``: the FID reference statistics of a folder of real images, saved once as ``.npz`` with
the protocol they were made under, so evaluations only extract features of their generated images."""

from __future__ import annotations

from pathlib import Path

from . import fid
from .extractors import add_real_images, build_extractor, fid_metric
from .images import CLEAN_SIZE, RESIZE_RULES, check_reference_dir
from .pipeline import device_name
from .protocol import json_safe, versions


def run_ref_stats(args) -> dict:
    """Mean and covariance of a folder of real images under an extractor and resize rule, saved to ``.npz``."""
    paths, sizes = check_reference_dir(args.reference_dir, args.preprocess)
    extractor = build_extractor(args, None)
    device = device_name(args.device)
    probe = (CLEAN_SIZE, CLEAN_SIZE) if args.preprocess == "clean" else sizes[0][::-1]
    metric = fid_metric(extractor, probe, None, args.fid_extractor, device)
    add_real_images(metric, paths, args, device, progress=not args.no_progress)
    mu, sigma = fid.stats_from_fid(metric, real=True)
    meta = json_safe({"source": str(Path(args.reference_dir).resolve()), "num_images": len(paths),
                      "image_sizes": [list(s) for s in sizes[:5]], "preprocess": args.preprocess,
                      "resize_rule": RESIZE_RULES[args.preprocess], "feature_extractor": extractor.protocol,
                      "versions": versions()})
    fid.save_stats(args.output, mu, sigma, **meta)
    return meta
