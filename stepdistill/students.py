"""Students of another shape than the teacher: a UNet built from a config file or from the teacher's config with
fewer channels (MSD's smaller students, arXiv 2410.23274 section 3.3), or one read from a folder (a TSM-initialised
student). A smaller student starts from random weights; teacher score matching (``methods/tsm.py``) gives it a
stable start before distribution matching."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import option
from .errors import StepdistillError


@dataclass
class StudentShapeOptions:
    """Options of a full student whose shape is not the teacher's (mixed into a method's config)."""

    student_config: str | None = option(None, "UNet config.json of a full student of another shape (random init; "
                                                "needs --use_lora false)")
    student_channel_multiplier: float | None = option(None, "a full student with the teacher's UNet config and "
                                                            "every block's channels times this, e.g. 0.5 (random "
                                                            "init; needs --use_lora false)")
    student_init: str | None = option(None, "a UNet folder the full student starts from, e.g. the unet/ of a "
                                            "`stepdistill train tsm` output (needs --use_lora false)")


def scaled_unet_config(config: dict, multiplier: float) -> dict:
    """The teacher's UNet config with every block's channels times ``multiplier``, rounded to a multiple of the
    group-norm groups (at least one group's worth); attention heads scale along, keeping the width per head where
    the channels allow it (SD 1.5 at 0.5: 160/320/640/640 channels, 4 heads)."""
    if not 0 < multiplier <= 1:
        raise StepdistillError(f"--student_channel_multiplier {multiplier}: must be in (0, 1]")
    groups = int(config.get("norm_num_groups") or 32)
    channels = [max(groups, round(c * multiplier / groups) * groups) for c in config["block_out_channels"]]
    out = dict(config, block_out_channels=channels)
    key = "num_attention_heads" if config.get("num_attention_heads") else "attention_head_dim"
    heads = config.get(key)
    if isinstance(heads, int):
        scaled = max(1, round(heads * multiplier))
        out[key] = scaled if all(c % scaled == 0 for c in channels) else heads
    elif isinstance(heads, (list, tuple)):
        scaled = [max(1, round(h * multiplier)) for h in heads]
        out[key] = scaled if all(c % h == 0 for c, h in zip(channels, scaled)) else list(heads)
    return out


def check_student_options(config) -> None:
    """The student-shape options of ``config`` (``student_config``, ``student_channel_multiplier``,
    ``student_init``), checked before any weights load."""
    chosen = [k for k in ("student_config", "student_channel_multiplier", "student_init") if getattr(config, k)]
    if not chosen:
        return
    if len(chosen) > 1:
        raise StepdistillError(f"pass one of --{', --'.join(chosen)}: each one fixes the student's shape")
    if config.use_lora:
        raise StepdistillError(f"--{chosen[0]} makes a student of its own shape, which a LoRA on the teacher "
                               "cannot be: add --use_lora false")
    if config.student_channel_multiplier is not None:
        scaled_unet_config({"block_out_channels": [32]}, config.student_channel_multiplier)  # range check
    if config.student_config and not Path(config.student_config).is_file():
        raise StepdistillError(f"--student_config {config.student_config}: no such file (a UNet config.json)")
    if config.student_init and not (Path(config.student_init) / "config.json").is_file():
        raise StepdistillError(f"--student_init {config.student_init}: no UNet there (expected config.json and "
                               "weights, e.g. the unet/ folder of a stepdistill tsm output)")
    if config.student_init:
        from .safe_weights import check_no_pickle

        check_no_pickle(config.student_init, getattr(config, "allow_pickle", False), "--student_init")


def build_student_unet(config, teacher_unet):
    """A full student UNet of its own shape (float32, trainable) or None when the student copies the teacher.
    Its inputs and outputs must be the teacher's: same latent channels, text width and prediction."""
    import torch
    from diffusers import UNet2DConditionModel

    if config.student_init:
        from .safe_weights import load_kwargs

        unet = UNet2DConditionModel.from_pretrained(config.student_init,
                                                    **load_kwargs(getattr(config, "allow_pickle", False)))
    elif config.student_config or config.student_channel_multiplier is not None:
        base = dict(teacher_unet.config)
        if config.student_config:
            base = json.loads(Path(config.student_config).read_text())
        else:
            base = scaled_unet_config(base, config.student_channel_multiplier)
        base = {k: v for k, v in base.items() if not k.startswith("_")}
        unet = UNet2DConditionModel.from_config(base)
    else:
        return None
    for key in ("in_channels", "out_channels", "cross_attention_dim"):
        if unet.config[key] != teacher_unet.config[key]:
            raise StepdistillError(f"the student UNet's {key} is {unet.config[key]}, the teacher's "
                                   f"{teacher_unet.config[key]}: a student must read and write the teacher's latents "
                                   "and text embeddings")
    if unet.dtype != torch.float32:  # trainable: float32 also beside a half-precision teacher (precision.py)
        unet = unet.to(dtype=torch.float32)
    return unet.to(teacher_unet.device).requires_grad_(True)


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------ --init_from_output
STARTABLE_KINDS = ("lora", "full_unet")  # the output kinds a student can start from


def same_base(a: str, b: str) -> bool:
    """Whether two base-model names mean one model: equal text, or local folders that resolve to one path."""
    if str(a) == str(b):
        return True
    pa, pb = Path(str(a)), Path(str(b))
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


def _kind_text(kind: str) -> str:
    return {"lora": "a LoRA student (--use_lora true)", "full_unet": "a full-UNet student (--use_lora false)"}.get(
        kind, f"a {kind} output")


def lora_file_settings(path: Path) -> tuple[int | None, float | None]:
    """(rank, alpha) of a stepdistill LoRA file, read from its header (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        rank = next((f.get_slice(k).get_shape()[0] for k in f.keys() if "lora_A" in k), None)
    raw = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    alpha = raw.get("unet.lora_alpha", raw.get("lora_alpha"))
    return rank, (float(alpha) if alpha is not None else None)


def check_init_output(config, method_cls) -> None:
    """``--init_from_output DIR``, checked before any weights load: a stepdistill output of a student kind this run
    trains (LoRA / full UNet), of the same base model, and for a LoRA of the same rank and alpha."""
    from .lora import LORA_WEIGHTS_NAME
    from .outputs import UNET_DIR
    from .recipe import Recipe

    path = getattr(config, "init_from_output", None)
    if not path:
        return
    flag = f"--init_from_output {path}"
    others = [k for k in ("init_from_checkpoint", "student_config", "student_channel_multiplier", "student_init")
              if getattr(config, k, None) not in (None, "")]
    if others:
        raise StepdistillError(f"{flag} and --{others[0]} both say where the student starts: pass one")
    try:
        recipe = Recipe.load(path)
    except StepdistillError as e:
        raise StepdistillError(f"{flag}: {e}") from None
    kind = method_cls.output_adapter(config)
    if recipe.adapter not in STARTABLE_KINDS:
        raise StepdistillError(f"{flag}: its output is {recipe.adapter} ({recipe.method}); a student starts only "
                               f"from {' or '.join(STARTABLE_KINDS)} outputs")
    if recipe.adapter != kind:
        raise StepdistillError(f"{flag} holds {_kind_text(recipe.adapter)} ({recipe.method}), but this run trains "
                               f"{_kind_text(kind)}: the student kinds must agree")
    if not same_base(recipe.base_model, config.pretrained_model_name_or_path):
        raise StepdistillError(f"{flag} was trained on the base model {recipe.base_model}, this run's is "
                               f"{config.pretrained_model_name_or_path}: a student starts only from an output of "
                               "its own base model")
    if kind == "lora":
        weights = Path(path) / LORA_WEIGHTS_NAME
        if not weights.is_file():
            raise StepdistillError(f"{flag}: recipe says LoRA but {LORA_WEIGHTS_NAME} is missing")
        rank, alpha = lora_file_settings(weights)
        want = (config.lora_rank, float(config.lora_alpha if config.lora_alpha is not None else config.lora_rank))
        if (rank, alpha if alpha is not None else float(rank or 0)) != want:
            raise StepdistillError(f"{flag}: its LoRA has rank {rank} and alpha {alpha:g}, this run's rank "
                                   f"{want[0]} and alpha {want[1]:g}: set --lora_rank and --lora_alpha as it was "
                                   "trained" if alpha is not None else
                                   f"{flag}: its LoRA has rank {rank}, this run's {want[0]}: set --lora_rank")
    elif not (Path(path) / UNET_DIR / "config.json").is_file():
        raise StepdistillError(f"{flag}: recipe says full UNet but {UNET_DIR}/config.json is missing")


def load_init_output(unet, config) -> None:
    """Load the weights of ``--init_from_output`` into the student just made (``unet``: the UNet carrying the LoRA,
    or the full student), before any EMA copy of it is taken."""
    import logging

    import torch
    from safetensors.torch import load_file

    from .lora import ADAPTER_NAME, LORA_WEIGHTS_NAME
    from .outputs import UNET_DIR

    path = Path(config.init_from_output)
    if config.use_lora:
        from peft.utils import set_peft_model_state_dict

        state = {k.removeprefix("unet."): v for k, v in load_file(str(path / LORA_WEIGHTS_NAME)).items()}
        result = set_peft_model_state_dict(unet, state, adapter_name=ADAPTER_NAME)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        own = {k for k in unet.state_dict() if "lora_" in k and f".{ADAPTER_NAME}." in k}
        if unexpected or len(own) != len(state):
            raise StepdistillError(f"--init_from_output {path}: its LoRA does not fit this student "
                                   f"({len(state)} tensors for {len(own)}; e.g. {(unexpected or ['?'])[0]}): other "
                                   "target modules")
    else:
        state = load_file(str(next((path / UNET_DIR).glob("*.safetensors"))))
        with torch.no_grad():
            missing, unexpected = unet.load_state_dict(state, strict=False)
        # an LCM full student's w-embedding (cond_proj) stays at its zero start when the output has none
        missing = [k for k in missing if "cond_proj" not in k]
        if missing or unexpected:
            raise StepdistillError(f"--init_from_output {path}: its UNet does not fit this student ("
                                   f"{len(missing)} tensors missing, {len(unexpected)} unexpected, e.g. "
                                   f"{(missing or unexpected)[0]})")
    logging.getLogger("stepdistill").info("student: %d tensors from the output %s", len(state), path)
