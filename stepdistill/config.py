"""Configuration: one dataclass per method, filled from a YAML file (``--config``) and the command line (which
wins). Every field carries its help text; unknown keys are errors that name the key."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import StepdistillError


# every value of diffusers.optimization.SchedulerType (tests/test_defaults.py compares the two)
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")


def option(default, help: str, choices: tuple | None = None, prose: bool = False, aliases: tuple = (), **kwargs):
    """A config field with its help text. ``choices`` limit the value (each item of a list); ``prose`` marks a
    list of free text (prompts): each command-line argument is one item, never split at commas. ``aliases``: other
    command-line spellings (an option's former name)."""
    metadata: dict[str, Any] = {"help": help}
    if aliases:
        metadata["aliases"] = tuple(aliases)
    if choices:
        metadata["choices"] = choices
    if prose:
        metadata["prose"] = True
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    """Options every trainer shares. Names follow the Diffusers training scripts."""

    pretrained_model_name_or_path: str = option("assets/tiny-digits-sd", "base pipeline: a local folder or hub id")
    output_dir: str = option("runs/train", "where the LoRA/adapters, recipe, checkpoints and samples go")
    revision: str | None = option(None, "hub revision of the base pipeline")
    variant: str | None = option(None, "weights variant of the base pipeline, e.g. fp16 (loads *.fp16.safetensors: "
                                       "half the download; the frozen weights are held in the mixed-precision dtype "
                                       "either way)")
    cache_dir: str | None = option(None, "hub cache folder of the base pipeline and VAE (default: the Hugging Face "
                                         "cache)")
    allow_pickle: bool = option(False, "also load weights stored as pickle (.bin, .pt, .ckpt), which can run code "
                                       "when loaded; by default only safetensors load")
    pretrained_vae_model_name_or_path: str | None = option(
        None, "another VAE (folder or hub id) in place of the pipeline's, e.g. SDXL's fp16-safe "
              "madebyollin/sdxl-vae-fp16-fix; its latent channels and scaling must be the base VAE's")
    # data
    train_data_dir: str | None = option(None, "image folder with metadata.jsonl (file_name, text), or "
                                              "builtin:tiny-digits for the embedded world's data")
    dataset_name: str | None = option(None, "a Hugging Face dataset name or path (needs `datasets`): kept as Arrow, "
                                            "each row decoded when served")
    streaming: bool = option(False, "stream --dataset_name (datasets' streaming=True) instead of downloading it: "
                                    "for hub-size sets; shards split among processes and workers like "
                                    "--train_shards")
    image_column: str = option("image", "image column of --dataset_name")
    caption_column: str = option("text", "caption column of --dataset_name / metadata.jsonl")
    train_shards: str | None = option(None, "WebDataset shard pattern, e.g. data/{00000..00099}.tar (needs "
                                            "`webdataset`), streamed: shards split among processes and workers")
    shuffle_buffer: int = option(1000, "streamed data (--train_shards, --streaming): samples in the shuffle buffer of "
                                       "each reader (undecoded)")
    prompts_file: str | None = option(None, "one prompt per line, for data-free methods")
    max_train_samples: int | None = option(None, "use only the first N samples of the data (of streamed data: read "
                                                 "into memory)")
    cache_latents: bool = option(False, "encode every image with the VAE once, before training")
    latent_cache_max_bytes: int = option(4 << 30, "--cache_latents keeps latents up to this size in memory; larger "
                                                  "sets (and streamed ones) are cached to safetensors files on disk")
    latent_cache_dir: str | None = option(None, "where --cache_latents writes latents that go to disk (default: "
                                                "OUTPUT_DIR/latent_cache; reused when complete and from the same "
                                                "data and model)")
    max_bad_images: int = option(10, "unreadable images are skipped with a warning; more than this many is an error")
    resolution: int | None = option(None, "training resolution in pixels (default: the base model's)")
    # optimisation
    max_train_steps: int = option(1000, "number of optimisation iterations")
    train_batch_size: int = option(16, "batch size per process")
    gradient_accumulation_steps: int = option(1, "accumulate this many batches per optimiser step")
    learning_rate: float = option(1e-4, "learning rate of the student")
    lr_scheduler: str = option("constant", "a diffusers.optimization schedule; all but constant and "
                                           "piecewise_constant start with --lr_warmup_steps of linear warm-up",
                               choices=LR_SCHEDULERS)
    lr_warmup_steps: int = option(0, "linear warm-up, in updates of each network (with constant: an error, use "
                                     "constant_with_warmup, since diffusers' constant ignores it)")
    lr_num_cycles: int | None = option(None, "cosine_with_restarts: the number of hard restarts (default 1)")
    lr_power: float | None = option(None, "polynomial: the power of the decay (default 1, linear)")
    lr_step_rules: str | None = option(None, "piecewise_constant: learning-rate multipliers and the update before "
                                             "which each holds, then the last, e.g. '1:100,0.1:200,0.01'")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_weight_decay: float = option(0.0, "AdamW weight decay")
    adam_epsilon: float = option(1e-8, "AdamW epsilon")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    mixed_precision: str | None = option(None, "no | fp16 | bf16 (default: what Accelerate was launched with, i.e. "
                                               "the accelerate config or `accelerate launch --mixed_precision`; "
                                               "else no). Frozen networks are held in fp16/bf16, trainable "
                                               "parameters stay float32", choices=(None, "no", "fp16", "bf16"))
    allow_tf32: bool = option(False, "allow TF32 matmuls and convolutions on Ampere and later GPUs (faster float32)")
    use_8bit_adam: bool = option(False, "bitsandbytes' 8-bit AdamW: optimizer states in 8 bits (needs "
                                        "`pip install stepdistill[8bit]`)")
    gradient_checkpointing: bool = option(False, "recompute UNet activations in backward to save memory")
    seed: int = option(0, "seed of data order, noise and initialisation")
    # LoRA
    use_lora: bool = option(True, "train a LoRA (false: the full UNet)")
    lora_rank: int = option(64, "LoRA rank")
    lora_alpha: float | None = option(None, "LoRA alpha (default: the rank, i.e. scale 1). The adapter's update is "
                                            "multiplied by alpha/rank; under Adam, whose steps do not grow with the "
                                            "gradient, a smaller scale acts like a proportionally smaller learning "
                                            "rate on the adapter's output (alpha 8 at rank 64: about 1/8 of it)")
    # checkpoints, logging, validation
    checkpointing_steps: int = option(500, "save a resumable checkpoint every N iterations")
    checkpoints_total_limit: int | None = option(2, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint directory")
    init_from_output: str | None = option(None, "start the student from a stepdistill output (its LoRA or full UNet, "
                                                "e.g. the previous stage of a pipeline: `stepdistill train --config "
                                                "FILE` with stages:); same base model, student kind and LoRA rank and "
                                                "alpha; everything else (fake score, optimizers, schedule) starts "
                                                "fresh")
    init_from_checkpoint: str | None = option(None, "start the networks from the weights of a checkpoint of the same "
                                                    "method, with fresh optimizers, schedule and iteration count: a "
                                                    "recipe's later stage (DMD2's GAN stage from its DM stage, "
                                                    "official ckpt_only_path); networks the checkpoint lacks (a new "
                                                    "GAN head) keep their initialisation; a checkpoint of this run "
                                                    "to resume wins")
    on_nan: str = option("stop", "a NaN or inf in any loss term: stop (exit status 1, naming the step and the term; "
                                 "nothing of the poisoned step is saved, the last checkpoint stays) or skip (that "
                                 "network's update is dropped: no optimizer, schedule or EMA step; counted as "
                                 "nan_skips in logs.jsonl)", choices=("stop", "skip"))
    max_nan_skips: int = option(10, "--on_nan skip: more than this many skipped updates in one run (since its start "
                                    "or resume) stop it as --on_nan stop does")
    report_to: str | None = option(None, "send scalars, gradient norms and validation grids to a tracker: "
                                         "tensorboard (written under output_dir), wandb, or all (both)",
                                   choices=(None, "tensorboard", "wandb", "all"))
    tracker_project_name: str | None = option(None, "the tracker's project / run name (default: stepdistill-METHOD)")
    validation_steps: int = option(0, "write a sample grid every N iterations (0: only at the end)")
    save_output_steps: list[int] = option([], "also write the complete output at these iterations, into "
                                              "output_dir/snapshots/step-N (budget curves from one run: with a "
                                              "constant learning rate a snapshot is the output of the shorter run)")
    validation_prompts: list[str] = option([], "prompts of the validation grid, one argument each (commas stay in "
                                               "the prompt): --validation_prompts 'a cat, asleep' 'a dog'; or "
                                               "'a cat|a dog' (default: the first 8 training captions)",
                                           prose=True)
    export: list[str] = option([], "also write the LoRA in these single-file formats at the end: kohya "
                                   "(output_dir/kohya_lora.safetensors, for AUTOMATIC1111 and ComfyUI)",
                               choices=("kohya",))
    push_to_hub: bool = option(False, "upload the output folder (weights, recipe, card, samples; no checkpoints) "
                                      "to the Hugging Face Hub at the end (huggingface_hub; needs a login)")
    hub_model_id: str | None = option(None, "the Hub repository for --push_to_hub, e.g. user/sd15-lcm-lora")
    dataloader_num_workers: int = option(0, "DataLoader worker processes that decode images ahead of training (0: "
                                            "in the training process)")


def _field_type(f: dataclasses.Field, owner) -> Any:
    hints = typing.get_type_hints(owner)
    return hints[f.name]


def _scalar_parser(tp):
    """The converter of one option's value (a command-line string or a YAML value) for its annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _scalar_parser(args[0])
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if tp is list or origin is list:
        element = (typing.get_args(tp) or (None,))[0]
        return ListOf(_ELEMENT_PARSERS[element]) if element in _ELEMENT_PARSERS else _parse_list
    return str


def _parse_bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = value.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _split(value: str) -> list[str]:
    """``8,4,2`` or, for items that hold commas, ``a, b|c``: "|" separates when present."""
    return [v.strip() for v in value.split("|" if "|" in value else ",") if v.strip()]


def _parse_list(value: str | list) -> list:
    """A list option without an element type: YAML lists as they are, command-line strings split."""
    if isinstance(value, list):
        return value
    return _split(value)


def _to_number(value, kind: type, noun: str):
    """``value`` (a number or its text) as ``kind``: int or float. Booleans, fractions for int and anything else
    are errors naming the value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if kind is float or isinstance(value, int) or value.is_integer():
            return kind(value)
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):
            return kind(value.strip())
    raise ValueError(f"{value!r} is not {noun}")


def _to_str(value) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    raise ValueError(f"{value!r} is not a string")


_ELEMENT_PARSERS = {int: functools.partial(_to_number, kind=int, noun="an integer"),
                    float: functools.partial(_to_number, kind=float, noun="a number"), str: _to_str}


class ListOf:
    """A typed list option (``list[int]``, ``list[float]``, ``list[str]``): a YAML list or a command-line string
    (``8,4,2``; ``a, b|c`` when items hold commas), each item converted; a bad item is a ValueError naming it."""

    def __init__(self, element):
        self.element = element

    def __call__(self, value) -> list:
        if isinstance(value, str):
            value = _split(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        return [self.element(v) for v in value]


class _ListAction(argparse.Action):
    """Converts a typed list option; a bad item is one line naming the option, its value and the item."""

    def __init__(self, option_strings, dest, parse=None, **kwargs):
        self.parse = parse
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            setattr(namespace, self.dest, self.parse(values))
        except ValueError as e:
            raise StepdistillError(f"{option_string} {values}: {e}") from None


class _OneLineErrors(argparse.ArgumentParser):
    """Bad command lines are one StepdistillError line naming the argument (and --help), not a usage dump: the
    entry points print it as ``error: ...`` and exit 2; the Python API raises it."""

    def error(self, message: str):
        raise StepdistillError(f"{message} (see --help)")


def _split_prose(values: list[str]) -> list[str]:
    """A prose list from its command-line arguments: one item per argument; "|" inside an argument also separates
    (so a one-string form exists for YAML-less callers); commas never do."""
    return [item.strip() for v in values for item in v.split("|") if item.strip()]


class _ProseListAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, _split_prose(values))


def _default_text(f: dataclasses.Field) -> str:
    """The field's default as --help shows it."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        value = f.default
    if value is None:
        return "unset"
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value) if value else "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_choices(config) -> None:
    """Every option with choices holds one of them (each item of a list option): the command line's argparse
    check also covers YAML values and the Python API."""
    for f in fields(config):
        choices = f.metadata.get("choices")
        value = getattr(config, f.name)
        if not choices or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if item not in choices:
                known = ", ".join(str(c) for c in choices if c is not None)
                raise StepdistillError(f"--{f.name} {item}: expected one of {known}")


def build_parser(config_class, prog: str | None = None) -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog=prog, description=(config_class.__doc__ or "").strip())
    parser.add_argument("--config", default=None, help="YAML file of options (the command line wins)")
    # read by the entry points (api.main), which take it off the command line; listed here for --help
    parser.add_argument("--debug", action="store_true", help="on bad input, also print the traceback")
    for f in fields(config_class):
        tp = _field_type(f, config_class)
        # argparse %-formats help texts: a literal "10 %" must be "10 %%"
        text = f"{f.metadata.get('help', '')} (default: {_default_text(f)})".replace("%", "%%")
        kwargs: dict[str, Any] = {"help": text, "default": argparse.SUPPRESS}
        parse = _scalar_parser(tp)
        if f.metadata.get("prose"):
            kwargs.update(nargs="+", action=_ProseListAction, metavar="TEXT")
        elif parse is _parse_bool:
            kwargs.update(nargs="?", const=True, type=_parse_bool, metavar="BOOL")
        elif isinstance(parse, ListOf):
            kwargs.update(action=_ListAction, parse=parse)
        else:
            kwargs["type"] = parse
        if f.metadata.get("choices") and not isinstance(parse, ListOf):  # list items: check_choices
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", *f.metadata.get("aliases", ()), **kwargs)
    return parser


def _yaml_parser(tp):
    """The converter of a YAML value for an option of annotation ``tp``: as the command line's, but numbers must be
    numbers (YAML gives ``2.5`` for an int option or a list for a number: errors, never truncated or repr'd)."""
    parse = _scalar_parser(tp)
    if parse in (int, float, str):
        return _ELEMENT_PARSERS[parse]
    return parse


def _example(key: str, f: dataclasses.Field, tp) -> str:
    """What a YAML line of this option looks like, for error messages: ``learning_rate: 0.0001``."""
    parse = _scalar_parser(tp)
    kind = {int: "an integer", float: "a number", str: "a string", _parse_bool: "true or false"}.get(parse)
    if isinstance(parse, ListOf) or parse is _parse_list:
        kind = "a list"
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default  # type: ignore[misc]
    if value is None or value == []:
        return f"{kind or 'a value'}"
    shown = str(value).lower() if isinstance(value, bool) else value
    return f"{kind or 'a value'}, e.g. {key}: {shown}"


def options_to_argv(options: dict[str, Any]) -> list[str]:
    """Python values as the command line that sets them, so the Python API goes through the very parsing and
    checks of the command line: booleans as true/false, lists joined with "," (with "|" when an item holds a
    comma), paths and numbers as text. ``None`` leaves an option to the YAML file or its default."""
    argv: list[str] = []
    for key, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            items = [str(v) for v in value]
            if any("|" in item for item in items):
                raise StepdistillError(f"--{key}: an item holds '|', which separates the items of a list")
            if any("," in item for item in items):
                text = "|".join(items) + ("|" if len(items) == 1 else "")
            else:
                text = ",".join(items)
        else:
            text = str(value)
        argv += [f"--{key}", text]
    return argv


def read_config_file(config_path: str | Path) -> dict:
    """The mapping of a ``--config`` YAML file, or a one-line error naming the file."""
    import yaml

    path = Path(config_path)
    if not path.is_file():
        raise StepdistillError(f"--config {config_path}: no such file")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StepdistillError(f"{config_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(loaded, dict):
        raise StepdistillError(f"{config_path}: expected a mapping of option: value")
    return loaded


def parse_config(config_class, argv: list[str] | None = None, prog: str | None = None, method: str | None = None,
                 values: dict | None = None, source: str | None = None):
    """YAML (``--config``) then command line into ``config_class``. Errors are StepdistillErrors naming the
    offending key or value.

    ``method``: the method this run trains; a config's top-level ``method:`` key must name it (so a file is run by
    ``stepdistill train --config FILE``), and is dropped. ``values``: options already read (a pipeline stage's), in
    place of a ``--config`` file; ``source`` names them in errors."""
    parser = build_parser(config_class, prog)
    args = vars(parser.parse_args(argv))
    config_path = args.pop("config")
    args.pop("debug", None)
    loaded = None
    if values is not None:
        loaded, config_path = dict(values), source or "the stage's options"
    elif config_path:
        loaded = read_config_file(config_path)
    parsed: dict[str, Any] = {}
    if loaded is not None:
        if "stages" in loaded:
            raise StepdistillError(f"{config_path} is a pipeline of stages: run it with `stepdistill train --config "
                                   f"{config_path} --output_dir DIR` (no method name)")
        names = {f.name: f for f in fields(config_class)}
        for key, value in loaded.items():
            if key == "method" and key not in names:
                own = method or getattr(config_class, "method_name", None)
                legacy = getattr(config_class, "legacy_method_field", None)  # MSD: method: dmd2 names the students'
                if own is None or str(value) == own:
                    continue
                if legacy is None:
                    raise StepdistillError(f"{config_path} names method {value!r}, but this run trains {own}: run "
                                           f"it with `stepdistill train --config {config_path}`, or drop its method: "
                                           "line")
                key = legacy
            if key not in names:
                import difflib

                close = difflib.get_close_matches(str(key), list(names), n=3, cutoff=0.6)
                hint = f"did you mean {', '.join(close)}? " if close else ""
                raise StepdistillError(f"{config_path}: unknown option {key!r} for {config_class.__name__}; {hint}"
                                       "remove or rename it (the options are those of --help, without the dashes)")
            tp = _field_type(names[key], config_class)
            try:
                parsed[key] = value if value is None else _yaml_parser(tp)(value)
            except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
                raise StepdistillError(f"{config_path}: option {key!r}: {e}; write {_example(key, names[key], tp)}"
                                       ) from None
    parsed.update(args)
    config = config_class(**parsed)
    check_choices(config)
    if hasattr(config, "validate"):
        config.validate()
    return config
