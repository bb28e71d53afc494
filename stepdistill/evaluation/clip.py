"""CLIP score, two protocols (``--clip_protocol``):

- ``torchmetrics``: torchmetrics' ``CLIPScore`` (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric
  for Image Captioning"): ``max(100 * mean cos, 0)``, with the workarounds transformers 5 needs;
- ``paper``: what the distillation papers report on COCO (GigaGAN's evaluation/evaluation.py ``compute_clip_score``,
  copied by DMD2's main/coco_eval/coco_evaluator.py and used for SiD-LSG's tables through
  evaluate_SiD_t2i_coco256.sh): the caption after the tokens of "A photo depicts ", images center-cropped and
  Lanczos-resized to 256 then open_clip's eval transform, raw cosine averaged, no x100, no clamp.

Also the harness's ``clip`` metric, the check that ``--clip_model`` is a CLIP, and a tiny offline CLIP for tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor

from ..errors import StepdistillError

DEFAULT_CLIP_WORDS = ["a", "an", "the", "photo", "picture", "of", "digit", "number", "handwritten",
                      "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CLIP_SCALE = ("torchmetrics CLIPScore: 100 * cosine(image, text) averaged over images, clamped at 0; images at "
              "their generated size through the CLIP processor's own resize and crop")
PAPER_PREFIX = "A photo depicts "
PAPER_SCALE = ("raw cosine(image, text) of the CLIP embeddings averaged over images (float64), no x100, no clamp; "
               f"text: start token, the tokens of {PAPER_PREFIX!r}, the caption's tokens, cut to the context length "
               "with the end token last; image: center crop + PIL Lanczos to 256, PIL bicubic of the shorter side to "
               "the model's input size, center crop, /255, the processor's mean/std (open_clip's eval transform)")
PAPER_SOURCES = ("GigaGAN evaluation/evaluation.py compute_clip_score (open_clip ViT-g-14 laion2b_s12b_b42k), as "
                 "DMD2 main/coco_eval/coco_evaluator.py and SiD-LSG evaluate_SiD_t2i_coco256.sh run it")
CLIP_PROTOCOLS = {"torchmetrics": CLIP_SCALE, "paper": PAPER_SCALE}


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


class PaperClipScore:
    """The CLIP score of the papers' COCO tables (``--clip_protocol paper``), on a transformers ``CLIPModel``.

    Per image and caption: ``cos(f_img, f_txt)`` of the unnormalised embeddings (``get_image_features`` /
    ``get_text_features``, which are open_clip's ``encode_image`` / ``encode_text`` for the same weights), averaged
    in float64. The caption is prefixed at the token level as GigaGAN's ``compute_clip_score`` does: start token,
    the tokens of ``prefix``, the caption's tokens, cut to the context length with the end token in the last place.
    The image goes through the COCO rule (center crop, PIL Lanczos to 256) and then open_clip's eval transform
    (PIL bicubic of the shorter side to the model's input size, center crop, ``/255``, mean/std), done here rather
    than by the transformers image processor, whose backends resize differently.
    """

    def __init__(self, model: nn.Module, processor: Any, prefix: str = PAPER_PREFIX, crop_size: int | None = 256):
        self.model = model.float().eval()
        self.tokenizer = processor.tokenizer
        image_processor = processor.image_processor
        self.image_size = int(model.config.vision_config.image_size)
        self.mean = torch.tensor(image_processor.image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(image_processor.image_std, dtype=torch.float32).view(3, 1, 1)
        self.prefix, self.crop_size = prefix, crop_size
        self.context_length = int(model.config.text_config.max_position_embeddings)
        self.prefix_ids = self.tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix else []

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "PaperClipScore":
        self.model.to(device)
        return self

    def pixel_values(self, images_uint8: Tensor) -> Tensor:
        """``(N, 3, S, S)`` float32 model input of uint8 images ``(N, 3, H, W)``."""
        from PIL import Image

        from .images import center_crop_lanczos

        out = []
        for image in images_uint8.cpu():
            im = Image.fromarray(image.permute(1, 2, 0).numpy())
            if self.crop_size is not None:
                im = center_crop_lanczos(im, self.crop_size)
            # open_clip's eval transform: torchvision Resize(S, bicubic) of the shorter side, CenterCrop(S),
            # ToTensor, Normalize (open_clip src/open_clip/transform.py image_transform); on a PIL image that
            # Resize is PIL's bicubic resize
            w, h = im.size
            s = self.image_size
            size = (s, max(s, int(s * h / w))) if w <= h else (max(s, int(s * w / h)), s)
            im = im.resize(size, Image.BICUBIC)
            left, top = int(round((size[0] - s) / 2.0)), int(round((size[1] - s) / 2.0))
            im = im.crop((left, top, left + s, top + s))
            t = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous().float().div(255)
            out.append((t - self.mean) / self.std)
        return torch.stack(out)

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        """Each prompt's token ids: start, prefix, caption, end; at most the context length."""
        tok = self.tokenizer
        ids = []
        for prompt in prompts:
            # split_special_tokens: with "!" as the pad token (id 0, open_clip's padding id, which CLIP tokenizers
            # converted from open_clip may use) a "!" in a caption would otherwise become that token instead of
            # the BPE token "!</w>" OpenAI's clip.tokenize gives it
            caption = tok(prompt, add_special_tokens=False, truncation=True, max_length=self.context_length,
                          split_special_tokens=True)["input_ids"]
            full = [tok.bos_token_id, *self.prefix_ids, *caption]
            ids.append(full[:self.context_length - 1] + [tok.eos_token_id])
        return ids

    @torch.no_grad()
    def cosines(self, images_uint8: Tensor, prompts: list[str]) -> Tensor:
        """float64 ``(N,)``: the cosine of each image with its prompt."""
        if images_uint8.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images_uint8.dtype}")
        ids = self.token_ids(prompts)
        length = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.tensor([i + [pad] * (length - len(i)) for i in ids], device=self.device)
        mask = torch.tensor([[1] * len(i) + [0] * (length - len(i)) for i in ids], device=self.device)
        img = _feature_tensor(self.model.get_image_features(pixel_values=self.pixel_values(images_uint8).to(
            self.device)))
        txt = _feature_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=mask))
        img = torch.nn.functional.normalize(img.double(), dim=-1)
        txt = torch.nn.functional.normalize(txt.double(), dim=-1)
        return (img * txt).sum(dim=-1).cpu()


def check_clip_model(name: str) -> None:
    """A one-line StepdistillError unless ``--clip_model`` names a CLIP with both towers (folder or cached hub id)."""
    import json

    fix = "pass a CLIPModel folder or hub id, e.g. laion/CLIP-ViT-g-14-laion2B-s12B-b42K"
    path = Path(name)
    if path.exists() or str(name).startswith((".", "/", "~")):
        if not path.is_dir():
            raise StepdistillError(f"--clip_model {name}: no such directory; {fix}")
        config_file = path / "config.json"
        if not config_file.is_file():
            what = "a Diffusers pipeline folder" if (path / "model_index.json").is_file() else "a folder"
            raise StepdistillError(f"--clip_model {name}: {what} without config.json, not a CLIP; {fix}")
        try:
            config = json.loads(config_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StepdistillError(f"--clip_model {name}: unreadable config.json ({e}); {fix}") from e
        if not isinstance(config, dict):
            raise StepdistillError(f"--clip_model {name}: config.json is not an object; {fix}")
        if "_class_name" in config:
            raise StepdistillError(f"--clip_model {name}: a Diffusers {config['_class_name']}, not a CLIP; {fix}")
        model_type = config.get("model_type")
    else:
        from transformers import AutoConfig

        try:
            model_type = getattr(AutoConfig.from_pretrained(str(name)), "model_type", None)
        except (OSError, ValueError) as e:
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StepdistillError(f"--clip_model {name}: cannot load its config ({first_line}); {fix}") from e
    if model_type != "clip":
        kind = {"clip_text_model": "a CLIP text encoder alone", "clip_vision_model": "a CLIP vision encoder alone"}
        raise StepdistillError(f"--clip_model {name}: {kind.get(model_type, f'model_type {model_type!r}')}, not a "
                               f"CLIP with image and text towers; {fix}")


class ClipMetric:
    """``--metrics clip``: the CLIP score of the generated images against their prompts (``--clip_model``), by
    ``--clip_protocol`` (``torchmetrics`` or ``paper``)."""

    def __init__(self, args, base_model: str, device: str):
        self.protocol_name = getattr(args, "clip_protocol", "torchmetrics")
        if self.protocol_name not in CLIP_PROTOCOLS:
            raise StepdistillError(f"--clip_protocol {self.protocol_name}: choose from {', '.join(CLIP_PROTOCOLS)}")
        if not args.clip_model:
            raise StepdistillError("--metrics clip needs --clip_model (a CLIP folder or hub id)")
        check_clip_model(str(args.clip_model))
        try:
            if self.protocol_name == "paper":
                from transformers import CLIPModel, CLIPProcessor

                model = CLIPModel.from_pretrained(str(args.clip_model))
                self.score = PaperClipScore(model, CLIPProcessor.from_pretrained(str(args.clip_model))).to(device)
            else:
                self.score = make_clip_score(args.clip_model).to(device)
        except OSError as e:
            first_line = str(e).splitlines()[0]
            raise StepdistillError(f"--clip_model {args.clip_model}: cannot load CLIP ({first_line})") from e
        self.model, self.device = args.clip_model, device
        self.total, self.count = torch.tensor(0.0), torch.tensor(0)
        self.cosines: list[Tensor] = []

    def features(self, images: Tensor, prompts: list[str]) -> Any:
        """What a sharded run gathers for a batch: torchmetrics' summed score and count after this batch alone, or
        (paper) the batch's cosines."""
        if self.protocol_name == "paper":
            return self.score.cosines(images, prompts)
        self.score.reset()
        self.score.update(images.to(self.device), prompts)
        return self.score.metric.score.detach().cpu().clone(), self.score.metric.n_samples.detach().cpu().clone()

    def add_features(self, features: Any, prompts: list[str]) -> None:
        if self.protocol_name == "paper":
            self.cosines.append(features)
            return
        score, count = features
        self.total, self.count = self.total + score, self.count + count

    def update(self, images: Tensor, prompts: list[str]) -> None:
        self.add_features(self.features(images, prompts), prompts)

    def compute(self) -> dict[str, float]:
        if self.protocol_name == "paper":
            return {"clip_score": float(torch.cat(self.cosines).mean())}
        # CLIPScore.compute on the summed states
        return {"clip_score": float(torch.max(self.total / self.count, torch.zeros_like(self.total)))}

    def protocol(self) -> dict[str, Any]:
        entry = {"model": str(self.model), "protocol": self.protocol_name,
                 "score_scale": CLIP_PROTOCOLS[self.protocol_name]}
        if self.protocol_name == "paper":
            entry.update(prefix=self.score.prefix, image_size=self.score.image_size,
                         image_mean=self.score.mean.flatten().tolist(), image_std=self.score.std.flatten().tolist(),
                         follows=PAPER_SOURCES)
        return {"clip": entry}


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
