"""The shared trainer through the consistency methods: outputs a stock pipeline loads, resume, distributed runs,
and bad input caught before training."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, lora_before_after, read_logs, train_args
from safetensors.torch import load_file

import stepdistill
from stepdistill.api import main as run  # what train_scripts/train_<method>.py and `stepdistill train` run
from stepdistill.methods import get_method
from stepdistill.recipe import LORA_WEIGHTS_NAME, Recipe


def _lora(output_dir):
    return load_file(Path(output_dir) / LORA_WEIGHTS_NAME)


@pytest.mark.parametrize("method", ["lcm", "tscd"])
def test_lora_loads_into_stock_pipeline_and_changes_output(method, tiny_sd_path, digits_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    extra = {"segments": "2,1"} if method == "tscd" else {}
    assert run(method, train_args(tiny_sd_path, digits_dir, out, learning_rate=1e-2, **extra)) == 0
    recipe = Recipe.load(out)
    assert recipe.adapter == "lora" and recipe.method in ("lcm_lora", "tscd")
    assert (out / "README.md").is_file() and (out / "loss_curve.png").is_file()
    assert list((out / "samples").glob("*.png"))

    before, after = lora_before_after(StableDiffusionPipeline, tiny_sd_path, out)  # the stock way
    assert (after - before).abs().max() > 1e-3
    # stepdistill.load applies the same weights and the recipe's scheduler
    pipe2 = stepdistill.load(StableDiffusionPipeline.from_pretrained(tiny_sd_path), out)
    assert type(pipe2.scheduler).__name__ == recipe.scheduler
    again = pipe2("a digit", generator=torch.Generator().manual_seed(0), output_type="pt",
                  **recipe.call_kwargs()).images
    assert torch.allclose(after, again, atol=1e-5)


def test_lora_keeps_rank_and_alpha(tiny_sd_path, digits_dir, tmp_path):
    """alpha != rank must survive the round trip, or a stock load applies the wrong LoRA scale."""
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=1, lora_rank=4, lora_alpha=2)) == 0
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.load_lora_weights(out, adapter_name="x")
    config = pipe.unet.peft_config["x"]
    assert (config.r, config.lora_alpha) == (4, 2)


def test_full_lcm_writes_a_guidance_conditioned_unet(tiny_sd_path, digits_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "full"
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, use_lora="false", max_train_steps=2,
                               learning_rate=1e-3, inference_guidance_scale=3.0)) == 0
    recipe = Recipe.load(out)
    assert recipe.adapter == "full_unet"
    pipe = stepdistill.load(StableDiffusionPipeline.from_pretrained(tiny_sd_path), out)
    assert pipe.unet.config.time_cond_proj_dim == 256
    image = pipe("a cat", output_type="pt", **recipe.call_kwargs()).images
    assert torch.isfinite(image).all()
    assert (out / "checkpoint-2" / "target.safetensors").is_file()  # the EMA target is checkpointed


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tiny_sd_path, digits_dir, tmp_path):
    common = dict(max_train_steps=6, learning_rate=1e-3, checkpointing_steps=3, checkpoints_total_limit=5)
    assert run("lcm", train_args(tiny_sd_path, digits_dir, tmp_path / "straight", **common)) == 0
    # the interrupted run: stop after the step-3 checkpoint, then resume from it
    partial = tmp_path / "resumed"
    assert run("lcm", train_args(tiny_sd_path, digits_dir, partial, **{**common, "max_train_steps": 3})) == 0
    for leftover in ("pytorch_lora_weights.safetensors", "stepdistill.json"):
        (partial / leftover).unlink()
    assert run("lcm", train_args(tiny_sd_path, digits_dir, partial, resume_from_checkpoint="latest", **common)) == 0
    a, b = _lora(tmp_path / "straight"), _lora(partial)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-7), k
    logs = read_logs(partial)
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5, 6]


def test_checkpoints_are_pruned_and_no_temporaries_left(tiny_sd_path, digits_dir, tmp_path):
    out = tmp_path / "run"
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=4, checkpointing_steps=1,
                               checkpoints_total_limit=2)) == 0
    names = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert names == ["checkpoint-3", "checkpoint-4"]


def test_interrupted_save_leaves_previous_checkpoint_usable(tiny_sd_path, digits_dir, tmp_path, monkeypatch):
    """A crash in the middle of writing a checkpoint (simulated: the write raises) leaves the last complete
    checkpoint in place and resumable."""
    import stepdistill.checkpoint as ck

    out = tmp_path / "run"
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=2, checkpointing_steps=1)) == 0
    real_save = ck.save_file

    def dying_save(tensors, path, *a, **k):
        if "optimizer" in str(path):
            raise KeyboardInterrupt("killed during save")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(ck, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=3, checkpointing_steps=1,
                            resume_from_checkpoint="latest"))
    monkeypatch.setattr(ck, "save_file", real_save)
    assert [p.name for p in ck.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert ck.load_checkpoint(out / "checkpoint-2", optimizers={}, schedulers={})[0] == 2


def test_config_file_and_command_line(tiny_sd_path, digits_dir, tmp_path):
    from stepdistill.config import parse_config
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"pretrained_model_name_or_path: {tiny_sd_path}\nsegments: [4, 2]\nlearning_rate: 0.5\n")
    config = parse_config(get_method("tscd").config_class, ["--config", str(cfg), "--learning_rate", "0.25"])
    assert config.segments == [4, 2] and config.learning_rate == 0.25  # command line wins


@pytest.mark.parametrize("argv_extra, yaml_text, message", [
    ([], "no_such_option: 1\n", "unknown option 'no_such_option'"),
    (["--resolution", "20"], "", "--resolution 20 is not divisible by 8"),
    (["--segments", "8,3"], "", "not a multiple of segment counts [3]"),
    (["--guidance_scale_min", "0.5"], "", "1 <= min <= max"),
])
def test_bad_input_is_one_line_before_training(argv_extra, yaml_text, message, tiny_sd_path, digits_dir, tmp_path,
                                               capsys):
    argv = train_args(tiny_sd_path, digits_dir, tmp_path / "out") + argv_extra
    if yaml_text:
        (tmp_path / "c.yaml").write_text(yaml_text)
        argv += ["--config", str(tmp_path / "c.yaml")]
    assert run("tscd", argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "logs.jsonl").exists()


@pytest.mark.parametrize("method, overrides, message", [
    ("lcm", {"train_data_dir": None}, "this method trains on images: pass --train_data_dir"),
    ("lcm", {"train_shards": "x/{0..1}.tar"}, "pass one image source, not --train_data_dir, --train_shards"),
    ("lcm", {"train_data_dir": "no/such/folder"}, "--train_data_dir no/such/folder: no such directory"),
    ("lcm", {"train_data_dir": None, "train_shards": "no/such/{000..002}.tar"},
     "--train_shards no/such/{000..002}.tar: 3 of 3 shards do not exist (first: no/such/000.tar)"),
    ("lcm", {"streaming": "true"}, "--streaming streams a --dataset_name (--train_shards always stream); drop it"),
    ("lcm", {"dataloader_num_workers": -1}, "--dataloader_num_workers -1: must be >= 0"),
    ("sid", {"train_data_dir": None}, "SiD is data-free: pass --prompts_file (one prompt per line)"),
    ("dmd2", {"train_data_dir": None}, "DMD2 needs prompts: pass --prompts_file"),
    ("sid", {"train_data_dir": None, "prompts_file": "no/such/prompts.txt"}, "--prompts_file no/such/prompts.txt: "
     "no such file"),
])
def test_data_source_errors_come_before_any_weights_load(method, overrides, message, tiny_sd_path, digits_dir,
                                                         tmp_path, capsys, monkeypatch):
    import stepdistill.trainer as trainer

    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the data source was checked")

    monkeypatch.setattr(trainer.Teacher, "for_config", no_loading)
    assert run(method, train_args(tiny_sd_path, digits_dir, tmp_path / "o", **overrides)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], err


def test_unknown_argument(tiny_sd_path, digits_dir, tmp_path, capsys):
    assert run("lcm", train_args(tiny_sd_path, digits_dir, tmp_path / "o") + ["--learnin_rate", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unrecognized arguments: --learnin_rate" in err[0], err


def test_missing_caption_column(tiny_sd_path, digits_dir, tmp_path, capsys):
    assert run("lcm", train_args(tiny_sd_path, digits_dir, tmp_path / "o", caption_column="prompt")) == 2
    err = capsys.readouterr().err
    assert "no 'prompt' field" in err and "--caption_column" in err


def test_unreadable_images_are_skipped_or_refused(tiny_sd_path, digits_dir, tmp_path, capsys, caplog):
    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    (data / "0001.png").write_bytes(b"not an image")
    assert run("lcm", train_args(tiny_sd_path, data, tmp_path / "a", max_train_steps=1)) == 0
    assert any("0001.png" in r.getMessage() for r in caplog.records)
    for i in range(2, 6):
        (data / f"{i:04d}.png").write_bytes(b"broken")
    assert run("lcm", train_args(tiny_sd_path, data, tmp_path / "b", max_bad_images=3)) == 2
    assert "more than --max_bad_images 3" in capsys.readouterr().err


def test_resume_from_another_methods_run(tiny_sd_path, digits_dir, tmp_path, capsys):
    out = tmp_path / "lcm"
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, max_train_steps=1)) == 0
    assert run("tscd", train_args(tiny_sd_path, digits_dir, tmp_path / "t",
                                resume_from_checkpoint=out / "checkpoint-1")) == 2
    assert "written by method 'lcm', not 'tscd'" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir(tiny_sd_path, digits_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run("lcm", train_args(tiny_sd_path, digits_dir, locked / "out")) == 2
    assert "is not writable" in capsys.readouterr().err


def test_output_dir_that_is_a_file(tiny_sd_path, digits_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run("lcm", train_args(tiny_sd_path, digits_dir, blocker / "out")) == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["lcm", "tscd"])
def test_sdxl_lora_loads_into_stock_pipeline(method, tiny_sdxl_path, digits_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "xl"
    extra = {"segments": "2,1"} if method == "tscd" else {}
    assert run(method, train_args(tiny_sdxl_path, digits_dir, out, max_train_steps=2, learning_rate=1e-2,
                                  **extra)) == 0
    before, after = lora_before_after(StableDiffusionXLPipeline, tiny_sdxl_path, out, "a cat", height=16, width=16)
    assert (after - before).abs().max() > 1e-4


def test_two_processes_match_one_process_with_the_doubled_batch(tiny_sd_path, digits_dir, tmp_path):
    """torchrun --nproc_per_node 2 (Accelerate MULTI_CPU over gloo): the first-step loss equals a single process
    with twice the batch, and only the main process writes files."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    base = dict(max_train_steps=2, checkpointing_steps=1, learning_rate=1e-3)
    assert run("lcm", train_args(tiny_sd_path, digits_dir, single, train_batch_size=4, **base)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           str(REPO / "train_scripts/train_lcm.py"), *train_args(tiny_sd_path, digits_dir, multi,
                                                                 train_batch_size=2, **base)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Accelerate ran MULTI_CPU (gloo) with both processes: stepdistill.api logs it on the main process
    assert "distributed: MULTI_CPU, 2 processes" in proc.stderr, proc.stderr[-3000:]
    first, second = read_logs(single), read_logs(multi)
    assert len(second) == 2  # one log line per step: rank 1 wrote nothing
    assert abs(first[0]["loss"] - second[0]["loss"]) <= 1e-5 * abs(first[0]["loss"]) + 1e-7
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    # after the steps both runs hold the same LoRA (Adam's first steps are ~lr·sign(g), so elements whose
    # gradient is at rounding-noise level may flip; the rest agree)
    a, b = _lora(single), _lora(multi)
    close = torch.cat([(a[k] - b[k]).abs().flatten() < 1e-5 for k in a]).float().mean()
    assert close > 0.99, close
    # resumed with the other process count (same global batch): the 1-process checkpoint by 2 processes and the
    # 2-process checkpoint by one; each continues its source run (the step after the checkpoint: the same loss)
    cmd[cmd.index("--master_port") + 1] = "29535"
    proc = subprocess.run(cmd[:-len(train_args(tiny_sd_path, digits_dir, multi, train_batch_size=2, **base))] +
                          train_args(tiny_sd_path, digits_dir, tmp_path / "multi_from_single", train_batch_size=2,
                                     resume_from_checkpoint=single / "checkpoint-1", **base),
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run("lcm", train_args(tiny_sd_path, digits_dir, tmp_path / "single_from_multi", train_batch_size=4,
                                 resume_from_checkpoint=multi / "checkpoint-1", **base)) == 0
    for source, resumed in ((single, "multi_from_single"), (multi, "single_from_multi")):
        logs = read_logs(tmp_path / resumed)
        assert [r["step"] for r in logs] == [2], logs
        expected = read_logs(source)[1]["loss"]
        assert abs(logs[0]["loss"] - expected) <= 1e-5 * abs(expected), (resumed, logs[0]["loss"], expected)


def _digits_subset(n=24):
    from stepdistill.toy.export import digit_samples

    return digit_samples()[:n]


def test_hugging_face_dataset_source(tiny_sd_path, tmp_path, capsys):
    import datasets

    samples = _digits_subset()
    features = datasets.Features({"img": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict({"img": [s[0] for s in samples], "caption": [s[1] for s in samples]},
                               features=features).save_to_disk(tmp_path / "hf")
    args = train_args(tiny_sd_path, None, tmp_path / "out", dataset_name=tmp_path / "hf", max_train_steps=2)
    assert run("lcm", args + ["--image_column", "img", "--caption_column", "caption"]) == 0
    assert Recipe.load(tmp_path / "out").method == "lcm_lora"
    assert run("lcm", args + ["--image_column", "img"]) == 2  # the default caption column "text" is absent
    assert "no column 'text'" in capsys.readouterr().err


def test_webdataset_shards_source(tiny_sd_path, tmp_path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "shard-00000.tar", "w") as tar:
        for i, (image, text, _) in enumerate(_digits_subset()):
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            for ext, payload in (("png", buf.getvalue()), ("txt", text.encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    args = train_args(tiny_sd_path, None, tmp_path / "out", train_shards=tmp_path / "shard-00000.tar",
                      max_train_steps=2)
    assert run("tscd", args + ["--segments", "1"]) == 0
    assert (tmp_path / "out" / LORA_WEIGHTS_NAME).is_file()


def test_builtin_tiny_digits_source_and_cached_latents(tiny_sd_path, tmp_path):
    out = tmp_path / "out"
    assert run("lcm", train_args(tiny_sd_path, "builtin:tiny-digits", out, cache_latents="true",
                               max_train_steps=2)) == 0
    logs = read_logs(out)
    assert len(logs) == 2 and all(r["loss"] > 0 for r in logs)


def test_bf16_gradient_checkpointing_and_accumulation(tiny_sd_path, digits_dir, tmp_path):
    out = tmp_path / "out"
    assert run("lcm", train_args(tiny_sd_path, digits_dir, out, mixed_precision="bf16", gradient_checkpointing="true",
                               gradient_accumulation_steps=2, max_train_steps=2, learning_rate=1e-2)) == 0
    logs = read_logs(out)
    assert [r["step"] for r in logs] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    assert any(v.abs().max() > 0 for k, v in _lora(out).items() if "lora_B" in k)  # it trained


def test_tscd_adversarial_term_trains_a_head_on_the_frozen_teacher(tiny_sd_path, digits_dir, tmp_path):
    """PCM/Hyper-SD's optional adversarial term: a discriminator head on the teacher's mid-block features, its own
    phase every iteration once on, and a weight that grows as segments shrink."""
    from stepdistill.config import parse_config
    from stepdistill.trainer import Trainer

    out = tmp_path / "adv"
    argv = train_args(tiny_sd_path, digits_dir, out, max_train_steps=4, segments="2,1", adversarial_weight=0.1,
                      adversarial_start_step=1, learning_rate=1e-3)
    tscd = get_method("tscd")
    trainer = Trainer(parse_config(tscd.config_class, argv), tscd)
    method = trainer.method
    head_before = {k: v.clone() for k, v in method.networks["discriminator"].state_dict().items()}
    assert method.phases(0) == ["student"] and method.phases(1) == ["student", "discriminator"]
    trainer.train()
    logs = read_logs(out)
    assert "loss_disc" not in logs[0] and all("loss_disc" in r and "loss_adv" in r for r in logs[1:])
    head_after = method.networks["discriminator"].state_dict()
    assert any(not torch.equal(head_before[k], head_after[k]) for k in head_before)
    # the teacher backbone stayed frozen and only the LoRA is written out
    assert all("lora" in k for k in _lora(out))
    assert (out / "checkpoint-4" / "discriminator.safetensors").is_file()
