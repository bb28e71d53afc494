"""The tiny-digits world's plug-in for the evaluation harness (listed in ``stepdistill.evaluation.registry.PLUGINS``):
``--metrics digits`` (digits-FID and prompt agreement, on the world's held-out prompts unless others are given) and
``--fid_extractor digits`` (the classifier's penultimate features), both from ``--digits_classifier``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import StepdistillError
from ..evaluation.extractors import Extractor, sha256_file
from ..evaluation.registry import register_extractor, register_metric
from .classifier import WEIGHTS_NAME


def add_arguments(parser) -> None:
    parser.add_argument("--digits_classifier", default=None,
                        help="folder holding digits_classifier.safetensors (default: the base model folder)")


def classifier_dir(args, base_model: str | None) -> Path:
    given = args.digits_classifier
    folder = Path(given) if given else (Path(base_model) if base_model else None)
    if folder is None or not (folder / WEIGHTS_NAME).is_file():
        where = f"--digits_classifier {given}" if given else f"the base model {base_model}"
        raise StepdistillError(f"{where} has no {WEIGHTS_NAME}; pass --digits_classifier with a tiny-digits world "
                               "folder (`stepdistill toy build`)")
    return folder


def digits_extractor(args, base_model: str | None) -> Extractor:
    from .classifier import DigitsClassifier

    folder = classifier_dir(args, base_model)
    module = DigitsClassifier.load(folder)
    weights = folder / WEIGHTS_NAME
    return Extractor(module, {"name": f"tiny-digits classifier ({module.num_features}-d penultimate features)",
                              "weights": str(weights.resolve()), "weights_sha256": sha256_file(weights),
                              "own_resize": "grey, bilinear (antialiased) to 16x16"})


class DigitsMetric:
    """Digits-FID against all real digits and prompt agreement, by the world's classifier (:class:`DigitsJudge`)."""

    def __init__(self, args, base_model: str, device: str):
        from .classifier import DigitsClassifier
        from .evaluate import DigitsJudge

        self.folder = classifier_dir(args, base_model)
        self.judge = DigitsJudge(DigitsClassifier.load(self.folder))
        self.images: list[torch.Tensor] = []
        self.prompts: list[str] = []

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """What a sharded run gathers: the batch itself. A 16x16 digit weighs about what its features do, and
        classifying all images together at the end keeps the scores independent of the batch size."""
        return images

    def add_features(self, images: torch.Tensor, prompts: list[str]) -> None:
        self.images.append(images)
        self.prompts += prompts

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        self.add_features(images, prompts)

    def compute(self) -> dict[str, float]:
        scores = self.judge.score(torch.cat(self.images), self.prompts)
        return {"digits_fid": scores["digits_fid"], "prompt_agreement": scores["prompt_agreement"]}

    def protocol(self) -> dict[str, Any]:
        return {"digits": {"classifier": str(self.folder.resolve()),
                           "reference": "all 1797 scikit-learn digits at 16x16, uint8",
                           "prompt_agreement": "share of images the classifier reads as the prompted digit"}}


def eval_prompts() -> tuple[list[str], str]:
    from . import data

    return data.eval_prompts(), "tiny-digits evaluation prompts (toy/data.py)"


register_metric("digits", DigitsMetric, result_keys=("digits_fid", "prompt_agreement"), protocol_keys=("digits",),
                min_images=2, default_prompts=eval_prompts)
register_extractor("digits", digits_extractor, add_arguments=add_arguments)
