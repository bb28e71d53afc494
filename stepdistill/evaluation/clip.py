"""CLIP score through torchmetrics' ``CLIPScore`` (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning", scaled by 100 as torchmetrics does), with the workarounds transformers 5 needs, the
harness's ``clip`` metric, and a tiny offline CLIP for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import StepdistillError

DEFAULT_CLIP_WORDS = ["a", "an", "the", "photo", "picture", "of", "digit", "number", "handwritten",
                      "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLIP_SCALE = ("torchmetrics CLIPScore: 100 * cosine(image, text) averaged over images, clamped at 0; images at "
              "their generated size through the CLIP processor's own resize and crop")


def _feature_tensor(out: Any) -> Tensor:
    # transformers >= 5 returns a BaseModelOutputWithPooling whose pooler_output holds the projected embeddings;
    # transformers 4 returned that tensor directly
    return out if isinstance(out, Tensor) else out.pooler_output


class _TensorFeaturesCLIP(nn.Module):
    """A CLIPModel whose ``get_image_features``/``get_text_features`` return tensors, as torchmetrics expects."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @property
    def config(self):
        return self.model.config

    def get_image_features(self, pixel_values: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _feature_tensor(self.model.get_image_features(pixel_values, *args, **kwargs))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, *args: Any,
                          **kwargs: Any) -> Tensor:
        return _feature_tensor(self.model.get_text_features(input_ids, attention_mask, *args, **kwargs))


class _TruncatingProcessor:
    """Truncates prompts at the tokenizer's length, keeping the end-of-text token CLIP pools on.

    torchmetrics tokenizes with ``padding=True`` only and then slices overlong prompts, which drops that token.
    """

    def __init__(self, processor: Any):
        self.processor = processor

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("text") is not None:
            kwargs.setdefault("truncation", True)
        return self.processor(*args, **kwargs)


class ClipScore:
    """CLIP score of images against their prompts, computed by torchmetrics' ``CLIPScore``.

    The score is ``max(100 * mean(cos(image, text)), 0)``: torchmetrics averages first and clamps the average,
    which equals the per-pair clamp whenever all similarities are positive (the usual case with real CLIP models).
    """

    def __init__(self, model: nn.Module, processor: Any):
        from torchmetrics.multimodal.clip_score import CLIPScore

        # torchmetrics only accepts a handful of hub ids as strings (no local folders), and with transformers >= 5
        # it fails on the output objects get_*_features now return; a callable bypasses its loader, and the
        # adapter hands it plain tensors
        self.metric = CLIPScore(
            model_name_or_path=lambda: (_TensorFeaturesCLIP(model), _TruncatingProcessor(processor)))

    def update(self, images_uint8: Tensor | list[Tensor], prompts: list[str] | str) -> None:
        """Add a batch of uint8 images ``(N, 3, H, W)`` and their ``N`` prompts."""
        if isinstance(images_uint8, Tensor) and images_uint8.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
        self.metric.update(images_uint8, list(prompts) if not isinstance(prompts, str) else [prompts])

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        self.metric.reset()

    def to(self, device: str | torch.device) -> "ClipScore":
        self.metric.to(device)
        return self


def make_clip_score(model_name_or_path: str | Path) -> ClipScore:
    """A :class:`ClipScore` with ``CLIPModel``/``CLIPProcessor`` from a local folder or a hub id (cache only when
    ``HF_HUB_OFFLINE=1``)."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(str(model_name_or_path)).eval()
    processor = CLIPProcessor.from_pretrained(str(model_name_or_path))
    return ClipScore(model, processor)


class ClipMetric:
    """``--metrics clip``: the CLIP score of the generated images against their prompts (``--clip_model``)."""

    def __init__(self, args, base_model: str, device: str):
        if not args.clip_model:
            raise StepdistillError("--metrics clip needs --clip_model (a CLIP folder or hub id)")
        if str(args.clip_model).startswith((".", "/", "~")) and not Path(args.clip_model).exists():
            raise StepdistillError(f"--clip_model {args.clip_model}: no such directory")
        try:
            self.score = make_clip_score(args.clip_model).to(device)
        except OSError as e:
            first_line = str(e).splitlines()[0]
            raise StepdistillError(f"--clip_model {args.clip_model}: cannot load CLIP ({first_line})") from e
        self.model, self.device = args.clip_model, device
        self.total, self.count = torch.tensor(0.0), torch.tensor(0)

    def features(self, images: Tensor, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """A batch's summed scores and its count (what a sharded run gathers): torchmetrics' own states after this
        batch alone."""
        self.score.reset()
        self.score.update(images.to(self.device), prompts)
        return self.score.metric.score.detach().cpu().clone(), self.score.metric.n_samples.detach().cpu().clone()

    def add_features(self, features: tuple[Tensor, Tensor], prompts: list[str]) -> None:
        score, count = features
        self.total, self.count = self.total + score, self.count + count

    def update(self, images: Tensor, prompts: list[str]) -> None:
        self.add_features(self.features(images, prompts), prompts)

    def compute(self) -> dict[str, float]:
        # CLIPScore.compute on the summed states
        return {"clip_score": float(torch.max(self.total / self.count, torch.zeros_like(self.total)))}

    def protocol(self) -> dict[str, Any]:
        return {"clip": {"model": str(self.model), "score_scale": CLIP_SCALE}}


def build_tiny_clip(directory: str | Path, words: list[str] | None = None, seed: int = 0) -> Path:
    """Save a tiny randomly initialised CLIP (model, image processor, word-list tokenizer) to ``directory``.

    It scores nothing meaningfully; it exists so CLIP-score code runs offline in tests. Loads back with
    ``CLIPModel.from_pretrained(directory)`` and ``CLIPProcessor.from_pretrained(directory)``.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    from ..tokenizer import write_clip_tokenizer

    # transformers 5's default CLIPImageProcessor needs torchvision (and warns when it falls back), so build with
    # the PIL backend; the saved config still names CLIPImageProcessor, so loading picks whichever is available
    try:
        from transformers import CLIPImageProcessorPil as image_processor_cls
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL/numpy one
        from transformers import CLIPImageProcessor as image_processor_cls

    directory = Path(directory)
    max_length = 77
    write_clip_tokenizer(directory, words or DEFAULT_CLIP_WORDS, model_max_length=max_length)
    tokenizer = CLIPTokenizer.from_pretrained(directory)
    image_size = 32
    image_processor = image_processor_cls(size={"shortest_edge": image_size},
                                          crop_size={"height": image_size, "width": image_size})
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), max_position_embeddings=max_length,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **common),
        vision_config=dict(image_size=image_size, patch_size=4, **common),
        projection_dim=16,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory
