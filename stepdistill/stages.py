"""Pipelines of stages: one config runs distillation stages in order, each stage's student starting from the
previous stage's output (``--init_from_output``): Hyper-SD's own route to one step (TSCD 8 -> 4 -> 2, then
distribution matching on the same LoRA), or MSD students initialised from one DMD2 student.

    pretrained_model_name_or_path: assets/tiny-digits-sd   # top level: options every stage shares
    train_data_dir: builtin:tiny-digits
    stages:
      - name: tscd                                         # optional (default: the method); names the stage folder
        method: tscd
        segments: [8, 4, 2]                                # the stage's own options win over the shared ones
      - name: dm
        method: dmd2
        max_train_steps: 500

    stepdistill train --config FILE.yaml --output_dir DIR [options]    # command-line options apply to every stage

Stage i trains into ``DIR/stages/<i>-<name>/``; the next stage starts from it. ``DIR`` gets the last stage's output
(weights, its recipe ``stepdistill.json``, card, samples) and ``stages.json``, the record of the stages. Every stage
is parsed and checked before the first trains (the stages must share the base model and the student kind, LoRA or
full UNet, and a LoRA's rank and alpha). A rerun skips the finished stages (those whose output recipe exists; their
options must be the ones they finished with) and resumes an unfinished one from its latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from .config import parse_config, read_config_file
from .errors import StepdistillError
from .recipe import RECIPE_NAME

logger = logging.getLogger("stepdistill")
STAGES_DIR = "stages"
RECORD_NAME = "stages.json"
STAGE_RECORD = "stage.json"
# options that change how a run is kept or watched, not what it trains: a finished stage is still valid when they
# differ
RUN_ONLY = {"output_dir", "resume_from_checkpoint", "checkpointing_steps", "checkpoints_total_limit", "report_to",
            "tracker_project_name", "validation_steps", "dataloader_num_workers", "push_to_hub", "hub_model_id",
            "latent_cache_dir", "on_nan", "max_nan_skips"}
# what of the last stage's folder is not its output
NOT_OUTPUT = re.compile(r"^(checkpoint-\d+|snapshots|latent_cache|logs\.jsonl|stage\.json|\..*)$")


@dataclass
class Stage:
    index: int
    name: str
    method: str  # a registered method, or msd
    config: object
    method_cls: type | None  # None for msd (an orchestration of DM trainers)

    @property
    def dir(self) -> Path:
        return Path(self.config.output_dir)

    @property
    def kind(self) -> str:
        """The student kind: the output kind a method writes (msd: its students')."""
        if self.method_cls is None:
            return "lora" if self.config.use_lora else "full_unet"
        return self.method_cls.output_adapter(self.config)

    @property
    def label(self) -> str:
        return f"stage {self.index} ({self.name})"

    def finished(self) -> bool:
        return (self.dir / RECIPE_NAME).is_file()


def config_arg(argv: list[str]) -> str | None:
    """The value of ``--config`` on a command line, or None."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def _without_config(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--config":
            skip = True
        elif not arg.startswith("--config="):
            out.append(arg)
    return out


def method_of_config(argv: list[str]) -> str:
    """What ``stepdistill train --config FILE`` (no method named) trains: the file's ``method:``, or ``stages`` for a
    pipeline; a one-line error when the file names neither."""
    path = config_arg(argv)
    if path is None:
        raise StepdistillError("name a method (stepdistill train METHOD ...) or a config that names one "
                               "(stepdistill train --config FILE.yaml, the file with method: or stages:)")
    loaded = read_config_file(path)
    if "stages" in loaded:
        if "method" in loaded:
            raise StepdistillError(f"{path}: has both method: and stages:; a pipeline names a method per stage")
        return "stages"
    if "method" not in loaded:
        raise StepdistillError(f"{path} names no method: add a line `method: METHOD` (one of {_known()}) or run "
                               "`stepdistill train METHOD --config FILE`")
    return str(loaded["method"])


def _known() -> str:
    from .methods import METHODS

    return ", ".join([*METHODS, "msd"])


def _config_class(method: str, options: dict, where: str):
    from .methods import METHODS, get_method

    if method == "msd":
        from .msd.train import msd_config_class

        return msd_config_class(str(options.get("student_method", "dmd2"))), None
    if method not in METHODS:
        raise StepdistillError(f"{where}: method {method!r} is not one of {_known()}")
    cls = get_method(method)
    return cls.config_class, cls


def load_stages(argv: list[str], prog: str | None = None) -> tuple[list[Stage], Path]:
    """The stages of the pipeline file that ``--config`` names, each parsed into its method's config (shared
    options, then the stage's, then the command line), with its folder and start: nothing is loaded or trained."""
    path = config_arg(argv)
    loaded = read_config_file(path)
    raw = loaded.pop("stages")
    if not isinstance(raw, list) or not raw:
        raise StepdistillError(f"{path}: stages: must be a list of mappings, each with method: (and options)")
    rest = _without_config(argv)
    # the pipeline's folder: --output_dir (command line, then the file's shared options)
    output_dir = None
    for i, arg in enumerate(rest):
        if arg == "--output_dir" and i + 1 < len(rest):
            output_dir = rest[i + 1]
        elif arg.startswith("--output_dir="):
            output_dir = arg.split("=", 1)[1]
    output_dir = Path(output_dir or loaded.get("output_dir") or "runs/train")
    resume = any(a == "--resume_from_checkpoint" or a.startswith("--resume_from_checkpoint=") for a in rest)
    stages: list[Stage] = []
    names: set[str] = set()
    for i, entry in enumerate(raw):
        where = f"{path}, stage {i}"
        if not isinstance(entry, dict) or "method" not in entry:
            raise StepdistillError(f"{where}: expected a mapping with method: (one of {_known()}) and its options")
        entry = dict(entry)
        method, name = str(entry.pop("method")), str(entry.pop("name", entry.get("method", "") or ""))
        name = name or method
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise StepdistillError(f"{where}: name {name!r}: give each stage its own name of letters, digits, "
                                   "'.', '_' and '-' (its folder is stages/<i>-<name>)")
        names.add(name)
        where = f"{path}, stage {i} ({name})"
        options = {**loaded, **entry}
        options.pop("output_dir", None)
        config_class, method_cls = _config_class(method, options, where)
        stage_argv = [*rest, "--output_dir", str(output_dir / STAGES_DIR / f"{i}-{name}")]
        if i:  # the previous stage's output is this stage's student
            stage_argv += ["--init_from_output", str(stages[-1].dir)]
        if not resume:  # an unfinished stage goes on from its latest checkpoint, if it has one
            stage_argv += ["--resume_from_checkpoint", "latest"]
        config = parse_config(config_class, stage_argv, prog=prog, method=method, values=options, source=where)
        stages.append(Stage(i, name, method, config, method_cls))
    return stages, output_dir


def check_stages(stages: list[Stage], path: str) -> None:
    """The stages form one student's route, checked before any weights load: one base model, one student kind (a
    kind a student can start from, where a stage follows), one LoRA rank and alpha; then each stage's own checks
    (preflight) except its start from the stage before it, whose output does not exist yet."""
    from .preflight import preflight
    from .students import STARTABLE_KINDS, _kind_text, same_base

    first = stages[0]
    for stage in stages[1:]:
        c, c0 = stage.config, first.config
        if not same_base(c.pretrained_model_name_or_path, c0.pretrained_model_name_or_path):
            raise StepdistillError(f"{path}: {stage.label} trains on the base model {c.pretrained_model_name_or_path}"
                                   f", {first.label} on {c0.pretrained_model_name_or_path}: the stages of a pipeline "
                                   "share one base model (set pretrained_model_name_or_path once, at the top)")
        if stage.kind != first.kind:
            raise StepdistillError(f"{path}: {stage.label} trains {_kind_text(stage.kind)}, {first.label} "
                                   f"{_kind_text(first.kind)}: every stage trains the same student (set use_lora "
                                   "once, at the top)")
        if stage.kind == "lora":
            alpha = lambda cfg: cfg.lora_alpha if cfg.lora_alpha is not None else cfg.lora_rank  # noqa: E731
            if (c.lora_rank, alpha(c)) != (c0.lora_rank, alpha(c0)):
                raise StepdistillError(f"{path}: {stage.label} trains a LoRA of rank {c.lora_rank} and alpha "
                                       f"{alpha(c):g}, {first.label} rank {c0.lora_rank} and alpha {alpha(c0):g}: "
                                       "every stage trains the same LoRA (set lora_rank once, at the top)")
    for stage in stages[:-1]:
        if stage.kind not in STARTABLE_KINDS:
            raise StepdistillError(f"{path}: {stage.label} writes {_kind_text(stage.kind)}, which no later stage "
                                   f"can start from (only {' or '.join(STARTABLE_KINDS)} outputs); make it the last "
                                   "stage")
    for stage in stages:
        if stage.method_cls is None:  # msd: its own preflight runs when it starts
            continue
        # on a copy (preflight fills in the resolution); a later stage's start is checked when it starts
        config = dataclasses.replace(stage.config, init_from_output=stage.config.init_from_output
                                     if stage.index == 0 else None)
        preflight(config, stage.method_cls)
        if stage.finished():
            _check_finished(stage)


def _options(config) -> dict:
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(config), default=str)).items()
            if k not in RUN_ONLY}


def _check_finished(stage: Stage) -> None:
    """A finished stage is skipped only when it finished with this pipeline's options for it."""
    record = stage.dir / STAGE_RECORD
    if not record.is_file():
        return
    before = json.loads(record.read_text()).get("options", {})
    now = _options(stage.config)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
        k = changed[0]
        raise StepdistillError(f"{stage.label} finished in {stage.dir} with {k} {before.get(k)!r}, this pipeline "
                               f"gives it {now.get(k)!r}: remove {stage.dir} to train it again, or use another "
                               "--output_dir")


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _write_record(stages: list[Stage], output_dir: Path, path: str) -> None:
    if not _main_process():
        return
    record = {"config": str(path), "final": str(stages[-1].dir) if stages[-1].finished() else None, "stages": []}
    for s in stages:
        entry = {"index": s.index, "name": s.name, "method": s.method, "dir": str(s.dir), "student": s.kind,
                 "init_from_output": s.config.init_from_output, "finished": s.finished()}
        if s.finished():
            recipe = json.loads((s.dir / RECIPE_NAME).read_text())
            entry["recipe"] = {k: recipe.get(k) for k in ("method", "scheduler", "num_inference_steps", "timesteps",
                                                          "guidance_scale")}
        record["stages"].append(entry)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")


def _run(stage: Stage) -> None:
    if stage.method_cls is None:
        from .msd.train import MSDTraining

        MSDTraining(stage.config).train()
        return
    from .trainer import Trainer

    trainer = Trainer(stage.config, stage.method_cls)
    try:
        trainer.train()
    finally:
        del trainer
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass


def _publish(stage: Stage, output_dir: Path) -> None:
    """The last stage's output (weights, recipe, card, samples; no checkpoints or logs) into ``output_dir``,
    copied into a temporary folder there, then moved into place entry by entry."""
    if not _main_process():
        return
    tmp = output_dir / ".pipeline-output.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for entry in sorted(stage.dir.iterdir()):
        if NOT_OUTPUT.match(entry.name):
            continue
        (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, tmp / entry.name)
    for entry in sorted(tmp.iterdir()):
        dest = output_dir / entry.name
        if dest.is_dir() and not dest.is_symlink():
            shutil.rmtree(dest)
        os.replace(entry, dest)
    tmp.rmdir()


def train_stages(argv: list[str], prog: str | None = None) -> Path:
    """Run the pipeline of stages that ``--config`` names (see the module docstring); return its output folder."""
    path = config_arg(argv)
    stages, output_dir = load_stages(argv, prog)
    check_stages(stages, path)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for stage in stages:
        what = f"{stage.label}, {stage.method}, {len(stages)} stages"
        if stage.finished():
            logger.info("%s: finished in %s, skipped", what, stage.dir)
            continue
        logger.info("%s: training into %s%s", what, stage.dir,
                    f", starting from {stage.config.init_from_output}" if stage.config.init_from_output else "")
        if _main_process():
            stage.dir.mkdir(parents=True, exist_ok=True)
            (stage.dir / STAGE_RECORD).write_text(json.dumps(
                {"index": stage.index, "name": stage.name, "method": stage.method,
                 "options": _options(stage.config)}, indent=2) + "\n")
        _write_record(stages, output_dir, path)
        _run(stage)
    _publish(stages[-1], output_dir)
    _write_record(stages, output_dir, path)
    logger.info("pipeline of %d stages: output %s (the recipe of %s)", len(stages), output_dir, stages[-1].label)
    return output_dir
