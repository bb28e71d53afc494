"""The evaluation harness: generate images from a base pipeline or any stepdistill output, then score them (FID,
CLIP score, the tiny-digits stand-ins) and record the protocol that makes the numbers comparable.

``run_eval(args)`` is ``stepdistill eval`` and ``eval/evaluate.py``; ``run_ref_stats(args)`` turns a folder of real
images into a reusable ``.npz``; ``bench_sampling`` measures what the sampler costs beyond its UNet evaluations.

Every input is checked before the pipeline runs, so a typo costs seconds, not an hour of sampling. Images are
written as ``images/{i:05d}.png`` as they are made and image i always uses seed ``seed + i`` in a fixed batch, so an
interrupted run resumes to exactly the files an uninterrupted one writes.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import inspect
import json
import logging
import os
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from . import metrics
from .errors import StepdistillError
from .prompts import read_prompts
from .recipe import Recipe, pipeline_call_kwargs
from .teacher import _check_pipeline_folder, check_supported

logger = logging.getLogger(__name__)

METRICS = ("fid", "clip", "digits")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLEAN_SIZE = 256
IMAGES_DIR = "images"
GENERATION_NAME = "generation.json"
METRICS_NAME = "metrics.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

RESIZE_RULES = {
    "none": "images as stored (uint8, real and generated alike), then the feature extractor's own resize",
    "clean": f"center crop to the shorter side, PIL Lanczos resize to {CLEAN_SIZE}x{CLEAN_SIZE} (uint8), then the "
             "feature extractor's own resize; applied identically to real and generated images",
}
CLIP_SCALE = ("torchmetrics CLIPScore: 100 * cosine(image, text) averaged over images, clamped at 0; images at "
              "their generated size through the CLIP processor's own resize and crop")
SEEDING = "image i uses torch.Generator().manual_seed(seed + i); batches are fixed index ranges of batch_size"


# ------------------------------------------------------------------------------------------------------- arguments


def _add_extractor_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fid_extractor", default="inception",
                        help="FID features: 'inception' (2048-d, needs torch-fidelity), 'digits' (the tiny-digits "
                             "classifier) or MODULE:CALLABLE returning an nn.Module that maps uint8 (N,3,H,W) "
                             "images to (N,D) features")
    parser.add_argument("--inception_weights", default=None,
                        help="local pt_inception-2015-12-05 weights file (otherwise torch-fidelity downloads it)")
    parser.add_argument("--digits_classifier", default=None,
                        help="folder holding digits_classifier.safetensors (default: the base model folder)")
    parser.add_argument("--preprocess", choices=sorted(RESIZE_RULES), default="none",
                        help="'clean': center crop + Lanczos to 256 for real and generated images, the COCO-2014 "
                             "30k protocol the papers use")


def _add_run_args(parser) -> None:
    parser.add_argument("--batch_size", type=int, default=64, help="images per pipeline call and per scoring step")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")


def add_eval_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``stepdistill eval`` / ``eval/evaluate.py``."""
    g = parser.add_argument_group("model and sampler (explicit flags override the student's recipe)")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="base pipeline folder or hub id (default: the student's recorded base model)")
    g.add_argument("--student", default=None, help="a stepdistill output directory (has stepdistill.json)")
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
                   help="COCO-style JSON ({'annotations': [{'image_id', 'caption'}]}) or CSV with image_id and "
                        "caption columns; the first caption of each image is used")
    g.add_argument("--num_images", type=int, default=None,
                   help="default: one image per prompt; more cycles through the prompts")
    g.add_argument("--seed", type=int, default=0)

    g = parser.add_argument_group("metrics")
    g.add_argument("--metrics", nargs="+", default=["fid"], metavar="METRIC",
                   help=f"any of {', '.join(METRICS)} (space- or comma-separated)")
    g.add_argument("--reference_dir", default=None, help="real images for FID")
    g.add_argument("--reference_stats", default=None, help="a .npz written by ref-stats")
    g.add_argument("--clip_model", default=None, help="CLIP folder or hub id for the CLIP score")
    _add_extractor_args(g)

    parser.add_argument("--output_dir", required=True,
                        help="receives images/, grid.png and metrics.json; rerunning resumes")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bars")
    return parser


def add_ref_stats_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``stepdistill ref-stats`` / ``eval/ref_stats.py``."""
    parser.add_argument("--reference_dir", required=True, help="a folder of real images")
    parser.add_argument("--output", required=True, help="the .npz to write")
    _add_extractor_args(parser)
    _add_run_args(parser)
    parser.add_argument("--no_progress", action="store_true")
    return parser


def _print_eval(args) -> None:
    result = run_eval(args)
    scores = {k: result[k] for k in ("fid", "clip_score", "digits_fid", "prompt_agreement") if k in result}
    p = result["protocol"]
    print(json.dumps({**scores, "num_images": p["num_images"], "nfe_per_image": p["nfe_per_image"],
                      "seconds_per_image": p["seconds_per_image"]}, indent=2))
    print(f"wrote {Path(args.output_dir) / METRICS_NAME}")


def _print_ref_stats(args) -> None:
    meta = run_ref_stats(args)
    print(f"wrote {args.output}: {meta['num_images']} images, {meta['feature_extractor']['name']}, "
          f"preprocess {meta['preprocess']}")


def register(subparsers) -> None:
    """Add ``eval`` and ``ref-stats`` to the ``stepdistill`` command."""
    p = subparsers.add_parser("eval", help="generate images and score them (FID, CLIP score, digits metrics)")
    add_eval_args(p)
    p.set_defaults(func=_print_eval)
    p = subparsers.add_parser("ref-stats", help="FID reference statistics (.npz) of a folder of real images")
    add_ref_stats_args(p)
    p.set_defaults(func=_print_ref_stats)


# --------------------------------------------------------------------------------------------------------- prompts


def _clean_text(text: str) -> str:
    return " ".join(str(text).split())


def read_captions(path: str | Path) -> list[str]:
    """The first caption of each image, in file order, from COCO-style JSON or a CSV with image_id/caption."""
    path = Path(path)
    hint = ("pass COCO-style JSON {\"annotations\": [{\"image_id\": .., \"caption\": ..}]} or a CSV with image_id "
            "and caption columns")
    if not path.is_file():
        raise StepdistillError(f"{path}: captions file not found; {hint}")
    try:
        if path.suffix.lower() == ".json":
            raw = json.loads(path.read_text())
            rows = raw.get("annotations") if isinstance(raw, dict) else raw
            if not isinstance(rows, list) or not all(isinstance(r, dict) and {"image_id", "caption"} <= r.keys()
                                                     for r in rows):
                raise StepdistillError(f"{path}: no list of annotations with image_id and caption; {hint}")
        else:
            with open(path, newline="") as f:
                reader = csv.DictReader(f, dialect=csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel)
                columns = reader.fieldnames or []
                if not {"image_id", "caption"} <= set(columns):
                    raise StepdistillError(f"{path}: CSV columns are {columns}, expected image_id and caption")
                rows = list(reader)
    except (json.JSONDecodeError, UnicodeDecodeError, csv.Error) as e:
        raise StepdistillError(f"{path}: cannot parse captions ({e}); {hint}") from e
    first: dict[str, str] = {}
    for r in rows:
        # COCO has five captions per image; the 30k protocol samples one image per caption set
        first.setdefault(str(r["image_id"]), _clean_text(r["caption"]))
    captions = [c for c in first.values() if c]
    if not captions:
        raise StepdistillError(f"{path}: no captions found; {hint}")
    return captions


def _prompt_source(args) -> tuple[list[str], dict]:
    if args.prompts_file and args.captions_file:
        raise StepdistillError("pass either --prompts_file or --captions_file, not both")
    if args.prompts_file:
        prompts, kind, source = read_prompts(args.prompts_file), "prompts_file", str(args.prompts_file)
    elif args.captions_file:
        prompts, kind, source = read_captions(args.captions_file), "captions_file", str(args.captions_file)
    elif "digits" in args.metrics:
        from .toy import data

        prompts, kind, source = data.eval_prompts(), "builtin", "tiny-digits evaluation prompts (toy/data.py)"
    else:
        raise StepdistillError("no prompts: pass --prompts_file (one per line) or --captions_file (COCO JSON/CSV)")
    info = {"kind": kind, "source": source, "num_distinct": len(set(prompts)),
            "sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest()}
    return prompts, info


# ---------------------------------------------------------------------------------------------------------- images


def list_images(directory: str | Path) -> list[Path]:
    return sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def check_reference_dir(directory: str | Path, preprocess: str) -> tuple[list[Path], list[tuple[int, int]]]:
    """The reference images and their distinct sizes, after checking they can be fed to the extractor."""
    from PIL import Image, UnidentifiedImageError

    directory = Path(directory)
    if not directory.is_dir():
        raise StepdistillError(f"--reference_dir {directory}: no such directory; pass a folder of real images")
    paths = list_images(directory)
    if len(paths) < 2:
        raise StepdistillError(f"--reference_dir {directory}: {len(paths)} images found (extensions "
                               f"{', '.join(IMAGE_EXTENSIONS)}); FID needs at least 2")
    sizes: dict[tuple[int, int], Path] = {}
    for p in paths:
        try:
            with Image.open(p) as im:  # reads the header only
                sizes.setdefault(im.size, p)
        except (UnidentifiedImageError, OSError) as e:
            raise StepdistillError(f"--reference_dir {directory}: cannot read {p.name} as an image ({e})") from e
    if len(sizes) > 1 and preprocess == "none":
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise StepdistillError(f"--reference_dir {directory}: images of mixed sizes ({p1.name} is {s1[0]}x{s1[1]}, "
                               f"{p2.name} is {s2[0]}x{s2[1]}); resize them or pass --preprocess clean")
    return paths, list(sizes)


def clean_resize(image, size: int = CLEAN_SIZE):
    """Center crop to a square on the shorter side, then PIL Lanczos to ``size``: the COCO-30k rule."""
    from PIL import Image

    w, h = image.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return image.crop((left, top, left + s, top + s)).resize((size, size), Image.LANCZOS)


def load_images(paths: Sequence[Path], preprocess: str = "none") -> torch.Tensor:
    """uint8 RGB images ``(N, 3, H, W)`` from files, preprocessed for the feature extractor."""
    from PIL import Image

    arrays = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            if preprocess == "clean":
                im = clean_resize(im)
            arrays.append(np.asarray(im))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _clean_batch(images: torch.Tensor) -> torch.Tensor:
    from PIL import Image

    out = [np.asarray(clean_resize(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def preprocess_images(images: torch.Tensor, preprocess: str) -> torch.Tensor:
    return _clean_batch(images) if preprocess == "clean" else images


def _save_png(image: torch.Tensor, path: Path) -> None:
    from PIL import Image

    # write then rename: an interrupted run never leaves a truncated PNG that a resume would trust
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")
    os.replace(tmp, path)


def image_path(output_dir: str | Path, i: int) -> Path:
    return Path(output_dir) / IMAGES_DIR / f"{i:05d}.png"


# ------------------------------------------------------------------------------------------------------ extractors


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digits_classifier_dir(args, base_model: str | None) -> Path:
    from .toy.classifier import WEIGHTS_NAME

    given = args.digits_classifier
    folder = Path(given) if given else (Path(base_model) if base_model else None)
    if folder is None or not (folder / WEIGHTS_NAME).is_file():
        where = f"--digits_classifier {given}" if given else f"the base model {base_model}"
        raise StepdistillError(f"{where} has no {WEIGHTS_NAME}; pass --digits_classifier with a tiny-digits world "
                               "folder (`stepdistill toy build`)")
    return folder


@dataclass
class Extractor:
    module: nn.Module
    protocol: dict = field(default_factory=dict)


def build_extractor(args, base_model: str | None) -> Extractor:
    """The FID feature extractor named by ``--fid_extractor``, with what the protocol records about it."""
    spec = args.fid_extractor
    if spec == "inception":
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
            "weights_sha256": _sha256(weights) if weights else None,
            "own_resize": "bilinear to 299x299 inside torch-fidelity's Inception"})
    if args.inception_weights is not None:
        raise StepdistillError(f"--inception_weights given but --fid_extractor is {spec!r}; drop one of them")
    if spec == "digits":
        from .toy.classifier import WEIGHTS_NAME, DigitsClassifier

        folder = _digits_classifier_dir(args, base_model)
        module = DigitsClassifier.load(folder)
        weights = folder / WEIGHTS_NAME
        return Extractor(module, {"name": f"tiny-digits classifier ({module.num_features}-d penultimate features)",
                                  "weights": str(weights.resolve()), "weights_sha256": _sha256(weights),
                                  "own_resize": "grey, bilinear (antialiased) to 16x16"})
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise StepdistillError(f"--fid_extractor {spec}: expected 'inception', 'digits' or MODULE:CALLABLE")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
        module = factory()
    except (ImportError, AttributeError) as e:
        raise StepdistillError(f"--fid_extractor {spec}: cannot import it ({e})") from e
    if not isinstance(module, nn.Module):
        raise StepdistillError(f"--fid_extractor {spec}: returned {type(module).__name__}, not an nn.Module")
    return Extractor(module.eval(), {"name": spec, "weights": None, "weights_sha256": None,
                                     "own_resize": "whatever the module does"})


def _check_stats_compatible(stats: metrics.FeatureStats, extractor: Extractor, preprocess: str, path: str) -> None:
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


def _make_fid_metric(extractor: Extractor, probe_hw: tuple[int, int], fallback_features: int | None, spec: str):
    """``metrics.make_fid`` for the extractor; a module without ``num_features`` is probed at the size it will see
    (the reference images' size or the clean rule's 256), else takes the reference statistics' dimension."""
    try:
        return metrics.make_fid(extractor.module, input_img_size=(3, *probe_hw))
    except ValueError as e:
        if fallback_features is None:
            raise StepdistillError(f"--fid_extractor {spec}: {e}") from e
        return metrics.make_fid(extractor.module, num_features=fallback_features)


def _num_features(metric) -> int:
    return int(metric.real_features_sum.shape[0])


# ----------------------------------------------------------------------------------------------------- generation


class UnetCounter:
    """Counts UNet evaluations (samples per forward, so a CFG call on 2B latents counts 2B) and their time."""

    def __init__(self, unet: nn.Module, time_it: bool = False):
        self.unet, self.time_it = unet, time_it
        self.samples = 0
        self.seconds = 0.0
        self._start = 0.0

    def _pre(self, module, args, kwargs):
        if self.time_it:
            _sync(self.unet)
            self._start = time.perf_counter()

    def _post(self, module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        self.samples += int(sample.shape[0])
        if self.time_it:
            _sync(self.unet)
            self.seconds += time.perf_counter() - self._start

    @contextmanager
    def counting(self):
        handles = [self.unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                   self.unet.register_forward_hook(self._post, with_kwargs=True)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _sync(module: nn.Module) -> None:
    p = next(module.parameters(), None)
    if p is not None and p.device.type == "cuda":
        torch.cuda.synchronize(p.device)


class Sampler:
    """A stock Diffusers pipeline called with cached prompt embeddings, per-image seeds and counted UNet calls.

    Each distinct prompt is encoded on its own, once (an LRU bounds the cache: 30k COCO captions of SDXL
    embeddings would not fit), so an image never depends on which other prompts shared its batch or were cached
    before: a resumed run reproduces an uninterrupted one. The negative embeddings come from the pipeline's own
    ``encode_prompt`` with CFG on, so SDXL's zeroed negative prompt and SD's encoded "" stay exactly the
    pipeline's choice.
    """

    def __init__(self, pipe, call_kwargs: dict, cache_size: int = 1024, time_unet: bool = False):
        self.pipe = pipe
        self.kind = check_supported(type(pipe).__name__, type(pipe).__name__)
        self.call_kwargs = dict(call_kwargs)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self._negative: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.counter = UnetCounter(pipe.unet, time_it=time_unet)
        pipe.set_progress_bar_config(disable=True)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @torch.no_grad()
    def _encode(self, prompt: str, cfg: bool):
        out = self.pipe.encode_prompt(prompt=[prompt], device=self.device, num_images_per_prompt=1,
                                      do_classifier_free_guidance=cfg)
        if self.kind == "sdxl":
            embeds, negative, pooled, negative_pooled = out
        else:
            (embeds, negative), pooled, negative_pooled = out, None, None
        return (embeds, pooled), (negative, negative_pooled)

    def _embedding(self, prompt: str):
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        value = self._encode(prompt, False)[0]
        self._cache[prompt] = value
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return value

    def embed_kwargs(self, prompts: Sequence[str], cfg: bool) -> dict:
        """``prompt_embeds`` (and pooled/negative ones) for a batch, as the pipeline's ``__call__`` takes them."""
        pairs = [self._embedding(p) for p in prompts]
        kwargs = {"prompt_embeds": torch.cat([e for e, _ in pairs])}
        if self.kind == "sdxl":
            kwargs["pooled_prompt_embeds"] = torch.cat([p for _, p in pairs])
        if cfg:
            if self._negative is None:
                self._negative = self._encode("", True)[1]
            negative, negative_pooled = self._negative
            kwargs["negative_prompt_embeds"] = negative.expand(len(prompts), *negative.shape[1:])
            if self.kind == "sdxl":
                kwargs["negative_pooled_prompt_embeds"] = negative_pooled.expand(len(prompts), -1)
        return kwargs

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], **overrides) -> torch.Tensor:
        """uint8 images ``(N, 3, H, W)`` for ``prompts``, image k drawn with the generator seeded ``seeds[k]``."""
        kwargs = {**self.call_kwargs, **overrides}
        cfg = float(kwargs.get("guidance_scale", 1.0)) > 1.0
        # CPU generators: diffusers draws the noise on the CPU and moves it, so image i is the same on any device
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        with self.counter.counting():
            images = self.pipe(**self.embed_kwargs(prompts, cfg), generator=generators, output_type="pt",
                               **kwargs).images
        return (images.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _parse_timesteps(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(t) for t in str(text).replace(" ", "").split(",") if t]
    except ValueError as e:
        raise StepdistillError(f"--timesteps {text}: expected comma-separated integers, e.g. 999,759,499,259") from e
    if not values:
        raise StepdistillError(f"--timesteps {text!r}: no timesteps given")
    return values


def _scheduler_class(name: str):
    import diffusers
    from diffusers import SchedulerMixin

    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise StepdistillError(f"--scheduler {name}: not a Diffusers scheduler class (e.g. DDIMScheduler, "
                               "LCMScheduler, EulerDiscreteScheduler)")
    return cls


@dataclass
class SamplerSettings:
    """The sampling recipe after merging the student's stepdistill.json with explicit flags."""

    scheduler: str | None
    num_inference_steps: int | None
    timesteps: list[int] | None
    guidance_scale: float
    eta: float | None

    def call_kwargs(self) -> dict:
        return pipeline_call_kwargs(self.guidance_scale, self.num_inference_steps, self.timesteps, self.eta)


def _settings(args, recipe: Recipe | None) -> SamplerSettings:
    timesteps = _parse_timesteps(args.timesteps)
    steps = args.num_inference_steps
    if recipe is not None:
        if timesteps is None and steps is None:  # an explicit step count replaces the recipe's timesteps
            timesteps = list(recipe.timesteps) if recipe.timesteps else None
            steps = recipe.num_inference_steps
        guidance = recipe.guidance_scale if args.guidance_scale is None else args.guidance_scale
        eta = recipe.eta if args.eta is None else args.eta
    else:
        guidance = 7.5 if args.guidance_scale is None else args.guidance_scale  # Stable Diffusion's default
        eta = args.eta
    if steps is None and timesteps is None:
        steps = 25
    if steps is not None and steps < 1:
        raise StepdistillError(f"--num_inference_steps {steps}: must be at least 1")
    return SamplerSettings(args.scheduler, steps, timesteps, float(guidance), eta)


def _load_pipeline(base_model: str, dtype: torch.dtype, device: str):
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(base_model, dtype=dtype)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepdistillError(f"--pretrained_model_name_or_path {base_model}: cannot load the pipeline "
                               f"({first_line})") from e
    check_supported(type(pipe).__name__, base_model)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def _grid(output_dir: Path, n: int) -> Path:
    from .sampling import save_grid

    first = load_images([image_path(output_dir, 0)])
    w = first.shape[-1]
    nrow = min(10, max(2, 4096 // w))  # keep the grid around 4k pixels wide whatever the resolution
    count = min(n, nrow * nrow)
    images = load_images([image_path(output_dir, i) for i in range(count)])
    path = output_dir / "grid.png"
    save_grid(images, path, nrow=nrow, upscale=max(1, 64 // w))
    return path


# ------------------------------------------------------------------------------------------------------------ runs


def _normalise_metrics(values: Sequence[str]) -> list[str]:
    chosen = [m.strip().lower() for v in values for m in str(v).split(",") if m.strip()]
    unknown = [m for m in chosen if m not in METRICS]
    if unknown or not chosen:
        raise StepdistillError(f"--metrics {' '.join(values)}: unknown {', '.join(unknown) or 'empty list'}; "
                               f"choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(chosen))


def _device(name: str | None) -> str:
    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _read_generation(output_dir: Path) -> dict | None:
    path = output_dir / GENERATION_NAME
    return json.loads(path.read_text()) if path.is_file() else None


@dataclass
class _FidSetup:
    metric: Any
    extractor: Extractor
    reference: dict
    ref_paths: list[Path] | None = None
    stats: metrics.FeatureStats | None = None


def _prepare_fid(args, base_model: str, device: str) -> _FidSetup:
    if bool(args.reference_dir) == bool(args.reference_stats):
        raise StepdistillError("FID needs exactly one reference: --reference_dir (real images) or "
                               "--reference_stats (a .npz from ref-stats)")
    ref_paths = stats = None
    if args.reference_dir:
        ref_paths, ref_sizes = check_reference_dir(args.reference_dir, args.preprocess)
        reference = {"kind": "dir", "path": str(Path(args.reference_dir).resolve()), "num_images": len(ref_paths),
                     "image_sizes": [list(s) for s in ref_sizes[:5]]}
        probe = ref_sizes[0][::-1]
    else:
        try:
            stats = metrics.load_stats(args.reference_stats)
        except (FileNotFoundError, ValueError) as e:
            raise StepdistillError(f"--reference_stats {args.reference_stats}: {e}") from e
        reference = {"kind": "stats", "path": str(Path(args.reference_stats).resolve()),
                     "num_images": stats.meta.get("num_images"), "stats_meta": stats.meta}
        probe = (args.resolution or 299,) * 2
    if args.preprocess == "clean":
        probe = (CLEAN_SIZE, CLEAN_SIZE)
    extractor = build_extractor(args, base_model)
    if stats is not None:
        _check_stats_compatible(stats, extractor, args.preprocess, args.reference_stats)
    metric = _make_fid_metric(extractor, probe, len(stats.mu) if stats is not None else None,
                              args.fid_extractor).to(device)
    extractor.protocol["num_features"] = _num_features(metric)
    if stats is not None and _num_features(metric) != len(stats.mu):
        raise StepdistillError(f"--reference_stats {args.reference_stats} has {len(stats.mu)} features but "
                               f"--fid_extractor {args.fid_extractor} gives {_num_features(metric)}")
    return _FidSetup(metric, extractor, reference, ref_paths, stats)


def _prepare_clip(args, device: str) -> metrics.ClipScore:
    if not args.clip_model:
        raise StepdistillError("--metrics clip needs --clip_model (a CLIP folder or hub id)")
    if str(args.clip_model).startswith((".", "/", "~")) and not Path(args.clip_model).exists():
        raise StepdistillError(f"--clip_model {args.clip_model}: no such directory")
    try:
        return metrics.make_clip_score(args.clip_model).to(device)
    except OSError as e:
        raise StepdistillError(f"--clip_model {args.clip_model}: cannot load CLIP ({str(e).splitlines()[0]})") from e


def _prepare_pipeline(args, base_model: str, recipe: Recipe | None, settings: SamplerSettings, device: str):
    """The pipeline with the student and scheduler applied, and the arguments every call gets."""
    scheduler_cls = _scheduler_class(settings.scheduler) if settings.scheduler else None
    pipe = _load_pipeline(base_model, DTYPES[args.dtype], device)
    if recipe is not None:
        from .recipe import load as apply_student

        apply_student(pipe, args.student)
    if scheduler_cls is not None:
        # from the current config, so the recipe's scheduler_kwargs (e.g. timestep_spacing) carry over
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    if settings.timesteps and "timesteps" not in inspect.signature(pipe.scheduler.set_timesteps).parameters:
        raise StepdistillError(f"--timesteps: {type(pipe.scheduler).__name__} does not take custom timesteps; pass "
                               "--num_inference_steps or a scheduler that does (e.g. LCMScheduler)")
    resolution = args.resolution or int(pipe.unet.config.sample_size) * pipe.vae_scale_factor
    return pipe, {**settings.call_kwargs(), "height": resolution, "width": resolution}


def _generate_missing(pipe, call_kwargs: dict, prompts: list[str], batches: list[range], args, output_dir: Path,
                      state: dict) -> None:
    sampler = Sampler(pipe, call_kwargs)
    # a batch with any image missing is redone whole, so every image is computed in the same batch as before
    todo = [b for b in batches if not all(image_path(output_dir, i).is_file() for i in b)]
    bar = tqdm(total=sum(len(b) for b in todo), desc="generating", unit="img", disable=args.no_progress)
    for batch in todo:
        before = sampler.counter.samples
        start = time.perf_counter()
        images = sampler([prompts[i] for i in batch], [args.seed + i for i in batch])
        state["generation_seconds"] += time.perf_counter() - start
        state["unet_samples"] += sampler.counter.samples - before
        state["generated_images"] += len(batch)
        if state["timesteps"] is None:
            state["timesteps"] = [int(t) if float(t).is_integer() else round(float(t), 4)
                                  for t in pipe.scheduler.timesteps.tolist()]
        for i, image in zip(batch, images):
            if not image_path(output_dir, i).is_file():
                _save_png(image, image_path(output_dir, i))
        # after the images, so the counts never claim images an interruption lost
        (output_dir / GENERATION_NAME).write_text(json.dumps(state, indent=2))
        bar.update(len(batch))
    bar.close()


def _score(args, output_dir: Path, prompts: list[str], batches: list[range], fid: _FidSetup | None,
           clip: metrics.ClipScore | None, judge, device: str) -> dict:
    """Scores streamed from the written files, so a resumed run scores exactly what an uninterrupted one does."""
    result: dict[str, Any] = {}
    digit_images = []
    for batch in tqdm(batches, desc="scoring", unit="batch", disable=args.no_progress):
        images = load_images([image_path(output_dir, i) for i in batch])
        if fid is not None:
            fid.metric.update(preprocess_images(images, args.preprocess).to(device), real=False)
        if clip is not None:
            clip.update(images.to(device), [prompts[i] for i in batch])
        if judge is not None:
            digit_images.append(images)
    if fid is not None:
        fake = metrics.stats_from_fid(fid.metric, real=False)
        if fid.ref_paths is not None:
            for start in range(0, len(fid.ref_paths), args.batch_size):
                real = load_images(fid.ref_paths[start:start + args.batch_size], args.preprocess)
                fid.metric.update(real.to(device), real=True)
            real_mu, real_sigma = metrics.stats_from_fid(fid.metric, real=True)
        else:
            real_mu, real_sigma = fid.stats.mu, fid.stats.sigma
        result["fid"] = metrics.frechet_distance(*fake, real_mu, real_sigma)
        if len(prompts) < fid.extractor.protocol["num_features"]:
            logger.warning("FID from %d images of %d-d features is strongly biased upwards; compare only runs "
                           "with the same number of images", len(prompts), fid.extractor.protocol["num_features"])
    if clip is not None:
        result["clip_score"] = clip.compute()
    if judge is not None:
        scores = judge.score(torch.cat(digit_images), prompts)
        result["digits_fid"], result["prompt_agreement"] = scores["digits_fid"], scores["prompt_agreement"]
    return result


def run_eval(args) -> dict:
    """Generate (or resume) the images, score them and write ``metrics.json``; returns its content."""
    args.metrics = _normalise_metrics(args.metrics)
    need_fid, need_clip, need_digits = ("fid" in args.metrics, "clip" in args.metrics, "digits" in args.metrics)
    device = _device(args.device)

    # ---- every check that can fail comes before the pipeline runs
    recipe = Recipe.load(args.student) if args.student else None
    base_model = args.pretrained_model_name_or_path or (recipe.base_model if recipe else None)
    if base_model is None:
        raise StepdistillError("no base model: pass --pretrained_model_name_or_path (or a --student whose recipe "
                               "names one)")
    base_model = str(base_model)
    class_name = _check_pipeline_folder(base_model)
    if class_name is not None:
        check_supported(class_name, base_model)
    settings = _settings(args, recipe)
    if settings.scheduler:
        _scheduler_class(settings.scheduler)

    prompts_all, prompt_info = _prompt_source(args)
    num_images = args.num_images if args.num_images is not None else len(prompts_all)
    if args.batch_size < 1:
        raise StepdistillError(f"--batch_size {args.batch_size}: must be at least 1")
    if (need_fid or need_digits) and num_images < 2:
        raise StepdistillError(f"--num_images {num_images}: FID needs at least 2 images (thousands for a "
                               "meaningful number)")
    if num_images < 1:
        raise StepdistillError(f"--num_images {num_images}: must be at least 1")
    prompt_info["cycled"] = num_images > len(prompts_all)
    prompts = [prompts_all[i % len(prompts_all)] for i in range(num_images)]

    fid = _prepare_fid(args, base_model, device) if need_fid else None
    if not need_fid and (args.reference_dir or args.reference_stats):
        logger.warning("a FID reference was given but --metrics has no fid; it is ignored")
    clip = _prepare_clip(args, device) if need_clip else None
    judge = digits_dir = None
    if need_digits:
        from .toy.classifier import DigitsClassifier
        from .toy.evaluate import DigitsJudge

        digits_dir = _digits_classifier_dir(args, base_model)
        judge = DigitsJudge(DigitsClassifier.load(digits_dir))

    output_dir = Path(args.output_dir)
    previous = _read_generation(output_dir)
    if previous is None and (output_dir / IMAGES_DIR).is_dir() and any((output_dir / IMAGES_DIR).glob("*.png")):
        raise StepdistillError(f"--output_dir {output_dir}: holds images but no {GENERATION_NAME}, so they cannot "
                               "be resumed safely; use an empty directory")

    pipe, call_kwargs = _prepare_pipeline(args, base_model, recipe, settings, device)
    fingerprint = _json_safe({
        "model": str(Path(base_model).resolve()) if class_name is not None else base_model,
        "student": str(Path(args.student).resolve()) if args.student else None,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
        "call_kwargs": call_kwargs, "seed": args.seed, "dtype": args.dtype, "prompts_sha256": prompt_info["sha256"],
    })
    if previous is not None and previous.get("fingerprint") != fingerprint:
        changed = sorted(k for k in fingerprint if previous.get("fingerprint", {}).get(k) != fingerprint[k])
        raise StepdistillError(f"--output_dir {output_dir}: holds images of another run (differs in "
                               f"{', '.join(changed)}); use a new --output_dir or delete it")
    if previous is not None and previous.get("batch_size") != args.batch_size:
        logger.warning("resuming with --batch_size %d instead of %s: images may differ in the last bits",
                       args.batch_size, previous.get("batch_size"))

    # ---- generation (resumable), then scoring
    (output_dir / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    state = previous or {"fingerprint": fingerprint, "generated_images": 0, "unet_samples": 0,
                         "generation_seconds": 0.0, "timesteps": None}
    state["batch_size"] = args.batch_size
    batches = [range(s, min(s + args.batch_size, num_images)) for s in range(0, num_images, args.batch_size)]
    _generate_missing(pipe, call_kwargs, prompts, batches, args, output_dir, state)
    result = _score(args, output_dir, prompts, batches, fid, clip, judge, device)
    grid = _grid(output_dir, num_images)

    result["protocol"] = _json_safe({
        "num_images": num_images,
        "prompts": prompt_info,
        "reference": fid.reference if fid else None,
        "preprocess": args.preprocess if fid else None,
        "resize_rule": RESIZE_RULES[args.preprocess] if fid else None,
        "feature_extractor": fid.extractor.protocol if fid else None,
        "clip": {"model": str(args.clip_model), "score_scale": CLIP_SCALE} if clip else None,
        "digits": {"classifier": str(digits_dir.resolve()),
                   "reference": "all 1797 scikit-learn digits at 16x16, uint8",
                   "prompt_agreement": "share of images the classifier reads as the prompted digit"}
        if judge else None,
        "model": fingerprint["model"], "student": fingerprint["student"],
        "method": recipe.method if recipe else None, "adapter": recipe.adapter if recipe else None,
        "recipe_extra": recipe.extra if recipe else None,
        "scheduler": fingerprint["scheduler"], "scheduler_config": fingerprint["scheduler_config"],
        "num_inference_steps": len(state["timesteps"] or []), "timesteps": state["timesteps"],
        "guidance_scale": settings.guidance_scale, "eta": settings.eta,
        "cfg": "Diffusers convention eps_u + w (eps_c - eps_u); on when w > 1 and the UNet is not "
               "guidance-conditioned",
        "nfe_per_image": state["unet_samples"] / max(state["generated_images"], 1),
        "seconds_per_image": state["generation_seconds"] / max(state["generated_images"], 1),
        "timing": "wall clock of the pipeline calls (prompt encoding, UNet, scheduler, VAE decode; not PNG "
                  "writing) over every run that generated images for this directory",
        "resolution": [call_kwargs["height"], call_kwargs["width"]], "seed": args.seed, "seeding": SEEDING,
        "batch_size": args.batch_size, "device": device, "dtype": args.dtype,
        "images": str((output_dir / IMAGES_DIR).resolve()), "grid": str(grid.resolve()),
        "versions": _versions(),
    })
    (output_dir / METRICS_NAME).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _versions() -> dict:
    import diffusers
    import torchmetrics
    import transformers

    from . import __version__

    return {"stepdistill": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "torchmetrics": torchmetrics.__version__}


def run_ref_stats(args) -> dict:
    """Mean and covariance of a folder of real images under an extractor and resize rule, saved to ``.npz``."""
    paths, sizes = check_reference_dir(args.reference_dir, args.preprocess)
    extractor = build_extractor(args, None)
    device = _device(args.device)
    probe = (CLEAN_SIZE, CLEAN_SIZE) if args.preprocess == "clean" else sizes[0][::-1]
    fid_metric = _make_fid_metric(extractor, probe, None, args.fid_extractor).to(device)
    extractor.protocol["num_features"] = _num_features(fid_metric)
    for start in tqdm(range(0, len(paths), args.batch_size), desc="reference", unit="batch",
                      disable=args.no_progress):
        fid_metric.update(load_images(paths[start:start + args.batch_size], args.preprocess).to(device), real=True)
    mu, sigma = metrics.stats_from_fid(fid_metric, real=True)
    meta = _json_safe({"source": str(Path(args.reference_dir).resolve()), "num_images": len(paths),
                       "image_sizes": [list(s) for s in sizes[:5]], "preprocess": args.preprocess,
                       "resize_rule": RESIZE_RULES[args.preprocess], "feature_extractor": extractor.protocol,
                       "versions": _versions()})
    metrics.save_stats(args.output, mu, sigma, **meta)
    return meta


# ------------------------------------------------------------------------------------------------------- benchmark


def bench_sampling(model: str | Path, num_images: int = 250, batch_size: int = 250, repeats: int = 3,
                   teacher_steps: int = 25, guidance_scale: float = 3.0, student_nfe: Sequence[int] = (1, 2, 4),
                   progress: bool = True) -> list[dict]:
    """Images per second of the teacher (DDIM, CFG) and of 1/2/4-evaluation samplers (LCMScheduler, no CFG) on the
    same UNet, through the same :class:`Sampler` the evaluation uses.

    The configurations take turns within each pass and each keeps its fastest timed pass (pass 0 warms up): the
    machine is shared, so drift hits all of them alike and the minimum is the least disturbed estimate. Time inside
    the UNet and the VAE decoder is measured with hooks; what remains is the sampler's own overhead.
    """
    from diffusers import DDIMScheduler, LCMScheduler

    from .toy import data

    pipe = _load_pipeline(str(model), torch.float32, "cpu")
    base_config = pipe.scheduler.config
    prompts = [data.eval_prompts()[i % len(data.eval_prompts())] for i in range(num_images)]
    configs = [("teacher: DDIM + CFG", DDIMScheduler.from_config(base_config), teacher_steps, guidance_scale)]
    configs += [(f"LCMScheduler, {n} step{'s' if n > 1 else ''}", LCMScheduler.from_config(base_config), n, 1.0)
                for n in student_nfe]
    samplers = [Sampler(pipe, {"num_inference_steps": steps, "guidance_scale": w}, time_unet=True)
                for _, _, steps, w in configs]
    # CFG doubles the UNet batch; halving the teacher's images per call keeps every UNet call at batch_size
    # latents, so per-evaluation cost (which depends on the batch through cache effects) is the same for all
    per_call = [max(1, batch_size // 2) if w > 1 else batch_size for _, _, _, w in configs]
    decode = _ModuleTimer(pipe.vae.decoder)
    best: list[dict | None] = [None] * len(configs)
    for rep in range(repeats + 1):
        for k, ((name, scheduler, _, _), sampler, b) in enumerate(zip(configs, samplers, per_call)):
            pipe.scheduler = scheduler
            sampler.counter.samples, sampler.counter.seconds, decode.seconds = 0, 0.0, 0.0
            start = time.perf_counter()
            with decode.timing():
                for s in range(0, num_images, b):
                    sampler(prompts[s:s + b], range(s, min(s + b, num_images)))
            run = {"seconds": time.perf_counter() - start, "unet_seconds": sampler.counter.seconds,
                   "decode_seconds": decode.seconds, "nfe": sampler.counter.samples / num_images}
            if rep > 0 and (best[k] is None or run["seconds"] < best[k]["seconds"]):
                best[k] = run
            if progress:
                logger.info("pass %d, %s: %.2f s", rep, name, run["seconds"])
    rows = [{"sampler": name, "steps": steps, "guidance_scale": w, **b, "images_per_second": num_images / b["seconds"]}
            for (name, _, steps, w), b in zip(configs, best)]
    teacher = rows[0]
    per = 1e3 / num_images
    for r in rows:
        r["speedup"] = r["images_per_second"] / teacher["images_per_second"]
        r["nfe_ratio"] = teacher["nfe"] / r["nfe"]
        r["efficiency"] = r["speedup"] / r["nfe_ratio"]
        r["unet_ms"], r["decode_ms"] = r["unet_seconds"] * per, r["decode_seconds"] * per
        r["other_ms"] = (r["seconds"] - r["unet_seconds"] - r["decode_seconds"]) * per
        # the speed-up a sampler with zero overhead of its own would reach, given the measured UNet and decode
        r["limit_with_decode"] = (teacher["unet_ms"] + teacher["decode_ms"]) / (r["unet_ms"] + r["decode_ms"])
        r["efficiency_with_decode"] = r["speedup"] / r["limit_with_decode"]
    return rows


class _ModuleTimer:
    def __init__(self, module: nn.Module):
        self.module, self.seconds, self._start = module, 0.0, 0.0

    @contextmanager
    def timing(self):
        def pre(*_):
            _sync(self.module)
            self._start = time.perf_counter()

        def post(*_):
            _sync(self.module)
            self.seconds += time.perf_counter() - self._start

        handles = [self.module.register_forward_pre_hook(pre), self.module.register_forward_hook(post)]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def format_bench_table(rows: list[dict], num_images: int, batch_size: int) -> str:
    lines = [f"{num_images} images per pass, {batch_size} latents per UNet call (the CFG teacher takes "
             f"{max(1, batch_size // 2)} images per call), fastest timed pass; ms are per image",
             "",
             "| sampler | NFE/image | images/s | speed-up | NFE ratio | speed-up / NFE ratio | limit with decode | "
             "speed-up / that limit | UNet ms | VAE decode ms | other ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['sampler']} | {r['nfe']:g} | {r['images_per_second']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['nfe_ratio']:.1f}x | {r['efficiency']:.2f} | {r['limit_with_decode']:.1f}x | "
                     f"{r['efficiency_with_decode']:.2f} | {r['unet_ms']:.2f} | {r['decode_ms']:.2f} | "
                     f"{r['other_ms']:.2f} |")
    return "\n".join(lines)
