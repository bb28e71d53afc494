"""MSD training: one student equals the single DMD2 run, each student trains on its part of the data only, the
output routes through the stock call and through the evaluation harness, smaller students and teacher score
matching, snapshots, and the bad inputs (one-line errors before any weights load)."""

import json

import pytest
import torch
from conftest import read_logs, train_args
from safetensors.torch import load_file

import stepdistill
from stepdistill.api import main
from stepdistill.errors import StepdistillError

CLASSES = [rf"\b({d}|{w})\b" for d, w in enumerate(["zero", "one", "two", "three", "four", "five", "six", "seven",
                                                    "eight", "nine"])]


def dm_args(model, data, out, **overrides):
    settings = dict(use_lora="false", max_train_steps=3, dfake_gen_update_ratio=2, conditioning_timestep=625,
                    max_train_samples=None, train_batch_size=4)
    settings = {**settings, **overrides}
    if settings.get("method") == "sid":  # SiD's own options: one step at its t_init
        del settings["conditioning_timestep"]
    return train_args(model, data, out, **settings)


def msd_args(model, data, out, k, classes=CLASSES, **overrides):
    """The classes go through a YAML file: their regular expressions hold "|", which separates list items on the
    command line."""
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    config = out.parent / f"{out.name}-partition.yaml"
    config.write_text(yaml.safe_dump({"partition": "classes", "partition_classes": list(classes)}))
    return ["--config", str(config), *dm_args(model, data, out, num_students=k, **overrides)]


def _stock(path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def msd2(tiny_sd_path, digits_dir, tmp_path_factory):
    """K = 2 full-UNet DMD2 students (digits 0-4 and 5-9) with a snapshot at step 2."""
    out = tmp_path_factory.mktemp("msd2")
    assert main("msd", msd_args(tiny_sd_path, digits_dir, out, 2, save_output_steps=2, gan="true")) == 0
    return out


def test_one_student_is_exactly_the_single_dmd2_run(tiny_sd_path, digits_dir, tmp_path):
    assert main("dmd2", dm_args(tiny_sd_path, digits_dir, tmp_path / "dmd2")) == 0
    assert main("msd", msd_args(tiny_sd_path, digits_dir, tmp_path / "msd", 1)) == 0
    single = load_file(str(tmp_path / "dmd2/unet/diffusion_pytorch_model.safetensors"))
    student = load_file(str(tmp_path / "msd/students/0/unet/diffusion_pytorch_model.safetensors"))
    assert single.keys() == student.keys() and all(torch.equal(single[k], student[k]) for k in single)
    def losses(run):
        return [{k: v for k, v in row.items() if k != "sec_per_step"} for row in read_logs(run)]

    assert losses(tmp_path / "dmd2") == losses(tmp_path / "msd/students/0")


def test_each_student_trains_on_its_part_only(msd2, digits_dir):
    from stepdistill.data import build_dataset
    from stepdistill.msd.partition import Router

    router = Router.load(msd2)
    captions = [json.loads(line)["text"] for line in (digits_dir / "metadata.jsonl").read_text().splitlines()]
    labels = [json.loads(line)["label"] for line in (digits_dir / "metadata.jsonl").read_text().splitlines()]
    assert router.route(captions) == [int(label >= 5) for label in labels]  # contiguous class blocks
    assert json.loads((msd2 / "msd_parts.json").read_text())["captions_per_student"] == [40, 40]

    class Config:  # the data options of the run, for build_dataset
        train_data_dir, caption_column, max_train_samples, max_bad_images = str(digits_dir), "text", None, 10
        dataset_name = train_shards = prompts_file = None

    for k in range(2):
        part = build_dataset(Config, 16, need_images=True, keep=lambda c, k=k: router.route([c])[0] == k)
        assert {router.route([s.caption])[0] for s in part.samples} == {k}
        assert len(part) == sum(int(label >= 5) == k for label in labels)


def test_routed_full_unet_students_in_the_stock_call_and_the_evaluation(msd2, tiny_sd_path):
    from stepdistill.evaluation.sampler import ForwardMeter, Sampler, sampling_unets
    from stepdistill.recipe import Recipe

    prompts = ["a drawing of the digit 7", "the number 1", "a photo of the number 8", "handwritten 2"]
    routed = stepdistill.load(_stock(tiny_sd_path), msd2)
    call = Recipe.load(msd2).call_kwargs()
    meter = ForwardMeter(sampling_unets(routed))
    with meter.counting():
        out = routed(prompts, generator=[torch.Generator().manual_seed(i) for i in range(4)], output_type="pt",
                     **call)
    assert type(out).__name__ == "StableDiffusionPipelineOutput" and meter.samples == 4  # one pass per image
    for k, rows in ((0, [1, 3]), (1, [0, 2])):
        alone = stepdistill.load(_stock(tiny_sd_path), msd2 / "students" / str(k))
        expected = alone([prompts[i] for i in rows], generator=[torch.Generator().manual_seed(i) for i in rows],
                         output_type="pt", **call).images
        assert torch.allclose(out.images[rows], expected, atol=1e-6)
    assert all(routed.unet is not unet for unet in routed.unets)  # the pipeline's own UNet is back
    # the harness encodes each prompt once and passes prompt_embeds: the prompts still route
    images = Sampler(routed, call)(prompts, range(4))
    direct = (out.images.clamp(0, 1) * 255).round().to(torch.uint8)
    assert (images.int() - direct.int()).abs().max() <= 1  # one-prompt encodings may differ in the last bits


def test_snapshots_are_msd_outputs_of_the_shorter_run(msd2, tiny_sd_path, digits_dir, tmp_path):
    snapshot = msd2 / "snapshots" / "step-000002"
    assert json.loads((snapshot / "msd.json").read_text())["students"][1] == "../../students/1/snapshots/step-000002"
    assert main("msd", msd_args(tiny_sd_path, digits_dir, tmp_path / "short", 2, max_train_steps=2, gan="true",
                                students="1")) == 0
    assert not (tmp_path / "short/msd.json").exists()  # student 0 is not on disk yet: no MSD output
    shorter = load_file(str(tmp_path / "short/students/1/unet/diffusion_pytorch_model.safetensors"))
    snap = load_file(str(msd2 / "students/1/snapshots/step-000002/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(shorter[k], snap[k]) for k in shorter)
    stepdistill.load(_stock(tiny_sd_path), snapshot)  # a complete output


def test_teacher_score_matching_brings_a_half_width_student_to_the_teacher(toy_path, tmp_path):
    from stepdistill.students import parameter_count

    out = tmp_path / "tsm"
    assert main("tsm", ["--pretrained_model_name_or_path", str(toy_path), "--train_data_dir", "builtin:tiny-digits",
                        "--output_dir", str(out), "--student_channel_multiplier", "0.5", "--max_train_steps", "60",
                        "--train_batch_size", "32", "--learning_rate", "2e-3", "--checkpointing_steps", "0",
                        "--cache_latents", "true"]) == 0
    losses = [row["loss_tsm"] for row in read_logs(out)]
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5  # regression error to the teacher at least halves
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_pretrained(out / "unet")
    teacher = UNet2DConditionModel.from_pretrained(toy_path / "unet")
    assert student.config.block_out_channels == [16, 32]
    assert parameter_count(student) < 0.35 * parameter_count(teacher)


def test_scaled_configs_keep_groups_and_heads():
    from stepdistill.students import scaled_unet_config

    sd15 = {"block_out_channels": [320, 640, 1280, 1280], "norm_num_groups": 32, "attention_head_dim": 8}
    half = scaled_unet_config(sd15, 0.5)
    assert half["block_out_channels"] == [160, 320, 640, 640] and half["attention_head_dim"] == 4
    sdxl = {"block_out_channels": [320, 640, 1280], "norm_num_groups": 32, "attention_head_dim": [5, 10, 20]}
    assert scaled_unet_config(sdxl, 0.5)["attention_head_dim"] == [2, 5, 10]  # 160/2, 320/5, 640/10: 80, 64, 64


@pytest.mark.parametrize("overrides, message", [
    (dict(num_students=11), "--num_students 11 is larger than the number of distinct classes"),
    (dict(classes=CLASSES[:9]), "matches none of the explicit partition's patterns"),
    (dict(students="2"), r"--students \[2\]: students are numbered 0..1"),
    (dict(partition="patterns", partition_patterns="zero"), "expected 'REGEX=>K'"),
    (dict(partition="patterns", partition_patterns=r"\bzero\b=>0|.=>2"), r"each of 0..1 needs at least one"),
    (dict(tsm_steps=5), "--tsm_steps initialises a student of its own shape"),
    (dict(student_channel_multiplier=0.5, use_lora="true"), "add --use_lora false"),
    (dict(student_channel_multiplier=1.5), r"must be in \(0, 1\]"),
    (dict(method="lcm"), "MSD students train with one of dmd2, sid"),
])
def test_bad_msd_input_is_one_line_before_training(overrides, message, tiny_sd_path, digits_dir, tmp_path, capsys):
    args = msd_args(tiny_sd_path, digits_dir, tmp_path / "out", 2, **{k: v for k, v in overrides.items()
                                                                       if k == "classes"})
    for key, value in overrides.items():
        if key == "classes":
            continue
        if f"--{key}" in args:
            i = args.index(f"--{key}")
            args[i + 1] = str(value)
        else:
            args += [f"--{key}", str(value)]
    assert main("msd", args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "out" / "students").exists()


def test_more_students_than_prompts_and_a_router_of_another_k(tiny_sd_path, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\na cat\n")
    base = ["--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_file", str(prompts), "--output_dir",
            str(tmp_path / "out"), "--max_train_steps", "1", "--train_batch_size", "2"]
    assert main("msd", base + ["--num_students", "3"]) == 2
    assert "--num_students 3 is larger than the number of distinct prompts (2)" in capsys.readouterr().err
    assert main("msd", base + ["--num_students", "2", "--students", "0"]) == 0
    assert main("msd", base + ["--num_students", "1"]) == 2
    assert "its router has 2 students, not --num_students 1" in capsys.readouterr().err


def test_lora_students_of_sid_route_through_set_adapters(tiny_sd_path, digits_dir, tmp_path):
    from stepdistill.evaluation import bench_outputs
    from stepdistill.recipe import Recipe

    out = tmp_path / "sid"
    prompts = tmp_path / "prompts.txt"  # SiD is data-free: the prompts are the partitioned set
    prompts.write_text("".join(f"the number {d}\nthe digit {w}\n" for d, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])))
    assert main("msd", msd_args(tiny_sd_path, None, out, 2, method="sid", use_lora="true", prompts_file=prompts,
                                max_train_steps=2, learning_rate=1e-2)) == 0
    assert Recipe.load(out).extra["student_method"] == "sid"
    routed = stepdistill.load(_stock(tiny_sd_path), out)
    assert routed.adapter_names == ["stepdistill_student_0", "stepdistill_student_1"]
    prompts = ["the number 3", "the number 7"]
    call = Recipe.load(out).call_kwargs()
    images = routed(prompts, generator=[torch.Generator().manual_seed(0)] * 2, output_type="pt", **call).images
    same = [routed.pipe.set_adapters(name) or routed.pipe(prompts, generator=[torch.Generator().manual_seed(0)] * 2,
                                                           output_type="pt", **call).images for name in
            routed.adapter_names]
    assert torch.allclose(images[0], same[0][0], atol=1e-6) and torch.allclose(images[1], same[1][1], atol=1e-6)
    assert not torch.allclose(same[0][1], same[1][1], atol=1e-4)  # the two students differ
    rows = bench_outputs(tiny_sd_path, {"msd": out}, prompts, num_images=4, batch_size=4, repeats=1, progress=False)
    assert rows[0]["nfe"] == Recipe.load(out).num_inference_steps and rows[0]["parameters"] > 0
