"""FID feature extractors and the harness's ``fid`` metric.

``--fid_extractor`` names a registered extractor (``inception``; a world registers its own, e.g. the tiny-digits
classifier) or ``MODULE:CALLABLE``. What the protocol records about it (name, weights and their sha256,
its own resize) travels with it, so saved reference statistics made with another extractor, other weights or
another resize rule are refused instead of giving a meaningless number.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import StepdistillError
from . import fid
from .images import CLEAN_SIZE, RESIZE_RULES, check_reference_dir, load_images, preprocess_images
from .registry import extractors

logger = logging.getLogger(__name__)


@dataclass
class Extractor:
    module: nn.Module
    protocol: dict = field(default_factory=dict)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def inception_extractor(args, base_model: str | None) -> Extractor:
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    weights = args.inception_weights
    if weights is not None and not Path(weights).is_file():
        raise StepdistillError(f"--inception_weights {weights}: no such file; pass the local "
                               "pt_inception-2015-12-05 weights")
    if not _TORCH_FIDELITY_AVAILABLE:
        raise StepdistillError("--fid_extractor inception needs torch-fidelity (`pip install torch-fidelity`);"
                               " or pass --fid_extractor digits or MODULE:CALLABLE")
    module = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                feature_extractor_weights_path=weights)
    module.num_features = 2048
    return Extractor(module, {
        "name": "inception-v3-compat (torch-fidelity, 2048-d pool features)",
        "weights": str(Path(weights).resolve()) if weights else
        "downloaded by torch-fidelity (pt_inception-2015-12-05-6726825d.pth)",
        "weights_sha256": sha256_file(weights) if weights else None,
        "own_resize": "bilinear to 299x299 inside torch-fidelity's Inception"})


def _module_extractor(spec: str) -> Extractor:
    module_name, _, attr = spec.partition(":")
    if not attr:
        names = ", ".join(repr(name) for name in extractors())
        raise StepdistillError(f"--fid_extractor {spec}: expected {names} or MODULE:CALLABLE")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        module = factory()
    except (ImportError, AttributeError) as e:
        raise StepdistillError(f"--fid_extractor {spec}: cannot import it ({e})") from e
    if not isinstance(module, nn.Module):
        raise StepdistillError(f"--fid_extractor {spec}: returned {type(module).__name__}, not an nn.Module")
    return Extractor(module.eval(), {"name": spec, "weights": None, "weights_sha256": None,
                                     "own_resize": "whatever the module does"})


def build_extractor(args, base_model: str | None) -> Extractor:
    """The FID feature extractor named by ``--fid_extractor``, with what the protocol records about it."""
    spec = args.fid_extractor
    if spec != "inception" and args.inception_weights is not None:
        raise StepdistillError(f"--inception_weights given but --fid_extractor is {spec!r}; drop one of them")
    registered = extractors().get(spec)
    return registered.factory(args, base_model) if registered else _module_extractor(spec)


def check_stats_compatible(stats: fid.FeatureStats, extractor: Extractor, preprocess: str, path: str) -> None:
    meta = stats.meta or {}
    made_with = (meta.get("feature_extractor") or {}).get("name")
    if made_with is not None and made_with != extractor.protocol["name"]:
        raise StepdistillError(f"--reference_stats {path} was made with {made_with!r} but this run uses "
                               f"{extractor.protocol['name']!r}; remake it with ref-stats")
    sha = (meta.get("feature_extractor") or {}).get("weights_sha256")
    if sha and extractor.protocol.get("weights_sha256") and sha != extractor.protocol["weights_sha256"]:
        raise StepdistillError(f"--reference_stats {path} was made with other extractor weights "
                               f"(sha256 {sha[:12]}…); remake it with ref-stats")
    if meta.get("preprocess") is not None and meta["preprocess"] != preprocess:
        raise StepdistillError(f"--reference_stats {path} was made with --preprocess {meta['preprocess']} but this run "
                               f"uses --preprocess {preprocess}; use the same rule for real and generated images")


def fid_metric(extractor: Extractor, probe_hw: tuple[int, int], fallback_features: int | None, spec: str,
               device: str):
    """``fid.make_fid`` for the extractor on ``device``, its feature count recorded in the extractor's protocol.

    A module without ``num_features`` is probed at the size it will see (the reference images' size or the clean
    rule's 256), else takes the reference statistics' dimension."""
    try:
        metric = fid.make_fid(extractor.module, input_img_size=(3, *probe_hw))
    except ValueError as e:
        if fallback_features is None:
            raise StepdistillError(f"--fid_extractor {spec}: {e}") from e
        metric = fid.make_fid(extractor.module, num_features=fallback_features)
    metric = metric.to(device)
    extractor.protocol["num_features"] = num_features(metric)
    return metric


def num_features(metric) -> int:
    return int(metric.real_features_sum.shape[0])


def add_real_images(metric, paths: Sequence[Path], args, device: str, progress: bool = False) -> None:
    """Feed the reference images to the metric's real side, ``args.batch_size`` at a time."""
    for start in tqdm(range(0, len(paths), args.batch_size), desc="reference", unit="batch", disable=not progress):
        metric.update(load_images(paths[start:start + args.batch_size], args.preprocess).to(device), real=True)


class FidMetric:
    """``--metrics fid``: generated images against a folder of real images or saved reference statistics."""

    def __init__(self, args, base_model: str, device: str):
        if bool(args.reference_dir) == bool(args.reference_stats):
            raise StepdistillError("FID needs exactly one reference: --reference_dir (real images) or "
                                   "--reference_stats (a .npz from ref-stats)")
        self.args, self.device, self.count = args, device, 0
        self.ref_paths = self.stats = None
        if args.reference_dir:
            self.ref_paths, ref_sizes = check_reference_dir(args.reference_dir, args.preprocess)
            self.reference = {"kind": "dir", "path": str(Path(args.reference_dir).resolve()),
                              "num_images": len(self.ref_paths), "image_sizes": [list(s) for s in ref_sizes[:5]]}
            probe = ref_sizes[0][::-1]
        else:
            try:
                self.stats = fid.load_stats(args.reference_stats)
            except (FileNotFoundError, ValueError) as e:
                raise StepdistillError(f"--reference_stats {args.reference_stats}: {e}") from e
            self.reference = {"kind": "stats", "path": str(Path(args.reference_stats).resolve()),
                              "num_images": self.stats.meta.get("num_images"), "stats_meta": self.stats.meta}
            probe = (args.resolution or 299,) * 2
        if args.preprocess == "clean":
            probe = (CLEAN_SIZE, CLEAN_SIZE)
        self.extractor = build_extractor(args, base_model)
        if self.stats is not None:
            check_stats_compatible(self.stats, self.extractor, args.preprocess, args.reference_stats)
        self.metric = fid_metric(self.extractor, probe, len(self.stats.mu) if self.stats is not None else None,
                                 args.fid_extractor, device)
        if self.stats is not None and num_features(self.metric) != len(self.stats.mu):
            raise StepdistillError(f"--reference_stats {args.reference_stats} has {len(self.stats.mu)} features but "
                                   f"--fid_extractor {args.fid_extractor} gives {num_features(self.metric)}")

    @torch.no_grad()
    def features(self, images, prompts: list[str]) -> torch.Tensor:
        """float64 features ``(N, D)`` of a batch, on the CPU (what a sharded run gathers)."""
        return self.metric.inception(preprocess_images(images, self.args.preprocess).to(self.device)).cpu()

    def add_features(self, features: torch.Tensor, prompts: list[str]) -> None:
        """Accumulate a batch's features on the fake side, as ``FrechetInceptionDistance.update`` does."""
        features = features.to(self.device)
        self.metric.fake_features_sum += features.sum(dim=0)
        self.metric.fake_features_cov_sum += features.t().mm(features)
        self.metric.fake_features_num_samples += features.shape[0]
        self.count += len(features)

    def update(self, images, prompts: list[str]) -> None:
        self.add_features(self.features(images, prompts), prompts)

    def compute(self) -> dict[str, float]:
        fake = fid.stats_from_fid(self.metric, real=False)
        if self.ref_paths is not None:
            add_real_images(self.metric, self.ref_paths, self.args, self.device)
            real_mu, real_sigma = fid.stats_from_fid(self.metric, real=True)
        else:
            real_mu, real_sigma = self.stats.mu, self.stats.sigma
        result = {"fid": fid.frechet_distance(*fake, real_mu, real_sigma)}
        if self.count < self.extractor.protocol["num_features"]:
            logger.warning("FID from %d images of %d-d features is strongly biased upwards; compare only runs "
                           "with the same number of images", self.count, self.extractor.protocol["num_features"])
        return result

    def protocol(self) -> dict[str, Any]:
        return {"reference": self.reference, "preprocess": self.args.preprocess,
                "resize_rule": RESIZE_RULES[self.args.preprocess], "feature_extractor": self.extractor.protocol}
