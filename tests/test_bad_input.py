"""Bad input, one table: every case runs a real command line (in-process: the same ``main`` functions that
``train_scripts/train_<method>.py``, ``stepdistill ...`` and ``eval/evaluate.py`` call) and must end with exit status
2 and exactly one line on stderr that names the bad input and the fix, without a traceback, before any model weights
load (``from_pretrained`` of Diffusers pipelines and models and of Transformers models raise; the positive controls
below show that a good command line does reach them).

README's "Bad input" table is generated from CASES (``python tests/test_bad_input.py`` prints it;
``test_readme_table_is_generated_from_the_cases`` keeps the two equal).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

REPO = Path(__file__).resolve().parents[1]
README_START, README_END = "<!-- bad-input-table:start -->", "<!-- bad-input-table:end -->"


@dataclass
class Paths:
    """The inputs the cases name; real files in the tests, short placeholders in README's table."""

    sd: str = "SD15"  # an SD 1.x pipeline folder
    data: str = "DATA"  # an image folder with metadata.jsonl
    out: str = "OUT"  # a fresh output folder
    prompts: str = "prompts.txt"
    empty_prompts: str = "empty.txt"  # blank lines and comments only
    broken_data: str = "broken/"  # metadata.jsonl listing 3 files that are not images
    half_broken_data: str = "half_broken/"  # 2 images and 4 broken files
    not_sd: str = "kandinsky/"  # a pipeline folder of another class
    a_file: str = "a_file"  # a regular file, so a folder below it cannot be made
    yaml_unknown: str = "unknown.yaml"  # max_train_step: 10 (a typo)
    yaml_type: str = "wrong_type.yaml"  # max_train_steps: [1, 2]
    lcm_checkpoint: str = "lcm_run/checkpoint-1"  # a checkpoint written by LCM
    sdxl_student: str = "sdxl_lora/"  # a LoRA output of an SDXL base
    full_unet_student: str = "full_unet/"  # a stepdistill output holding a full UNet
    used_eval_dir: str = "old_eval/"  # images/ without generation.json
    stages_two_bases: str = "two_bases.yaml"  # stages: tscd on SD15, then dmd2 on an SDXL base
    stages_two_kinds: str = "lora_then_full.yaml"  # stages: a tscd LoRA, then a full-UNet dmd2
    world: str = "assets/tiny-digits-sd"
    clip: str = "CLIP"  # a CLIP folder (transformers)


def train(p: Paths, **options) -> list[str]:
    """The options of a short training run; ``None`` drops one."""
    values = {"pretrained_model_name_or_path": p.sd, "train_data_dir": p.data, "output_dir": p.out,
              "max_train_steps": 2, "train_batch_size": 2, "lora_rank": 4, "max_train_samples": 8, **options}
    return [x for k, v in values.items() if v is not None for x in (f"--{k}", str(v))]


def evaluate(p: Paths, **options) -> list[str]:
    values = {"pretrained_model_name_or_path": p.sd, "prompts_file": p.prompts, "metrics": "clip",
              "clip_model": p.clip, "output_dir": p.out, **options}
    return [x for k, v in values.items() if v is not None for x in (f"--{k}", str(v))]


@dataclass
class Case:
    id: str
    argv: Callable[[Paths], list[str]]  # the command line: its program, then its arguments
    message: tuple[str, ...]  # parts of the one line: the input it names, then the fix
    shown: str = ""  # README: the distinctive options (default: all of argv after the program)
    loads_nothing: bool = True  # False: not a training/eval command (nothing to load there anyway)


TRAIN_LCM = "train_scripts/train_lcm.py"
TRAIN_DMD2 = "train_scripts/train_dmd2.py"
SD = "stepdistill"

CASES = [
    # ---- the base model
    Case("model-missing", lambda p: [TRAIN_LCM, *train(p, pretrained_model_name_or_path="no/such/model")],
         ("no/such/model: no such directory", "pass a Diffusers pipeline folder or a hub id")),
    Case("hub-id-offline", lambda p: [TRAIN_LCM, *train(p, pretrained_model_name_or_path="someone/no-such-model")],
         ("someone/no-such-model: no such folder, and not in the local hub cache",
          "download it with `hf download someone/no-such-model`"),
         "--pretrained_model_name_or_path someone/no-such-model (HF_HUB_OFFLINE=1)"),
    Case("not-sd-pipeline", lambda p: [TRAIN_LCM, *train(p, pretrained_model_name_or_path=p.not_sd)],
         ("pipeline class KandinskyPipeline is not supported",
          "supported: StableDiffusionPipeline, StableDiffusionXLPipeline")),
    Case("resolution-not-divisible", lambda p: [TRAIN_LCM, *train(p, resolution=20)],
         ("--resolution 20 is not divisible by 8", "use a multiple of 8, e.g. 16")),
    Case("resolution-negative", lambda p: [TRAIN_LCM, *train(p, resolution=-16)],
         ("--resolution -16: must be a positive multiple of 8", "e.g. 16 (the model's own)")),
    # ---- data
    Case("all-images-corrupt", lambda p: [TRAIN_LCM, *train(p, train_data_dir=p.broken_data)],
         ("--train_data_dir", "none of its 3 images can be read", "fix or replace the image files")),
    Case("too-many-corrupt-images",
         lambda p: [TRAIN_LCM, *train(p, train_data_dir=p.half_broken_data, max_bad_images=3)],
         ("4 of 6 images cannot be read, more than --max_bad_images 3", "raise --max_bad_images")),
    Case("empty-prompts-file",
         lambda p: [SD, "train", "sid", *train(p, train_data_dir=None, prompts_file=p.empty_prompts)],
         ("empty.txt: prompt file is empty", "write one prompt per line")),
    Case("missing-prompts-file",
         lambda p: [SD, "train", "dmd2", *train(p, train_data_dir=None, prompts_file="no/such/prompts.txt")],
         ("--prompts_file no/such/prompts.txt: no such file",)),
    Case("caption-column-missing", lambda p: [TRAIN_LCM, *train(p, caption_column="prompt")],
         ("metadata.jsonl:1: no 'prompt' field", "set --caption_column"), "--caption_column prompt"),
    Case("no-data-source", lambda p: [TRAIN_LCM, *train(p, train_data_dir=None)],
         ("this method trains on images", "pass --train_data_dir, --dataset_name or --train_shards"),
         "(no --train_data_dir)"),
    Case("two-image-sources", lambda p: [TRAIN_LCM, *train(p, train_shards="x/{0..1}.tar")],
         ("pass one image source, not --train_data_dir, --train_shards",)),
    # ---- options
    Case("lora-rank-0", lambda p: [TRAIN_LCM, *train(p, lora_rank=0)],
         ("--lora_rank 0: a LoRA needs rank >= 1", "for no LoRA pass --use_lora false")),
    Case("lora-rank-negative", lambda p: [TRAIN_LCM, *train(p, lora_rank=-4)],
         ("--lora_rank -4: a LoRA needs rank >= 1",)),
    Case("lora-alpha-0", lambda p: [TRAIN_LCM, *train(p, lora_alpha=0)],
         ("--lora_alpha 0: must be > 0", "drop it for alpha = rank")),
    Case("max-train-steps-0", lambda p: [TRAIN_LCM, *train(p, max_train_steps=0)],
         ("--max_train_steps 0: must be at least 1",)),
    Case("ratio-loss-without-gan",
         lambda p: [TRAIN_DMD2, *train(p, prompts_file=p.prompts, generator_loss="fdistill", divergence="js")],
         ("--generator_loss fdistill weights by a density ratio read from the Diffusion-GAN head",
          "pass --gan true")),
    Case("uni-instruct-without-gan",
         lambda p: [SD, "train", "sid", *train(p, train_data_dir=None, prompts_file=p.prompts,
                                               generator_loss="uni_instruct")],
         ("--generator_loss uni_instruct weights by a density ratio", "pass --gan true")),
    Case("divergence-not-taken",
         lambda p: [TRAIN_DMD2, *train(p, prompts_file=p.prompts, generator_loss="diff_instruct",
                                       divergence="forward_kl")],
         ("--divergence forward_kl: --generator_loss diff_instruct takes no divergence", "drop --divergence")),
    Case("unknown-method", lambda p: [SD, "train", "lcm2", *train(p)],
         ("unknown method 'lcm2'", "expected one of lcm, tscd, dmd2, sid, agd, tsm")),
    Case("unknown-option", lambda p: [TRAIN_LCM, *train(p), "--learnin_rate", "1e-4"],
         ("unrecognized arguments: --learnin_rate 1e-4", "(see --help)")),
    Case("option-wrong-type", lambda p: [TRAIN_LCM, *train(p, max_train_steps="many")],
         ("argument --max_train_steps: invalid int value: 'many'", "(see --help)")),
    Case("yaml-unknown-key", lambda p: [TRAIN_LCM, *train(p), "--config", p.yaml_unknown],
         ("unknown.yaml: unknown option 'max_train_step'", "did you mean max_train_steps", "remove or rename it"),
         "--config unknown.yaml   # max_train_step: 10"),
    Case("yaml-wrong-type", lambda p: [TRAIN_LCM, *train(p), "--config", p.yaml_type],
         ("wrong_type.yaml: option 'max_train_steps': [1, 2] is not an integer",
          "write an integer, e.g. max_train_steps: 1000"),
         "--config wrong_type.yaml   # max_train_steps: [1, 2]"),
    Case("yaml-missing", lambda p: [TRAIN_LCM, *train(p), "--config", "no/such.yaml"],
         ("--config no/such.yaml: no such file",)),
    Case("warmup-with-constant-lr", lambda p: [TRAIN_LCM, *train(p, lr_warmup_steps=10)],
         ("--lr_warmup_steps 10 has no effect with --lr_scheduler constant",
          "use --lr_scheduler constant_with_warmup")),
    Case("export-full-unet", lambda p: [TRAIN_LCM, *train(p, use_lora="false", export="kohya")],
         ("--export kohya: this run's output is full_unet, not a LoRA", "train with --use_lora true, or drop --export")),
    Case("push-to-hub-offline", lambda p: [TRAIN_LCM, *train(p, push_to_hub="true", hub_model_id="me/lcm")],
         ("--push_to_hub needs the network, but HF_HUB_OFFLINE is set", "unset it or drop --push_to_hub"),
         "--push_to_hub --hub_model_id me/lcm (HF_HUB_OFFLINE=1)"),
    # ---- checkpoints and the output folder
    Case("checkpoint-of-another-method",
         lambda p: [SD, "train", "tscd", *train(p, resume_from_checkpoint=p.lcm_checkpoint)],
         ("--resume_from_checkpoint", "written by method 'lcm', not 'tscd'", "point it at a tscd run or start fresh")),
    Case("init-from-another-method",
         lambda p: [SD, "train", "dmd2", *train(p, train_data_dir=None, prompts_file=p.prompts,
                                                  init_from_checkpoint=p.lcm_checkpoint)],
         ("--init_from_checkpoint", "written by method 'lcm', not 'dmd2'", "pass a checkpoint-N directory of an "
          "earlier dmd2 run")),
    Case("init-from-output-other-kind",
         lambda p: [SD, "train", "dmd2", *train(p, train_data_dir=None, prompts_file=p.prompts,
                                                  init_from_output=p.full_unet_student)],
         ("--init_from_output", "holds a full-UNet student (--use_lora false) (lcm)",
          "this run trains a LoRA student (--use_lora true): the student kinds must agree")),
    # ---- pipelines of stages (stepdistill train --config FILE with stages:)
    Case("stages-two-base-models",
         lambda p: [SD, "train", "--config", p.stages_two_bases, "--output_dir", p.out],
         ("stage 1 (dm) trains on the base model", "stage 0 (tscd) on",
          "the stages of a pipeline share one base model (set pretrained_model_name_or_path once, at the top)"),
         "two_bases.yaml --output_dir OUT   # stage 1 (dm) on another base model"),
    Case("stages-lora-then-full-unet",
         lambda p: [SD, "train", "--config", p.stages_two_kinds, "--output_dir", p.out],
         ("stage 1 (dm) trains a full-UNet student (--use_lora false), stage 0 (tscd) a LoRA student",
          "every stage trains the same student (set use_lora once, at the top)"),
         "lora_then_full.yaml --output_dir OUT   # stage 1 (dm): use_lora: false"),
    Case("output-dir-unwritable", lambda p: [TRAIN_LCM, *train(p, output_dir=f"{p.a_file}/out")],
         ("--output_dir", "a_file/out is not writable", "pass a directory you can write to"),
         "--output_dir a_file/out   # a_file is a file"),
    # ---- evaluation
    Case("eval-model-missing", lambda p: [SD, "eval", *evaluate(p, pretrained_model_name_or_path="no/such/model")],
         ("no/such/model: no such directory", "pass a Diffusers pipeline folder or a hub id")),
    Case("eval-empty-prompts-file", lambda p: [SD, "eval", *evaluate(p, prompts_file=p.empty_prompts)],
         ("empty.txt: prompt file is empty", "write one prompt per line"), "--prompts_file empty.txt"),
    Case("eval-corrupt-reference-image",
         lambda p: [SD, "eval", *evaluate(p, metrics="fid", clip_model=None, num_images=4,
                                          reference_dir=p.broken_data)],
         ("--reference_dir", "cannot read 0.png as an image", "remove or replace it")),
    Case("eval-unknown-metric", lambda p: [SD, "eval", *evaluate(p, metrics="fdi")],
         ("--metrics fdi: unknown fdi", "choose from fid, clip, kid, digits")),
    Case("eval-prompts-and-captions", lambda p: [SD, "eval", *evaluate(p, captions_file=p.prompts)],
         ("pass either --prompts_file or --captions_file, not both",)),
    Case("eval-resolution", lambda p: [SD, "eval", *evaluate(p, resolution=20)],
         ("--resolution 20 is not divisible by 8", "use a multiple of 8")),
    Case("eval-sdxl-lora-into-sd15",
         lambda p: [SD, "eval", *evaluate(p, student=p.sdxl_student, metrics="fid", clip_model=None, num_images=2,
                                          reference_dir=p.data)],
         ("--student", "was trained on an SDXL model, but --pretrained_model_name_or_path", "is an SD 1.x pipeline",
          "pass a base model of the student's family")),
    Case("eval-output-dir-used", lambda p: [SD, "eval", *evaluate(p, output_dir=p.used_eval_dir)],
         ("--output_dir", "holds images but no generation.json", "use an empty directory")),
    Case("eval-output-dir-unwritable", lambda p: [SD, "eval", *evaluate(p, output_dir=f"{p.a_file}/eval")],
         ("--output_dir", "a_file/eval is not writable", "pass a directory you can write to")),
    Case("eval-missing-output-dir", lambda p: ["eval/evaluate.py", *evaluate(p, output_dir=None)],
         ("the following arguments are required: --output_dir", "(see `stepdistill eval --help`)"),
         "(no --output_dir)"),
    # ---- export, the toy world, other commands
    Case("export-not-an-output", lambda p: [SD, "export", p.data, "--output", "lora.safetensors"],
         ("is not a stepdistill output (no stepdistill.json)", "pass the --output_dir of a"),
         "DATA --output lora.safetensors", loads_nothing=False),
    Case("export-full-unet-output", lambda p: [SD, "export", p.full_unet_student, "--output", "x.safetensors"],
         ("cannot export a full UNet", "train with --use_lora true to get an exportable LoRA"),
         "full_unet/ --output x.safetensors", loads_nothing=False),
    Case("export-wrong-family", lambda p: [SD, "export", p.sdxl_student, "--output", f"{p.out}/x.safetensors",
                                           "--base_family", "sd1"],
         ("--base_family sd1", "an SDXL model", "drop --base_family or pass sdxl"),
         "sdxl_lora/ --output x.safetensors --base_family sd1", loads_nothing=False),
    Case("export-not-safetensors", lambda p: [SD, "export", p.sdxl_student, "--output", "lora.ckpt"],
         ("--output lora.ckpt: a kohya LoRA is one .safetensors file", "name it FILE.safetensors"),
         "sdxl_lora/ --output lora.ckpt", loads_nothing=False),
    Case("toy-not-a-world", lambda p: [SD, "toy", "quality", "--model", p.sd],
         ("has no digits_classifier.safetensors", "it is not a tiny-digits world"), "--model SD15"),
    Case("toy-bad-steps", lambda p: [SD, "toy", "quality", "--model", p.world, "--steps", "4,x"],
         ("--steps 4,x: expected comma-separated integers >= 1", "e.g. 25,8,4,2"), "--steps 4,x"),
    Case("ref-stats-missing-dir", lambda p: [SD, "ref-stats", "--reference_dir", "no/such", "--output", "r.npz"],
         ("--reference_dir no/such: no such directory", "pass a folder of real images")),
    Case("unknown-command", lambda p: [SD, "evaluate"],
         ("argument command: invalid choice: 'evaluate'", "(see `stepdistill --help`)"), "evaluate",
         loads_nothing=False),
]


def run_main(argv: list[str]) -> int:
    """Run one command line in this process, through the function its program calls."""
    from stepdistill.api import main as train_main
    from stepdistill.cli import main as cli_main

    program, args = argv[0], argv[1:]
    if program.startswith("train_scripts/train_"):  # train_scripts/train_<method>.py: api.main(<method>)
        return train_main(Path(program).stem.removeprefix("train_"), args, prog=Path(program).name)
    if program == "eval/evaluate.py":
        return cli_main(["eval", *args])
    assert program == SD, program
    return cli_main(args)


# ------------------------------------------------------------------ the inputs, made once
@pytest.fixture(scope="module")
def paths(tmp_path_factory, tiny_sd_path, tiny_sdxl_path, digits_dir, toy_path) -> Paths:
    from safetensors.torch import save_file
    import torch

    from stepdistill.recipe import Recipe

    root = tmp_path_factory.mktemp("bad_input")
    from stepdistill.evaluation.clip import build_tiny_clip

    p = Paths(sd=str(tiny_sd_path), data=str(digits_dir), out=str(root / "out"), world=str(toy_path),
              clip=str(build_tiny_clip(root / "clip")))
    (root / "prompts.txt").write_text("a digit\nthe number one\n")
    (root / "empty.txt").write_text("\n# nothing but a comment\n\n")
    broken = root / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i}.png").write_bytes(b"not an image")
    (broken / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a digit"}) + "\n"
                                                   for i in range(3)))
    half = root / "half_broken"
    half.mkdir()
    for i in range(6):
        if i < 2:
            shutil.copy(Path(digits_dir) / f"{i:04d}.png", half / f"{i}.png")
        else:
            (half / f"{i}.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (half / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "text": "a digit"}) + "\n"
                                                 for i in range(6)))
    not_sd = root / "kandinsky"
    not_sd.mkdir()
    (not_sd / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    (root / "a_file").write_text("")
    (root / "unknown.yaml").write_text("max_train_step: 10\n")
    (root / "wrong_type.yaml").write_text("max_train_steps: [1, 2]\n")
    checkpoint = root / "lcm_run" / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text(json.dumps({"method": "lcm", "step": 1}))
    # an output of an SDXL base: its recipe, and a LoRA file whose cross-attention keys take the tiny SDXL's 64-wide
    # text embeddings (the checks read configs and this file's header, never the weights)
    sdxl = root / "sdxl_lora"
    sdxl.mkdir()
    Recipe(method="lcm_lora", base_model=str(tiny_sdxl_path), adapter="lora", scheduler="LCMScheduler").save(sdxl)
    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_{}.weight"
    save_file({key.format("A"): torch.zeros(4, 64), key.format("B"): torch.zeros(32, 4)},
              str(sdxl / "pytorch_lora_weights.safetensors"))
    full = root / "full_unet"
    full.mkdir()
    Recipe(method="lcm", base_model=str(tiny_sd_path), adapter="full_unet", scheduler="LCMScheduler").save(full)
    import yaml

    stages = [{"name": "tscd", "method": "tscd", "segments": [4, 2]},
              {"name": "dm", "method": "dmd2", "conditioning_timestep": 625}]
    shared = {"pretrained_model_name_or_path": str(tiny_sd_path), "train_data_dir": str(digits_dir),
              "max_train_steps": 2, "lora_rank": 4}
    (root / "two_bases.yaml").write_text(yaml.safe_dump({**shared, "stages": [
        stages[0], {**stages[1], "pretrained_model_name_or_path": str(tiny_sdxl_path)}]}))
    (root / "lora_then_full.yaml").write_text(yaml.safe_dump({**shared, "stages": [
        stages[0], {**stages[1], "use_lora": False}]}))
    used = root / "old_eval" / "images"
    used.mkdir(parents=True)
    shutil.copy(Path(digits_dir) / "0000.png", used / "00000.png")
    p.__dict__.update({name: str(root / getattr(Paths, name)) for name in
                       ("prompts", "empty_prompts", "broken_data", "half_broken_data", "not_sd", "a_file",
                        "yaml_unknown", "yaml_type", "lcm_checkpoint", "sdxl_student", "full_unet_student",
                        "used_eval_dir", "stages_two_bases", "stages_two_kinds")})
    return p


class WeightsLoaded(BaseException):
    """Raised by every from_pretrained of a model or pipeline: the command got as far as loading weights.
    A BaseException, so no ``except Exception`` on the way turns it into something else."""


@pytest.fixture
def no_weights(monkeypatch):
    """Every way the commands load weights fails loudly: Diffusers pipelines (the teacher, evaluation's pipeline)
    and models (UNet, VAE, ``--pretrained_vae_model_name_or_path``), Transformers models (text encoders, CLIP)."""
    import diffusers
    import transformers

    calls = []

    def loading(cls, *args, **kwargs):
        calls.append(cls.__name__)
        raise WeightsLoaded(f"{cls.__name__}.from_pretrained{args[:1]}")

    for cls in (diffusers.DiffusionPipeline, diffusers.ModelMixin, transformers.PreTrainedModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(loading))
    return calls


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, paths, no_weights, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # relative outputs (lora.ckpt, r.npz) land here
    argv = case.argv(paths)
    try:
        status = run_main(argv)
    except WeightsLoaded as e:
        pytest.fail(f"{case.id}: weights loaded before the bad input was refused ({e})")
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2, (status, captured.err)
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(("error: ", "stepdistill: error: ")), line
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    for part in case.message:
        assert part in line, (part, line)
    assert not no_weights


# ------------------------------------------------------------------ the hook fires, and --debug
def test_positive_controls_reach_the_weights(paths, no_weights, tmp_path):
    """The good command lines the cases spoil do get as far as loading weights, so ``no_weights`` would catch a
    check that came too late."""
    with pytest.raises(WeightsLoaded):
        run_main([TRAIN_LCM, *train(paths, output_dir=tmp_path / "train")])
    with pytest.raises(WeightsLoaded):
        run_main([SD, "eval", *evaluate(paths, output_dir=tmp_path / "eval")])
    assert no_weights[0] == "DiffusionPipeline" and len(no_weights) == 2, no_weights  # the teacher, then CLIP


def test_debug_adds_the_traceback_in_process(paths, capsys):
    argv = [TRAIN_LCM, *train(paths, lora_rank=0, output_dir=paths.out)]
    assert run_main(argv + ["--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "check_lora" in err
    assert err.splitlines()[-1].startswith("error: --lora_rank 0: a LoRA needs rank >= 1")
    assert run_main([SD, "--debug", "export", paths.data, "--output", "x.safetensors"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_real_command_prints_one_line_and_debug_the_traceback(paths, tmp_path):
    """``python eval/evaluate.py`` as a user runs it: one line on stderr, status 2; with --debug, the traceback."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the script puts its own repository first
    argv = [sys.executable, str(REPO / "eval" / "evaluate.py"), *evaluate(paths, prompts_file=paths.empty_prompts,
                                                                         output_dir=tmp_path / "e")]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"stepdistill: error: {paths.empty_prompts}: prompt file is empty; write one "
                                        "prompt per line"], done.stderr
    done = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr and "read_prompts" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("stepdistill: error: ")


# ------------------------------------------------------------------ README's table
def _beyond_base(args: list[str], p: Paths) -> str:
    """The options of ``args`` that a good training or evaluation command line (``train``, ``evaluate``) does not
    have, after "…" when there were such base options."""
    base = {tuple(pair) for options in (train(p), evaluate(p)) for pair in zip(options[::2], options[1::2])}
    pairs = list(zip(args[::2], args[1::2]))
    if len(args) % 2 or not all(a.startswith("--") for a, _ in pairs):
        return " ".join(args)
    kept = [x for pair in pairs if pair not in base for x in pair]
    return " ".join(["…"] * (len(kept) < len(args)) + kept)


def markdown_table() -> str:
    """README's table: one row per case, with placeholder paths (Paths' defaults)."""
    p = Paths()
    rows = ["| case | command | the one line (parts; `error:` first) |", "|---|---|---|"]
    for case in CASES:
        argv = case.argv(p)
        words = 1 if argv[0] != SD or case.id == "unknown-command" else 3 if argv[1] in ("train", "toy") else 2
        command = " ".join(argv[:words] + [case.shown or _beyond_base(argv[words:], p)]).replace("|", "\\|")
        message = " … ".join(case.message).replace("|", "\\|")
        rows.append(f"| {case.id} | `{command}` | {message} |")
    return "\n".join(rows)


def test_readme_table_is_generated_from_the_cases():
    readme = (REPO / "README.md").read_text()
    start, end = readme.index(README_START) + len(README_START), readme.index(README_END)
    assert readme[start:end].strip() == markdown_table(), "regenerate it: python tests/test_bad_input.py --write"


def test_the_table_is_big_and_its_ids_unique():
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


if __name__ == "__main__":  # print README's table; --write puts it into README.md
    table = markdown_table()
    if "--write" in sys.argv:
        path = REPO / "README.md"
        text = path.read_text()
        head, rest = text.split(README_START)
        _, tail = rest.split(README_END)
        path.write_text(f"{head}{README_START}\n{table}\n{README_END}{tail}")
    print(table)
