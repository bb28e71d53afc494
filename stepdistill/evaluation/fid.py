"""FID: a torchmetrics ``FrechetInceptionDistance`` that accumulates and computes in float64, and reference
statistics (mean and covariance of real features) saved once to ``.npz`` and reused, so an evaluation run only
extracts features of the generated images.

FID works with any feature extractor that maps a uint8 batch ``(N, 3, H, W)`` to ``(N, D)`` features: Inception
(needs ``torch-fidelity``) or a small model such as the tiny-digits classifier. The distance is the one of Heusel
et al. (2017), "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium": the quantity
pytorch-fid's ``calculate_frechet_distance`` (src/pytorch_fid/fid_score.py) returns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

ArrayLike = np.ndarray | Tensor


class _Float64Features(nn.Module):
    """Runs an extractor in its own precision and hands its features back as float64.

    torchmetrics' FID already accumulates its sums in float64 but casts the result back to the extractor's output
    dtype; returning float64 here keeps ``compute()`` in float64 too. ``FrechetInceptionDistance.set_dtype`` would
    instead convert the extractor's weights to float64, which breaks extractors that cast their input to float32
    (the digits classifier does) and is needlessly slow for Inception on CPU.
    """

    def __init__(self, extractor: nn.Module, num_features: int | None = None):
        super().__init__()
        self.extractor = extractor
        if num_features is None and hasattr(extractor, "num_features"):
            num_features = int(extractor.num_features)
        if num_features is not None:
            # torchmetrics reads this instead of probing with a dummy 299x299 image
            self.num_features = num_features
        self.eval()

    def train(self, mode: bool = True) -> "_Float64Features":
        # a feature extractor must never switch to training behaviour (dropout, batch statistics)
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        features = self.extractor(images)
        if features.dim() == 1:
            features = features.unsqueeze(0)
        return features.reshape(features.shape[0], -1).double()


def _inception(weights: str | None) -> nn.Module:
    from torchmetrics.image.fid import NoTrainInceptionV3
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise ModuleNotFoundError("Inception FID needs torch-fidelity (`pip install torch-fidelity`)")
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"no Inception weights at {weights}")
    # weights=None makes torch-fidelity download the FID Inception weights on first use
    return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                              feature_extractor_weights_path=weights)


@torch.no_grad()
def _probe_num_features(extractor: nn.Module, input_img_size: tuple[int, int, int]) -> int:
    dummy = torch.zeros((2, *input_img_size), dtype=torch.uint8)
    try:
        return int(extractor(dummy).reshape(2, -1).shape[1])
    except Exception as e:
        raise ValueError(f"cannot infer the feature size of {type(extractor).__name__} from a {input_img_size} "
                         f"image ({e}); give it a `num_features` attribute or pass num_features/input_img_size") from e


def make_fid(feature_extractor: nn.Module | str = "inception", *, inception_weights: str | None = None,
             num_features: int | None = None, input_img_size: tuple[int, int, int] = (3, 299, 299),
             reset_real_features: bool = True, **kwargs: Any):
    """A torchmetrics ``FrechetInceptionDistance`` that accumulates and computes in float64.

    ``feature_extractor`` is an ``nn.Module`` taking uint8 images ``(N, 3, H, W)`` to features ``(N, D)``, or
    ``"inception"`` (2048-d pool features; ``inception_weights`` is a local ``pt_inception-2015-12-05`` file).
    ``num_features`` is needed only for a module without a ``num_features`` attribute that cannot take a dummy
    image of ``input_img_size``. Feed it uint8 images: ``fid.update(images, real=True/False)``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if isinstance(feature_extractor, str):
        if feature_extractor != "inception":
            raise ValueError(f"unknown feature extractor {feature_extractor!r}: pass 'inception' or an nn.Module")
        extractor, num_features = _inception(inception_weights), 2048
    elif isinstance(feature_extractor, nn.Module):
        extractor = feature_extractor
        if num_features is None and not hasattr(extractor, "num_features"):
            num_features = _probe_num_features(extractor, input_img_size)
    else:
        raise TypeError(f"feature_extractor must be an nn.Module or 'inception', got {type(feature_extractor)}")
    return FrechetInceptionDistance(feature=_Float64Features(extractor, num_features), normalize=False,
                                    input_img_size=input_img_size, reset_real_features=reset_real_features,
                                    **kwargs)


def _as_extractor(extractor: nn.Module) -> nn.Module:
    from torchmetrics.image.fid import FrechetInceptionDistance

    # the metric is itself an nn.Module whose forward would update its state, so take its extractor instead
    if isinstance(extractor, FrechetInceptionDistance):
        return extractor.inception
    return extractor


@torch.no_grad()
def extract_features(extractor: nn.Module, images_uint8: Tensor | Iterable[Tensor], batch_size: int = 256) -> Tensor:
    """Features of uint8 images, ``(N, D)`` float64 on the CPU.

    ``extractor`` is a module (or a metric from :func:`make_fid`); ``images_uint8`` is one ``(N, 3, H, W)`` tensor,
    cut into ``batch_size`` chunks, or an iterable of such batches (e.g. straight from a generator loop).
    """
    extractor = _as_extractor(extractor)
    batches = images_uint8.split(batch_size) if isinstance(images_uint8, Tensor) else images_uint8
    device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    out = []
    for batch in batches:
        if batch.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {batch.dtype}")
        features = extractor(batch.to(device))
        out.append(features.reshape(features.shape[0], -1).double().cpu())
    if not out:
        raise ValueError("no images to extract features from")
    return torch.cat(out)


class FeatureStats(NamedTuple):
    """Reference statistics: float64 mean ``(D,)``, covariance ``(D, D)`` and free-form metadata."""

    mu: np.ndarray
    sigma: np.ndarray
    meta: dict


def _np64(x: ArrayLike) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def stats_from_features(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``N - 1``, as torchmetrics) of ``(N, D)`` features, in float64."""
    f = _np64(features)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def stats_from_fid(metric, real: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance accumulated by a :func:`make_fid` metric (its real or fake side), e.g. to save them."""
    side = "real" if real else "fake"
    n = int(getattr(metric, f"{side}_features_num_samples"))
    if n < 2:
        raise ValueError(f"the metric holds {n} {side} samples; need at least 2")
    total = getattr(metric, f"{side}_features_sum").double()
    mu = total / n
    sigma = (getattr(metric, f"{side}_features_cov_sum").double() - n * torch.outer(mu, mu)) / (n - 1)
    return _np64(mu), _np64(sigma)


def save_stats(path: str | Path, mu: ArrayLike, sigma: ArrayLike, *, features: ArrayLike | None = None,
               **meta: Any) -> Path:
    """Write ``mu``, ``sigma`` (float64), ``meta`` (as a JSON string) and optionally the ``(N, D)`` float64
    ``features`` themselves (what KID needs) to the ``.npz`` file ``path``."""
    path = Path(path)
    mu, sigma = _np64(mu), _np64(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu must be (D,) and sigma (D, D), got {mu.shape} and {sigma.shape}")
    arrays = {"mu": mu, "sigma": sigma, "meta": np.array(json.dumps(meta))}
    if features is not None:
        arrays["features"] = _np64(features)
        if arrays["features"].ndim != 2 or arrays["features"].shape[1] != mu.shape[0]:
            raise ValueError(f"features must be (N, {mu.shape[0]}), got {arrays['features'].shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    # a file handle keeps numpy from appending ".npz" to a path that lacks it
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


def load_stats(path: str | Path) -> FeatureStats:
    """Read statistics written by :func:`save_stats` (no pickles are loaded)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no FID reference stats at {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not an .npz archive")
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
    except Exception as e:  # a truncated or foreign file: name the file rather than a zipfile internal
        raise ValueError(f"cannot read FID reference stats from {path}: {e}") from e
    missing = [k for k in ("mu", "sigma") if k not in arrays]
    if missing:
        raise ValueError(f"{path} is not an FID stats file: it lacks {', '.join(missing)}")
    meta = json.loads(str(arrays["meta"])) if "meta" in arrays else {}
    return FeatureStats(arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64), meta)


def load_features(path: str | Path) -> np.ndarray | None:
    """The float64 ``(N, D)`` features a stats file holds (``ref-stats --keep_features``), else ``None``."""
    with np.load(Path(path), allow_pickle=False) as loaded:
        return loaded["features"].astype(np.float64) if "features" in loaded.files else None


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike) -> float:
    """``|mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))`` in float64.

    ``Tr((sigma1 sigma2)^(1/2))`` is taken as the sum of square roots of the eigenvalues of the symmetric PSD matrix
    ``sigma1^(1/2) sigma2 sigma1^(1/2)`` (same eigenvalues as ``sigma1 sigma2``): real by construction, so no
    imaginary round-off to discard, and it stays defined for singular covariances (fewer samples than features).
    """
    mu1, mu2, sigma1, sigma2 = _np64(mu1), _np64(mu2), _np64(sigma1), _np64(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    root1 = _sqrt_psd(sigma1)
    eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_against_stats(extractor: nn.Module, fake_images: Tensor | Iterable[Tensor], mu: ArrayLike, sigma: ArrayLike,
                      batch_size: int = 256) -> float:
    """FID of uint8 images against reference statistics (e.g. from :func:`load_stats`).

    ``extractor`` must be the one the reference was computed with: a module or a :func:`make_fid` metric.
    """
    fake_mu, fake_sigma = stats_from_features(extract_features(extractor, fake_images, batch_size))
    if fake_mu.shape != np.shape(mu):
        raise ValueError(f"the extractor gives {fake_mu.shape[0]} features but the reference stats have "
                         f"{np.shape(mu)}: were they made with another extractor?")
    return frechet_distance(fake_mu, fake_sigma, mu, sigma)
