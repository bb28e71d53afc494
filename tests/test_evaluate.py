"""The evaluation harness: generation → metrics on tiny pipelines, resume, NFE counting, protocol, bad input."""

import argparse
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from stepdistill import cli
from stepdistill.errors import StepdistillError
from stepdistill.evaluation import (
    add_eval_args,
    add_ref_stats_args,
    build_tiny_clip,
    clean_resize,
    load_stats,
    read_captions,
    run_eval,
    run_ref_stats,
)
from stepdistill.recipe import Recipe


class RandomLinear(nn.Module):
    """A fixed random linear map of 8x8-pooled pixels: a stand-in for Inception that accepts any image size."""

    num_features = 8

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(8, 3 * 8 * 8, generator=g) / 8)

    def forward(self, images):
        return F.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1) @ self.weight.T


EXTRACTOR = f"{__name__}:RandomLinear"


def eval_args(*argv):
    return add_eval_args(argparse.ArgumentParser()).parse_args([*map(str, argv), "--no_progress"])


def ref_stats_args(*argv):
    return add_ref_stats_args(argparse.ArgumentParser()).parse_args([*map(str, argv), "--no_progress"])


def write_images(directory, n, size=(16, 16), seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(directory / f"{i}.png")
    return directory


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("reference"), 24)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red cat\na blue dog on the moon\n# a comment\n\na small house\n")
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_clip_score_end_to_end_through_the_cli(tiny_sd_path, prompts_file, tiny_clip, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["eval", "--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_file",
                     str(prompts_file), "--num_images", "5", "--batch_size", "2", "--num_inference_steps", "2",
                     "--guidance_scale", "1", "--metrics", "clip", "--clip_model", str(tiny_clip),
                     "--output_dir", str(out), "--no_progress"])
    assert code == 0
    result = json.loads((out / "metrics.json").read_text())
    assert isinstance(result["clip_score"], float) and result["clip_score"] >= 0
    assert "fid" not in result
    p = result["protocol"]
    assert p["clip"]["model"] == str(tiny_clip) and "100" in p["clip"]["score_scale"]
    assert p["nfe_per_image"] == 2  # guidance 1: no unconditional half
    assert p["num_inference_steps"] == 2 and len(p["timesteps"]) == 2
    assert p["prompts"]["num_distinct"] == 3 and p["prompts"]["cycled"]
    assert p["seconds_per_image"] > 0 and p["num_processes"] == 1
    assert sorted(f.name for f in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(5)]
    assert (out / "grid.png").is_file()
    assert '"clip_score"' in capsys.readouterr().out


@pytest.mark.parametrize("pipeline", ["tiny_sd_path", "tiny_sdxl_path"])
def test_generate_then_fid_with_a_module_extractor(pipeline, request, prompts_file, reference_dir, tmp_path):
    path = request.getfixturevalue(pipeline)
    out = tmp_path / "run"
    common = ["--pretrained_model_name_or_path", path, "--prompts_file", prompts_file, "--num_images", 6,
              "--batch_size", 4, "--num_inference_steps", 2, "--guidance_scale", 3, "--metrics", "fid",
              "--fid_extractor", EXTRACTOR, "--output_dir", out]
    result = run_eval(eval_args(*common, "--reference_dir", reference_dir))
    assert np.isfinite(result["fid"]) and result["fid"] > 0
    p = result["protocol"]
    assert p["nfe_per_image"] == 4  # 2 steps x (conditional + unconditional)
    assert p["reference"] == {"kind": "dir", "path": str(reference_dir.resolve()), "num_images": 24,
                              "image_sizes": [[16, 16]]}
    assert p["feature_extractor"]["name"] == EXTRACTOR and p["feature_extractor"]["num_features"] == 8
    assert p["preprocess"] == "none" and p["resize_rule"]
    assert p["guidance_scale"] == 3 and p["resolution"] == [16, 16]
    assert len(list((out / "images").glob("*.png"))) == 6

    # the same reference as saved statistics gives the same FID; nothing is regenerated for it
    stats_path = tmp_path / "ref.npz"
    meta = run_ref_stats(ref_stats_args("--reference_dir", reference_dir, "--output", stats_path,
                                        "--fid_extractor", EXTRACTOR))
    assert load_stats(stats_path).meta == meta and meta["num_images"] == 24
    again = run_eval(eval_args(*common, "--reference_stats", stats_path))
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-9)
    assert json.loads((out / "generation.json").read_text())["generated_images"] == 6


def test_resume_rewrites_exactly_the_missing_images(tiny_sd_path, prompts_file, reference_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts_file, "--num_images", 7,
            "--batch_size", 3, "--num_inference_steps", 2, "--guidance_scale", 2, "--metrics", "fid",
            "--fid_extractor", EXTRACTOR, "--reference_dir", reference_dir, "--output_dir", out]
    first = run_eval(eval_args(*argv))
    files = {f.name: f.read_bytes() for f in sorted((out / "images").iterdir())}
    for name in ("00001.png", "00005.png"):  # one image in each of the first two batches
        (out / "images" / name).unlink()
    second = run_eval(eval_args(*argv))
    assert {f.name: f.read_bytes() for f in sorted((out / "images").iterdir())} == files
    assert second["fid"] == first["fid"]
    state = json.loads((out / "generation.json").read_text())
    assert state["generated_images"] == 7 + 6  # the two incomplete batches were redone whole
    assert second["protocol"]["nfe_per_image"] == 4

    with pytest.raises(StepdistillError, match="another run.*call_kwargs"):
        run_eval(eval_args(*argv[:-1], out, "--num_inference_steps", 3))


def test_student_recipe_and_explicit_overrides(tiny_sd_path, prompts_file, tmp_path):
    from diffusers import UNet2DConditionModel

    student = tmp_path / "student"
    UNet2DConditionModel.from_pretrained(tiny_sd_path / "unet").save_pretrained(student / "unet")
    Recipe(method="lcm", base_model=str(tiny_sd_path), adapter="full_unet", scheduler="LCMScheduler",
           num_inference_steps=4, timesteps=[999, 759, 499, 259], guidance_scale=1.0).save(student)
    common = ["--prompts_file", prompts_file, "--num_images", 2, "--metrics", "clip", "--clip_model"]

    result = run_eval(eval_args("--student", student, *common, build_tiny_clip(tmp_path / "clip"),
                                "--output_dir", tmp_path / "a"))
    p = result["protocol"]
    assert (p["method"], p["scheduler"], p["timesteps"], p["nfe_per_image"]) == \
        ("lcm", "LCMScheduler", [999, 759, 499, 259], 4)

    result = run_eval(eval_args("--student", student, *common, tmp_path / "clip", "--num_inference_steps", 1,
                                "--output_dir", tmp_path / "b"))
    assert result["protocol"]["nfe_per_image"] == 1 and result["protocol"]["num_inference_steps"] == 1


def test_digits_fid_ranks_25_ddim_steps_above_2(toy_path, tmp_path):
    def digits_fid(steps):
        return run_eval(eval_args("--pretrained_model_name_or_path", toy_path, "--metrics", "digits",
                                  "--scheduler", "DDIMScheduler", "--num_inference_steps", steps,
                                  "--guidance_scale", 3, "--num_images", 200, "--batch_size", 200,
                                  "--output_dir", tmp_path / str(steps)))

    good, bad = digits_fid(25), digits_fid(2)
    assert good["protocol"]["nfe_per_image"] == 50
    assert good["digits_fid"] < bad["digits_fid"]
    assert good["prompt_agreement"] > 0.5
    assert good["protocol"]["digits"]["classifier"] == str(toy_path.resolve())


def test_captions_from_coco_json_and_csv(tmp_path):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [
        {"image_id": 7, "id": 1, "caption": "A cat on\na mat. "}, {"image_id": 3, "id": 2, "caption": "a dog"},
        {"image_id": 7, "id": 3, "caption": "another caption of image 7"}]}))
    assert read_captions(coco) == ["A cat on a mat.", "a dog"]
    table = tmp_path / "captions.csv"
    table.write_text('image_id,caption\n7,"a cat, on a mat"\n3,a dog\n7,again\n')
    assert read_captions(table) == ["a cat, on a mat", "a dog"]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,text\n1,a cat\n")
    with pytest.raises(StepdistillError, match="bad.csv.*image_id and caption"):
        read_captions(bad)


def test_clean_preprocess_center_crops_and_accepts_mixed_sizes(tmp_path):
    wide = np.zeros((20, 40, 3), dtype=np.uint8)
    wide[:, 10:30] = 255  # the centre square is white, the sides black
    out = clean_resize(Image.fromarray(wide))
    assert out.size == (256, 256) and np.asarray(out).min() > 250

    mixed = write_images(tmp_path / "mixed", 3, size=(16, 16))
    write_images(mixed, 1, size=(24, 20), seed=1)  # overwrites 0.png with another size
    meta = run_ref_stats(ref_stats_args("--reference_dir", mixed, "--output", tmp_path / "ref.npz",
                                        "--fid_extractor", EXTRACTOR, "--preprocess", "clean"))
    assert meta["preprocess"] == "crop_lanczos_256" and "Lanczos" in meta["resize_rule"]  # `clean` is its old name
    with pytest.raises(StepdistillError, match="mixed sizes.*--preprocess crop_lanczos_256"):
        run_ref_stats(ref_stats_args("--reference_dir", mixed, "--output", tmp_path / "x.npz",
                                     "--fid_extractor", EXTRACTOR))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    mixed = write_images(root / "mixed", 3)
    write_images(mixed, 1, size=(8, 8), seed=1)
    write_images(root / "single", 1)
    (root / "not_a_student").mkdir()
    return root


BAD = {
    "missing reference dir": (["--reference_dir", "{root}/nowhere"], r"--reference_dir \S*nowhere: no such"),
    "missing stats file": (["--reference_stats", "{root}/none.npz"], r"--reference_stats \S*none.npz"),
    "one image": (["--reference_dir", "{ref}", "--num_images", "1"], r"--num_images 1: FID needs at least 2"),
    "one reference image": (["--reference_dir", "{root}/single"], r"single: 1 images found"),
    "mixed sizes": (["--reference_dir", "{root}/mixed"], r"mixed: images of mixed sizes"),
    "missing weights": (["--reference_dir", "{ref}", "--fid_extractor", "inception", "--inception_weights",
                         "{root}/pt_inception.pth"], r"--inception_weights \S*pt_inception.pth: no such file"),
    "not a student": (["--reference_dir", "{ref}", "--student", "{root}/not_a_student"],
                      r"not_a_student is not a stepdistill output"),
    "unknown scheduler": (["--reference_dir", "{ref}", "--scheduler", "FastScheduler"], r"--scheduler FastScheduler"),
    "no reference": ([], r"exactly one reference"),
    "clip without model": (["--reference_dir", "{ref}", "--metrics", "fid", "clip"], r"--clip_model"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_before_any_image_is_generated(case, bad_inputs, tiny_sd_path, prompts_file,
                                                       reference_dir, tmp_path, monkeypatch):
    import diffusers

    extra, message = BAD[case]
    extra = [a.format(root=bad_inputs, ref=reference_dir) for a in extra]
    out = tmp_path / "run"
    argv = ["--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts_file, "--num_images", 4,
            "--metrics", "fid", "--fid_extractor", EXTRACTOR, "--output_dir", out, *extra]

    def no_sampling(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the input was checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_sampling)
    with pytest.raises(StepdistillError, match=message) as info:
        run_eval(eval_args(*argv))
    assert "\n" not in str(info.value)
    assert not (out / "images").exists()


def test_stats_made_with_another_protocol_are_refused(reference_dir, tiny_sd_path, prompts_file, tmp_path):
    stats = tmp_path / "clean.npz"
    run_ref_stats(ref_stats_args("--reference_dir", reference_dir, "--output", stats, "--fid_extractor",
                                 EXTRACTOR, "--preprocess", "clean"))
    with pytest.raises(StepdistillError, match="clean.npz was made with --preprocess crop_lanczos_256 but this run uses "
                                               "--preprocess none"):
        run_eval(eval_args("--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts_file,
                           "--fid_extractor", EXTRACTOR, "--reference_stats", stats, "--output_dir", tmp_path / "o"))
    assert not (tmp_path / "o").exists()


def test_cli_prints_bad_input_as_one_line(tmp_path, capsys):
    code = cli.main(["eval", "--pretrained_model_name_or_path", str(tmp_path / "missing_model"),
                     "--prompts_file", str(tmp_path / "p.txt"), "--output_dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("stepdistill: error:") and "missing_model" in err and "\n" not in err


class UpdateOnly:
    """A plug-in metric with ``update`` only (no ``features``/``add_features``): fed every batch from the files."""

    def __init__(self, args, base_model, device):
        self.seen = []

    def update(self, images, prompts):
        self.seen.append((images.shape[0], list(prompts)))

    def compute(self):
        return {"batches_seen": [n for n, _ in self.seen], "prompts_seen": [p for _, ps in self.seen for p in ps]}

    def protocol(self):
        return {}


def test_a_metric_with_update_only_sees_every_batch_in_order(tiny_sd_path, prompts_file, tmp_path, monkeypatch):
    from stepdistill.evaluation.registry import METRICS, MetricSpec

    monkeypatch.setitem(METRICS, "update_only", MetricSpec("update_only", UpdateOnly, ("batches_seen",)))
    result = run_eval(eval_args("--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts_file,
                                "--num_images", 5, "--batch_size", 2, "--num_inference_steps", 1,
                                "--guidance_scale", 1, "--metrics", "update_only", "--output_dir", tmp_path / "o"))
    assert result["batches_seen"] == [2, 2, 1]
    prompts = ["a red cat", "a blue dog on the moon", "a small house"]
    assert result["prompts_seen"] == [prompts[i % 3] for i in range(5)]
