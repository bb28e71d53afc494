"""FID feature extractors and the harness's ``fid`` and ``kid`` metrics.

``--fid_extractor`` names a registered extractor (``inception``; a world registers its own, e.g. the tiny-digits
classifier) or ``MODULE:CALLABLE``. What the protocol records about it (name, weights and their sha256,
its own resize) travels with it, so saved reference statistics made with another extractor, other weights or
another resize rule are refused instead of giving a meaningless number.

FID and KID of one run share one :class:`FeatureSource`: the extractor, the reference, and each batch's features,
computed once for both.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..errors import StepdistillError
from . import fid
from .images import (
    CLEAN_SIZE,
    CROP_LANCZOS,
    PREPROCESS_ALIASES,
    RESIZE_RULES,
    check_reference_dir,
    clean_fid_resize,
    load_images,
    preprocess_images,
)
from .registry import extractors, run_state

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


FID_RESIZES = {
    "torchmetrics": "torch bilinear with antialias to 299x299 on the uint8 image (torchmetrics' NoTrainInceptionV3 "
                    "default, antialias=True): neither TensorFlow's nor clean-fid's resize",
    "legacy_tf": "torch-fidelity's interpolate_bilinear_2d_like_tensorflow1x to 299x299 (the TensorFlow 1.x bilinear "
                 "of the original FID code; clean-fid's mode legacy_tensorflow)",
    "clean": "clean-fid's mode clean: each channel as a float32 PIL image, bicubic to 299x299, clipped to [0, 255], "
             "not quantised (cleanfid/resize.py make_resizer('PIL', False, 'bicubic', (299, 299)))",
}
DEFAULT_FID_RESIZE = "torchmetrics"
# the layers of torch-fidelity's FeatureExtractorInceptionV3 up to the 2048-d pool features, in forward order
_INCEPTION_POOL_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1",
                          "Conv2d_4a_3x3", "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                          "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


def inception_pool_features(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """2048-d pool features of float images in [0, 255] already at 299x299, through torch-fidelity's Inception
    without its own resize: the input scaling ``(x - 128) / 128`` and the layers, as clean-fid feeds its TorchScript
    Inception in mode clean (cleanfid/inception_torchscript.py)."""
    if images.shape[-2:] != (299, 299):
        raise ValueError(f"expected 299x299 images, got {tuple(images.shape[-2:])}")
    x = (images.float() - 128) / 128
    for name in _INCEPTION_POOL_LAYERS:
        x = getattr(net, name)(x)
    return torch.flatten(x, 1)


class CleanResizeInception(nn.Module):
    """torch-fidelity's Inception fed clean-fid's resize (``--fid_resize clean``): uint8 ``(N, 3, H, W)`` in, 2048-d
    pool features out."""

    num_features = 2048

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def train(self, mode: bool = True) -> "CleanResizeInception":
        return super().train(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        resized = [clean_fid_resize(im) for im in images.permute(0, 2, 3, 1).cpu().numpy()]
        x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).to(images.device)
        return inception_pool_features(self.net, x)


def read_inception_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict of tensors from ``.safetensors`` or a ``.pth``/``.pt`` state dict, loaded without running any
    pickled code (``torch.load(weights_only=True)``)."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or truncated file: one line naming it
        first_line = (str(e).splitlines() or [type(e).__name__])[0]
        raise StepdistillError(f"--inception_weights {path}: cannot read it as a state dict of tensors "
                               f"({first_line}); pass pt_inception-2015-12-05 weights (.pth or .safetensors)") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StepdistillError(f"--inception_weights {path}: not a state dict of tensors; pass the "
                               "pt_inception-2015-12-05 weights")
    return state


def make_inception(weights: str | Path | None, fid_resize: str = DEFAULT_FID_RESIZE) -> nn.Module:
    """torch-fidelity's Inception (2048-d pool features of uint8 images) with the resize to 299 ``fid_resize``.

    torch-fidelity unpickles a weights file with ``torch.load(weights_only=False)``; so the file given here is read
    with ``weights_only=True`` (or as safetensors) and only its tensors, re-saved to a temporary file, reach
    torch-fidelity. ``weights=None`` lets torch-fidelity download its own."""
    from torchmetrics.image.fid import NoTrainInceptionV3

    kwargs = {} if fid_resize == "torchmetrics" else {"antialias": False}
    with tempfile.TemporaryDirectory() as tmp:
        local = None
        if weights is not None:
            local = str(Path(tmp) / "inception.pth")
            torch.save(read_inception_weights(weights), local)
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=local, **kwargs)
        except TypeError as e:  # a torchmetrics without the antialias switch
            raise StepdistillError(f"--fid_resize {fid_resize}: this torchmetrics has no antialias switch ({e}); "
                                   "upgrade torchmetrics") from e
        except RuntimeError as e:  # load_state_dict: missing or unexpected keys, wrong shapes
            first_line = str(e).splitlines()[0]
            raise StepdistillError(f"--inception_weights {weights}: not the FID Inception's weights ({first_line})"
                                   ) from e
    if fid_resize == "clean":
        return CleanResizeInception(net)
    net.num_features = 2048
    return net


def inception_extractor(args, base_model: str | None) -> Extractor:
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    weights = args.inception_weights
    fid_resize = getattr(args, "fid_resize", None) or DEFAULT_FID_RESIZE
    if weights is not None and not Path(weights).is_file():
        raise StepdistillError(f"--inception_weights {weights}: no such file; pass the local "
                               "pt_inception-2015-12-05 weights")
    if not _TORCH_FIDELITY_AVAILABLE:
        raise StepdistillError("--fid_extractor inception needs torch-fidelity (`pip install torch-fidelity`);"
                               " or pass --fid_extractor digits or MODULE:CALLABLE")
    module = make_inception(weights, fid_resize)
    return Extractor(module, {
        "name": "inception-v3-compat (torch-fidelity, 2048-d pool features)",
        "weights": str(Path(weights).resolve()) if weights else
        "downloaded by torch-fidelity (pt_inception-2015-12-05-6726825d.pth)",
        "weights_sha256": sha256_file(weights) if weights else None,
        "fid_resize": fid_resize,
        "own_resize": FID_RESIZES[fid_resize]})


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
    fid_resize = getattr(args, "fid_resize", None) or DEFAULT_FID_RESIZE
    if fid_resize not in FID_RESIZES:
        raise StepdistillError(f"--fid_resize {fid_resize}: choose from {', '.join(FID_RESIZES)}")
    if spec != "inception" and fid_resize != DEFAULT_FID_RESIZE:
        raise StepdistillError(f"--fid_resize {fid_resize} is Inception's resize to 299 but --fid_extractor is "
                               f"{spec!r}; drop --fid_resize or use --fid_extractor inception")
    registered = extractors().get(spec)
    return registered.factory(args, base_model) if registered else _module_extractor(spec)


def _stats_fid_resize(extractor_meta: dict) -> str | None:
    # stats made before --fid_resize existed record none; Inception then always ran torchmetrics' resize
    if "fid_resize" in extractor_meta:
        return extractor_meta["fid_resize"]
    return DEFAULT_FID_RESIZE if str(extractor_meta.get("name", "")).startswith("inception") else None


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
    made_resize = _stats_fid_resize(meta.get("feature_extractor") or {})
    if made_with is not None and made_resize != extractor.protocol.get("fid_resize"):
        raise StepdistillError(f"--reference_stats {path} was made with --fid_resize {made_resize} but this run uses "
                               f"--fid_resize {extractor.protocol.get('fid_resize')}; use the same for both")
    made_pre = meta.get("preprocess")
    if made_pre in PREPROCESS_ALIASES:
        # before it was renamed, `clean` took the crop offset rounded down instead of torchvision's rounding
        raise StepdistillError(f"--reference_stats {path} was made with --preprocess {made_pre}, the earlier "
                               f"{CROP_LANCZOS} (crop offset rounded down); remake it with ref-stats")
    if made_pre is not None and made_pre != preprocess:
        raise StepdistillError(f"--reference_stats {path} was made with --preprocess {made_pre} but this run "
                               f"uses --preprocess {preprocess}; use the same rule for real and generated images")


def fid_metric(extractor: Extractor, probe_hw: tuple[int, int], fallback_features: int | None, spec: str,
               device: str):
    """``fid.make_fid`` for the extractor on ``device``, its feature count recorded in the extractor's protocol.

    A module without ``num_features`` is probed at the size it will see (the reference images' size or the
    crop_lanczos_256 rule's 256), else takes the reference statistics' dimension."""
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


def accumulate(metric, features: torch.Tensor, real: bool) -> None:
    """Add a batch's float64 features to one side of a ``FrechetInceptionDistance``, with the operations of its
    ``update`` (so the sums are those ``update`` would give)."""
    side = "real" if real else "fake"
    features = features.to(getattr(metric, f"{side}_features_sum").device)
    getattr(metric, f"{side}_features_sum").add_(features.sum(dim=0))
    getattr(metric, f"{side}_features_cov_sum").add_(features.t().mm(features))
    getattr(metric, f"{side}_features_num_samples").add_(features.shape[0])


@torch.no_grad()
def real_feature_batches(metric, paths: Sequence[Path], args, device: str, progress: bool = False):
    """The float64 features of the reference images, ``args.batch_size`` at a time (one tensor per batch)."""
    for start in tqdm(range(0, len(paths), args.batch_size), desc="reference", unit="batch", disable=not progress):
        yield metric.inception(load_images(paths[start:start + args.batch_size], args.preprocess).to(device))


def add_real_images(metric, paths: Sequence[Path], args, device: str, progress: bool = False) -> None:
    """Feed the reference images to the metric's real side, ``args.batch_size`` at a time."""
    for features in real_feature_batches(metric, paths, args, device, progress):
        accumulate(metric, features, real=True)


class FeatureSource:
    """What ``--metrics fid`` and ``kid`` of one run share: the reference (a folder or saved statistics), the
    extractor, each generated batch's features and the reference features, each computed once."""

    def __init__(self, args, base_model: str, device: str):
        if bool(args.reference_dir) == bool(args.reference_stats):
            raise StepdistillError("FID and KID need exactly one reference: --reference_dir (real images) or "
                                   "--reference_stats (a .npz from ref-stats)")
        self.args, self.device = args, device
        self.ref_paths = self.stats = self.stats_features = None
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
        if args.preprocess == CROP_LANCZOS:
            probe = (CLEAN_SIZE, CLEAN_SIZE)
        self.extractor = build_extractor(args, base_model)
        if self.stats is not None:
            check_stats_compatible(self.stats, self.extractor, args.preprocess, args.reference_stats)
        self.metric = fid_metric(self.extractor, probe, len(self.stats.mu) if self.stats is not None else None,
                                 args.fid_extractor, device)
        if self.stats is not None and num_features(self.metric) != len(self.stats.mu):
            raise StepdistillError(f"--reference_stats {args.reference_stats} has {len(self.stats.mu)} features but "
                                   f"--fid_extractor {args.fid_extractor} gives {num_features(self.metric)}")
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None
        self._real: list[torch.Tensor] | None = None

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float64 features ``(N, D)`` of a batch, on the CPU; the last batch's are kept, so FID and KID scoring the
        same batch compute them once."""
        if self._last is not None and self._last[0] is images:
            return self._last[1]
        out = self.metric.inception(preprocess_images(images, self.args.preprocess).to(self.device)).cpu()
        self._last = (images, out)
        return out

    def real_feature_batches(self, keep: bool):
        """The reference folder's features, one float64 tensor per batch (computed once if ``keep``)."""
        if self._real is not None:
            yield from self._real
            return
        kept = []
        for features in real_feature_batches(self.metric, self.ref_paths, self.args, self.device):
            if keep:
                kept.append(features.cpu())
            yield features
        if keep:
            self._real = kept

    def protocol(self) -> dict[str, Any]:
        return {"reference": self.reference, "preprocess": self.args.preprocess,
                "resize_rule": RESIZE_RULES[self.args.preprocess], "feature_extractor": self.extractor.protocol}


def feature_source(args, base_model: str, device: str) -> FeatureSource:
    """The run's one :class:`FeatureSource` (made by whichever of FID and KID asks first)."""
    state = run_state(args)
    if "features" not in state:
        state["features"] = FeatureSource(args, base_model, device)
    return state["features"]


class FidMetric:
    """``--metrics fid``: generated images against a folder of real images or saved reference statistics."""

    def __init__(self, args, base_model: str, device: str):
        self.source = feature_source(args, base_model, device)
        self.args, self.count = args, 0
        self.metric, self.extractor = self.source.metric, self.source.extractor

    def features(self, images, prompts: list[str]) -> torch.Tensor:
        """float64 features ``(N, D)`` of a batch, on the CPU (what a sharded run gathers)."""
        return self.source.features(images)

    def add_features(self, features: torch.Tensor, prompts: list[str]) -> None:
        """Accumulate a batch's features on the fake side, as ``FrechetInceptionDistance.update`` does."""
        accumulate(self.metric, features, real=False)
        self.count += len(features)

    def update(self, images, prompts: list[str]) -> None:
        self.add_features(self.features(images, prompts), prompts)

    def compute(self) -> dict[str, float]:
        fake = fid.stats_from_fid(self.metric, real=False)
        if self.source.ref_paths is not None:
            keep = "kid" in getattr(self.args, "metrics", [])
            for features in self.source.real_feature_batches(keep=keep):
                accumulate(self.metric, features, real=True)
            real_mu, real_sigma = fid.stats_from_fid(self.metric, real=True)
        else:
            real_mu, real_sigma = self.source.stats.mu, self.source.stats.sigma
        result = {"fid": fid.frechet_distance(*fake, real_mu, real_sigma)}
        if self.count < self.extractor.protocol["num_features"]:
            logger.warning("FID from %d images of %d-d features is strongly biased upwards; compare only runs "
                           "with the same number of images", self.count, self.extractor.protocol["num_features"])
        return result

    def protocol(self) -> dict[str, Any]:
        return self.source.protocol()


class _Features(nn.Module):
    """Hands features through: torchmetrics' KID then runs on features computed elsewhere."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


KID_SEED = 0
KID_RULE = ("torchmetrics KernelInceptionDistance: unbiased MMD^2 with the kernel (x.y / D + 1)^3 between "
            "subset_size real and subset_size generated features drawn without replacement, averaged over "
            "subsets (std over subsets beside it); subsets drawn by torch.randperm after torch.manual_seed(seed), "
            "features in float64; the quantity of Binkowski et al. 2018 and clean-fid's kernel_distance")


class KidMetric:
    """``--metrics kid``: kernel inception distance by torchmetrics, on the features FID uses (same extractor and
    options); the reference is a folder or statistics saved with ``ref-stats --keep_features``."""

    def __init__(self, args, base_model: str, device: str):
        self.args, self.device = args, device
        self.subsets, self.subset_size = int(args.kid_subsets), int(args.kid_subset_size)
        if self.subsets < 1 or self.subset_size < 2:
            raise StepdistillError(f"--kid_subsets {self.subsets} / --kid_subset_size {self.subset_size}: need at "
                                   "least 1 subset of at least 2 images")
        num_images = getattr(args, "num_images", None)
        if num_images is not None and num_images < self.subset_size:
            raise StepdistillError(f"--kid_subset_size {self.subset_size} exceeds --num_images {num_images}; pass "
                                   f"--kid_subset_size {num_images} or less (papers: 1000 of 30k-50k images)")
        self.source = feature_source(args, base_model, device)
        if self.source.stats is not None:
            self.stats_features = fid.load_features(args.reference_stats)
            if self.stats_features is None:
                raise StepdistillError(f"--reference_stats {args.reference_stats} holds no features, which KID "
                                       "needs; remake it with ref-stats --keep_features, or pass --reference_dir")
            num_real = len(self.stats_features)
        else:
            num_real = len(self.source.ref_paths)
        if num_real < self.subset_size:
            raise StepdistillError(f"--kid_subset_size {self.subset_size} exceeds the {num_real} reference images; "
                                   f"pass --kid_subset_size {num_real} or less")
        from torchmetrics.image.kid import KernelInceptionDistance

        with warnings.catch_warnings():  # "will save all extracted features in buffer": that is the point
            warnings.simplefilter("ignore", UserWarning)
            # sync_on_compute=False: in a sharded run only the main process computes, on features it gathered
            # itself; torchmetrics' own all-gather would wait forever for the other processes
            self.kid = KernelInceptionDistance(feature=_Features(num_features(self.source.metric)),
                                               subsets=self.subsets, subset_size=self.subset_size,
                                               sync_on_compute=False).to(device)

    def features(self, images, prompts: list[str]) -> torch.Tensor:
        return self.source.features(images)

    def add_features(self, features: torch.Tensor, prompts: list[str]) -> None:
        self.kid.update(features.to(self.device), real=False)

    def update(self, images, prompts: list[str]) -> None:
        self.add_features(self.features(images, prompts), prompts)

    def compute(self) -> dict[str, float]:
        if self.source.stats is not None:
            self.kid.update(torch.from_numpy(self.stats_features).to(self.device), real=True)
        else:
            for features in self.source.real_feature_batches(keep=True):
                self.kid.update(features.to(self.device), real=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(KID_SEED)
            mean, std = self.kid.compute()
        return {"kid": float(mean), "kid_std": float(std)}

    def protocol(self) -> dict[str, Any]:
        return {**self.source.protocol(),
                "kid": {"subsets": self.subsets, "subset_size": self.subset_size, "degree": 3, "gamma": "1/D",
                        "coef": 1.0, "seed": KID_SEED, "rule": KID_RULE}}
