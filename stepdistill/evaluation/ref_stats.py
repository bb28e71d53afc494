"""``stepdistill ref-stats``: the FID reference statistics of a folder of real images, saved once as ``.npz`` with
the protocol they were made under, so evaluations only extract features of their generated images.

With ``--captions_file`` (a COCO JSON or CSV with image ids), only the listed images of the folder are used: the
real images of the captions an evaluation generates from. ``--keep_features`` also saves the features themselves,
which KID needs."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import StepdistillError
from . import fid
from .captions import caption_image_ids, select_images_by_id
from .extractors import accumulate, build_extractor, fid_metric, real_feature_batches
from .images import CLEAN_SIZE, CROP_LANCZOS, RESIZE_RULES, canonical_preprocess, check_image_files, \
    check_reference_dir
from .pipeline import device_name
from .protocol import json_safe, versions


def reference_images(args) -> tuple[list[Path], list[tuple[int, int]], dict | None]:
    """The reference files (all of ``--reference_dir``, or those ``--captions_file`` lists), their distinct sizes
    and what the metadata records about the selection."""
    captions_file = getattr(args, "captions_file", None)
    paths, sizes = check_reference_dir(args.reference_dir, args.preprocess)
    if not captions_file:
        return paths, sizes, None
    ids = caption_image_ids(captions_file)
    if ids is None:
        raise StepdistillError(f"--captions_file {captions_file}: a .txt caption list names no images (GigaGAN's "
                               "30k list is scored against all of val2014, as DMD2 and SiD-LSG do); drop "
                               "--captions_file, or pass a COCO JSON/CSV with image ids")
    paths = select_images_by_id(paths, ids, f"--reference_dir {args.reference_dir}")
    if len(paths) < 2:
        raise StepdistillError(f"--captions_file {captions_file}: lists {len(paths)} image; FID needs at least 2")
    sizes = check_image_files(paths, args.preprocess, f"--reference_dir {args.reference_dir}")
    selection = {"captions_file": str(Path(captions_file).resolve()), "num_listed": len(ids),
                 "sha256": hashlib.sha256(Path(captions_file).read_bytes()).hexdigest(),
                 "rule": "the images whose file name ends with a listed image_id, in list order"}
    return paths, sizes, selection


def run_ref_stats(args) -> dict:
    """Mean and covariance of a folder of real images under an extractor and resize rule, saved to ``.npz``."""
    args.preprocess = canonical_preprocess(args.preprocess)
    paths, sizes, selection = reference_images(args)
    extractor = build_extractor(args, None)
    device = device_name(args.device)
    probe = (CLEAN_SIZE, CLEAN_SIZE) if args.preprocess == CROP_LANCZOS else sizes[0][::-1]
    metric = fid_metric(extractor, probe, None, args.fid_extractor, device)
    keep = bool(getattr(args, "keep_features", False))
    kept = []
    for features in real_feature_batches(metric, paths, args, device, progress=not args.no_progress):
        accumulate(metric, features, real=True)
        if keep:
            kept.append(features.cpu())
    mu, sigma = fid.stats_from_fid(metric, real=True)
    meta = json_safe({"source": str(Path(args.reference_dir).resolve()), "num_images": len(paths),
                      "image_sizes": [list(s) for s in sizes[:5]], "preprocess": args.preprocess,
                      "resize_rule": RESIZE_RULES[args.preprocess], "feature_extractor": extractor.protocol,
                      "selection": selection, "has_features": keep, "versions": versions()})
    fid.save_stats(args.output, mu, sigma, features=torch.cat(kept) if keep else None, **meta)
    return meta
