"""Training an MSD output: the partition, then one distribution-matching run per student on its part, then the
output (Song et al. 2024, arXiv 2410.23274, sections 3.2-3.3).

    python train_scripts/train_msd.py --config train_scripts/configs/tiny_digits/msd.yaml --output_dir runs/msd
    stepdistill train msd --student_method dmd2 --num_students 4 [DMD2's options]

1. The router is built from the training captions (``partition``: balanced k-means on pooled text embeddings,
   ``classes`` in contiguous blocks, or explicit ``patterns``) and written to the output folder first; a later
   launch on the same folder reuses it, so students trained by separate launches (``--students 2``, one student
   per process group) share one partition.
2. Student k trains with the chosen method (DMD2 or SiD) on the samples whose captions route to k (prompts, and
   real images when the GAN is on), with seed + k, into ``students/k``. A smaller student (``--student_channel_
   multiplier``, ``--student_config``) first runs ``--tsm_steps`` of teacher score matching (``students/k/tsm``)
   and starts distribution matching from it. A student already on disk is not trained again.
3. When all K students are on disk, the MSD output (router, ``msd.json``, recipe, card) is written, and so is one
   for every ``--save_output_steps`` snapshot the students have.

The partition used in training and the router at inference are one function (``Router.route``).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Sequence

from ..config import option, parse_config
from ..errors import StepdistillError
from .partition import ROUTER_JSON, Router, balanced_kmeans, class_blocks, explicit, pooled_text_embeddings

logger = logging.getLogger("stepdistill")
BASE_METHODS = ("dmd2", "sid")


@dataclass
class MSDOptions:
    """Multi-student distillation: K students, each distilled on its part of the prompts, and a router."""

    # a config's top-level `method:` names what it trains (msd); a legacy `method: dmd2|sid` in an MSD config is read
    # as student_method (parse_config)
    method_name = "msd"
    legacy_method_field = "student_method"

    student_method: str = option("dmd2", "distribution-matching method of every student", choices=BASE_METHODS,
                                 aliases=("--method",))
    num_students: int = option(4, "K, the number of students (and parts of the prompt space)")
    partition: str = option("kmeans", "kmeans: balanced k-means on pooled text embeddings (MSD's choice for text); "
                                      "classes: --partition_classes in K contiguous blocks; patterns: "
                                      "--partition_patterns", choices=("kmeans", "classes", "patterns"))
    partition_classes: list[str] = option([], "the classes, in order, one regular expression each (e.g. "
                                              "'\\b(0|zero)\\b'): a caption's class is the first that matches")
    partition_patterns: list[str] = option([], "explicit partition, 'REGEX=>K' items, first match wins")
    students: list[int] = option([], "train only these students (default: all); the MSD output is written once "
                                     "all K are on disk")
    tsm_steps: int = option(0, "teacher score matching iterations before distribution matching (smaller students: "
                               "a stable start; needs images)")
    tsm_learning_rate: float = option(1e-4, "learning rate of teacher score matching")


def msd_config_class(method: str):
    """The config of an MSD run over ``method``: the method's own options plus MSD's."""
    from ..methods import get_method

    if method not in BASE_METHODS:
        raise StepdistillError(f"--student_method {method}: MSD students train with one of {', '.join(BASE_METHODS)}")
    base = get_method(method).config_class
    cls = dataclasses.make_dataclass(f"MSD{base.__name__}", [], bases=(base, MSDOptions))
    cls.__doc__ = f"{MSDOptions.__doc__} Students train with {method}; its options follow."
    cls.validate = _validate
    return cls


def _validate(self) -> None:
    super(type(self), self).validate()
    if self.num_students < 1:
        raise StepdistillError(f"--num_students {self.num_students}: must be at least 1")
    bad = [k for k in self.students if not 0 <= k < self.num_students]
    if bad:
        raise StepdistillError(f"--students {bad}: students are numbered 0..{self.num_students - 1}")
    if self.partition == "classes" and not self.partition_classes:
        raise StepdistillError("--partition classes needs --partition_classes (one regular expression per class)")
    if self.partition == "patterns" and not self.partition_patterns:
        raise StepdistillError("--partition patterns needs --partition_patterns ('REGEX=>K' items)")
    for regex in self.partition_classes:
        _compile(regex, "--partition_classes")
    parse_patterns(self.partition_patterns)
    if self.tsm_steps < 0:
        raise StepdistillError(f"--tsm_steps {self.tsm_steps}: must be >= 0")
    if self.tsm_steps and not (self.student_config or self.student_channel_multiplier is not None):
        raise StepdistillError("--tsm_steps initialises a student of its own shape: add --student_channel_multiplier "
                               "or --student_config (a same-size student starts as the teacher already)")
    if self.tsm_steps and not self.image_sources():
        raise StepdistillError("--tsm_steps regresses the teacher on noised real images: pass --train_data_dir, "
                               "--dataset_name or --train_shards")


def _compile(regex: str, option_name: str):
    try:
        return re.compile(regex)
    except re.error as e:
        raise StepdistillError(f"{option_name} {regex!r} is not a regular expression ({e})") from None


def parse_patterns(items: Sequence[str]) -> list[tuple[str, int]]:
    out = []
    for item in items:
        regex, sep, k = item.rpartition("=>")
        if not sep or not k.strip().isdigit():
            raise StepdistillError(f"--partition_patterns {item!r}: expected 'REGEX=>K', e.g. '\\bcat\\b=>0'")
        out.append((_compile(regex, "--partition_patterns").pattern, int(k)))
    return out


# ------------------------------------------------------------------------------------------------------- router
def build_router(config, captions: list[str], embed=None) -> Router:
    """The partition of the training captions (each distinct caption once). ``embed(prompts)`` gives pooled text
    embeddings (k-means only). Errors name the bad input before any training."""
    captions = list(dict.fromkeys(captions))
    k = config.num_students
    if config.partition == "patterns":
        router = explicit(parse_patterns(config.partition_patterns), k)
    elif config.partition == "classes":
        classes = [_compile(r, "--partition_classes") for r in config.partition_classes]
        blocks = class_blocks(len(classes), k)  # class c → part: contiguous blocks of (almost) equal size
        router = explicit([(c.pattern, blocks.assignments[str(i)]) for i, c in enumerate(classes)], k)
    else:
        if k > len(captions):
            raise StepdistillError(f"--num_students {k} is larger than the number of distinct prompts "
                                   f"({len(captions)}): every student needs a part of its own")
        return balanced_kmeans(captions, embed(captions), k, seed=config.seed)
    router.assignments = {c: router._match(c) for c in captions}  # a caption no pattern covers is an error here
    empty = sorted(set(range(k)) - set(router.assignments.values()))
    if empty:
        raise StepdistillError(f"students {empty} get no training caption under this partition; change the "
                               "partition or --num_students")
    return router


def _text_embedder(config):
    """Pooled text embeddings with the base pipeline's text encoder (the teacher, loaded once, on the CPU)."""
    from ..teacher import Teacher

    teacher = Teacher.for_config(config)  # float32, on the CPU; revision, variant and cache folder as training
    return lambda prompts: pooled_text_embeddings(teacher.pipe, prompts)


# ------------------------------------------------------------------------------------------------------- training
class MSDTraining:
    def __init__(self, config):
        from ..data import build_dataset
        from ..methods import get_method
        from ..preflight import check_resolution, preflight

        self.config, self.method_cls = config, get_method(config.student_method)
        preflight(config, self.method_cls)
        self.output_dir = Path(config.output_dir)
        self.main_process = int(os.environ.get("RANK", "0")) == 0
        dataset = build_dataset(config, check_resolution(config), need_images=False)
        all_captions = dataset.all_captions()  # streamed data: one pass that decodes no image
        data_captions = list(dict.fromkeys(all_captions))
        # the prompts the students learn from: the prompt file's when images only feed the GAN, else the captions
        from ..prompts import read_prompts

        file_prompts = config.prompts_file and dataset.has_images
        self.captions = list(dict.fromkeys(read_prompts(config.prompts_file))) if file_prompts else data_captions
        self.router = self._router()
        self.parts = dict(zip(self.captions, self.router.route(self.captions, None)))
        # the real images' captions (GAN) and the validation prompts follow the router too
        extra = list(dict.fromkeys(p for p in data_captions + list(config.validation_prompts)
                                   if p not in self.parts))
        if extra:
            embed = self._embedder() if self.router.kind == "kmeans" else None
            self.parts.update(zip(extra, self.router.route(extra, embed(extra) if embed else None)))
        sizes = [sum(1 for c in all_captions if self.parts[c] == k) for k in range(config.num_students)]
        logger.info("MSD partition (%s, K=%d): samples per student %s", config.partition, config.num_students, sizes)

    def _embedder(self):
        """The pooled-text embedder, loaded once for the router and the validation prompts."""
        if getattr(self, "_embed", None) is None:
            self._embed = _text_embedder(self.config)
        return self._embed

    def _router(self) -> Router:
        path = self.output_dir / ROUTER_JSON
        if path.is_file():  # a launch for other students of the same output: the partition is fixed already
            router = Router.load(self.output_dir)
            if router.num_students != self.config.num_students:
                raise StepdistillError(f"{self.output_dir}: its router has {router.num_students} students, not "
                                       f"--num_students {self.config.num_students}; use a new --output_dir")
            unknown = [c for c in self.captions if c not in router.assignments]
            if unknown and router.kind != "explicit":
                raise StepdistillError(f"{self.output_dir}: its router was built from other data ({unknown[0]!r} "
                                       "is new); use a new --output_dir")
            return router
        embed = self._embedder() if self.config.partition == "kmeans" else None
        router = build_router(self.config, self.captions, embed)
        if self.main_process:
            router.save(self.output_dir)
        return router

    def student_dir(self, k: int) -> Path:
        return self.output_dir / "students" / str(k)

    def _stage_config(self, cls, k: int, output_dir: Path, **overrides):
        values = {f.name: getattr(self.config, f.name) for f in fields(cls) if hasattr(self.config, f.name)}
        values.update(output_dir=str(output_dir), seed=self.config.seed + k, **overrides)
        stage = cls(**values)
        stage.validate()
        return stage

    def train_student(self, k: int) -> Path:
        from ..methods.tsm import TSM
        from ..trainer import Trainer

        c, out = self.config, self.student_dir(k)
        if (out / "stepdistill.json").is_file():
            logger.info("student %d: already trained (%s)", k, out)
            return out
        keep = lambda caption: self.parts.get(caption) == k  # noqa: E731
        overrides = {}
        if c.tsm_steps:
            tsm_dir = out / "tsm"
            if not (tsm_dir / "stepdistill.json").is_file():
                logger.info("student %d: teacher score matching, %d steps", k, c.tsm_steps)
                tsm = self._stage_config(TSM.config_class, k, tsm_dir, max_train_steps=c.tsm_steps,
                                         learning_rate=c.tsm_learning_rate, use_lora=False,
                                         save_output_steps=[], guidance_scale=getattr(c, "real_guidance_scale", 3.0))
                Trainer(tsm, TSM, keep=keep).train()
                gc.collect()
            overrides = dict(student_init=str(tsm_dir / "unet"), student_channel_multiplier=None, student_config=None)
        logger.info("student %d of %d: %s", k, c.num_students, c.student_method)
        stage = self._stage_config(self.method_cls.config_class, k, out, **overrides)
        Trainer(stage, self.method_cls, keep=keep).train()
        gc.collect()
        return out

    def train(self) -> Path:
        c = self.config
        for k in c.students or range(c.num_students):
            self.train_student(k)
        if self.main_process:
            self.write_outputs()
        return self.output_dir

    def write_outputs(self) -> None:
        """The MSD output once all K students are on disk (and one per snapshot step they all have)."""
        dirs = [self.student_dir(k) for k in range(self.config.num_students)]
        missing = [k for k, d in enumerate(dirs) if not (d / "stepdistill.json").is_file()]
        if missing:
            logger.info("students %s are not trained yet; the MSD output is written by the run that trains the "
                        "last of them", missing)
            return
        write_msd_output(self.output_dir, dirs, self.router, self.config)
        snapshots = {p.name for p in (dirs[0] / "snapshots").glob("step-*") if p.is_dir()}
        for name in sorted(snapshots):
            found = [d / "snapshots" / name for d in dirs]
            if all((p / "stepdistill.json").is_file() for p in found):
                write_msd_output(self.output_dir / "snapshots" / name, found, self.router, self.config)


def write_msd_output(output_dir: Path, student_dirs: list[Path], router: Router, config) -> Path:
    from ..outputs import save_output
    from ..recipe import Recipe
    import diffusers

    from ..teacher import pipeline_class_name
    from .routed import MSDStudents

    first = Recipe.load(student_dirs[0])
    recipe = dataclasses.replace(first, method="msd", adapter="msd",
                                 extra={**first.extra, "student_method": first.method,
                                        "num_students": len(student_dirs), "partition": config.partition})
    save_output(MSDStudents(student_dirs, router), output_dir, recipe,
                getattr(diffusers, pipeline_class_name(config.pretrained_model_name_or_path, config.revision)))
    (Path(output_dir) / "msd_parts.json").write_text(json.dumps(
        {"captions_per_student": [sum(1 for v in router.assignments.values() if v == k) for k in range(len(student_dirs))]}) + "\n")
    logger.info("wrote the MSD output %s", output_dir)
    return Path(output_dir)


# ------------------------------------------------------------------------------------------------------- entry
def _peek_method(argv: list[str]) -> str:
    """The students' method: --student_method (or its former name --method) from the command line, else
    student_method (or a legacy method: other than msd) from the --config file, else dmd2 (before the full parse,
    which needs the method's options)."""
    from ..config import read_config_file

    for i, arg in enumerate(argv):
        for flag in ("--student_method", "--method"):
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    for i, arg in enumerate(argv):
        path = argv[i + 1] if arg == "--config" and i + 1 < len(argv) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if path and Path(path).is_file():
            loaded = read_config_file(path)
            if "student_method" in loaded:
                return str(loaded["student_method"])
            if str(loaded.get("method", "msd")) != "msd":
                return str(loaded["method"])
    return "dmd2"


def train_msd_from_argv(argv: list[str] | None = None, prog: str | None = None) -> Path:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    config = parse_config(msd_config_class(_peek_method(argv)), argv, prog=prog or "train_msd.py", method="msd")
    from ..fsdp import fsdp_requested

    if fsdp_requested():
        raise StepdistillError("FSDP launch (ACCELERATE_USE_FSDP=true) of MSD: not supported (its K runs and "
                               "router are untested under FSDP); launch it with DDP (configs/accelerate/ddp.yaml)")
    return MSDTraining(config).train()
