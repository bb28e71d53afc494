"""The papers' evaluation protocols (issue 15): clean-fid's resize, the COCO crop, the papers' CLIP score, KID,
caption lists and the COCO reference subset, each against a hand computation."""

import argparse
import hashlib
import json
import math
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import REPO
from PIL import Image

from stepdistill.errors import StepdistillError
from stepdistill.evaluation import (
    PaperClipScore,
    add_eval_args,
    add_ref_stats_args,
    build_tiny_clip,
    center_crop_lanczos,
    clean_fid_resize,
    load_features,
    load_stats,
    make_clip_score,
    read_captions,
    run_eval,
    run_ref_stats,
)
from stepdistill.evaluation.clip import DEFAULT_CLIP_WORDS
from stepdistill.evaluation.extractors import read_inception_weights


class CountingLinear(nn.Module):
    """A fixed random linear map of 8x8-pooled pixels that counts the images it sees."""

    num_features = 8
    calls = 0

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("weight", torch.randn(8, 3 * 8 * 8, generator=g) / 8)

    def forward(self, images):
        CountingLinear.calls += len(images)
        return F.adaptive_avg_pool2d(images.float() / 255, 8).flatten(1) @ self.weight.T


EXTRACTOR = f"{__name__}:CountingLinear"


class AsFloat64(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x).double()


def eval_args(*argv):
    return add_eval_args(argparse.ArgumentParser()).parse_args([*map(str, argv), "--no_progress"])


def ref_stats_args(*argv):
    return add_ref_stats_args(argparse.ArgumentParser()).parse_args([*map(str, argv), "--no_progress"])


def write_images(directory, names, size=(16, 16), seed=0):
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(directory / name)
    return directory


# ---------------------------------------------------------------- clean-fid's resize, by hand

def pil_bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """PIL's bicubic resampling (a = -0.5, support widened by the scale when shrinking, weights normalised) as an
    ``(n_out, n_in)`` matrix, written from the algorithm's description (Pillow's libImaging/Resample.c)."""

    def cubic(x):
        a, x = -0.5, abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        center = (i + 0.5) * scale
        lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n_in)
        w = np.array([cubic((j - center + 0.5) / filterscale) for j in range(lo, hi)])
        m[i, lo:hi] = w / w.sum()
    return m


@pytest.mark.parametrize("size", [(7, 5), (413, 388)])  # (W, H): enlarging, and shrinking with a wider support
def test_clean_fid_resize_equals_a_hand_computed_float_bicubic(size):
    w, h = size
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    image[0, 0] = [0, 255, 0]  # sharp edges make bicubic overshoot, so the clip to [0, 255] matters
    out = clean_fid_resize(image)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    rows, cols = pil_bicubic_matrix(h, 299), pil_bicubic_matrix(w, 299)
    for c in range(3):
        # horizontal pass first, stored as float32 (a mode-F image), then vertical, then the clip
        tmp = (image[:, :, c].astype(np.float64) @ cols.T).astype(np.float32)
        hand = np.clip((rows @ tmp.astype(np.float64)).astype(np.float32), 0, 255)
        np.testing.assert_allclose(out[:, :, c], hand, rtol=1e-6, atol=1e-6)
    # float, not quantised to uint8 as a plain PIL resize of the RGB image would be
    assert np.abs(out - np.round(out)).max() > 0.1
    quantised = np.asarray(Image.fromarray(image).resize((299, 299), Image.BICUBIC)).astype(np.float32)
    assert np.abs(out - quantised).max() > 0.1


def test_center_crop_takes_torchvision_offset_and_lanczos_to_256():
    # sides differing by 3 (mod 4): torchvision's round((w - s) / 2) = round(1.5) = 2, a floor would give 1
    image = np.arange(3 * 6 * 3, dtype=np.uint8).reshape(3, 6, 3)
    cropped = np.asarray(center_crop_lanczos(Image.fromarray(image), size=3))  # no resize at the crop's own size
    np.testing.assert_array_equal(cropped, image[:, 2:5])
    tall = np.arange(9 * 4 * 3, dtype=np.uint8).reshape(9, 4, 3)  # 5 / 2 = 2.5 rounds to 2 (half to even)
    np.testing.assert_array_equal(np.asarray(center_crop_lanczos(Image.fromarray(tall), size=4)), tall[2:6])
    square = Image.fromarray(image[:, 2:5])
    np.testing.assert_array_equal(np.asarray(center_crop_lanczos(Image.fromarray(image))),
                                  np.asarray(square.resize((256, 256), Image.LANCZOS)))


# ---------------------------------------------------------------- the papers' CLIP score

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), words=DEFAULT_CLIP_WORDS + ["depicts", "cat"])


def hand_pixels(image_chw: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """GigaGAN/DMD2's image path by hand: center crop, Lanczos to 256, then open_clip's eval transform (PIL bicubic
    of the shorter side, center crop, /255, normalise) for a square image."""
    im = Image.fromarray(image_chw.permute(1, 2, 0).numpy())
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))  # even differences here
    im = im.resize((256, 256), Image.LANCZOS).resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im).astype(np.float32) / 255).permute(2, 0, 1)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def test_paper_clip_score_equals_a_hand_computation(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (4, 3, 24, 20), generator=g, dtype=torch.uint8)
    prompts = ["a photo of the digit one", "two", "a handwritten three cat", "the number four"]
    score = PaperClipScore(model, processor)
    cos = score.cosines(images, prompts)
    assert cos.dtype == torch.float64 and cos.shape == (4,)

    ip = processor.image_processor
    pixels = torch.stack([hand_pixels(im, 32, ip.image_mean, ip.image_std) for im in images])
    # the prefix joins the caption at the token level; for captions this short that is the tokens of the joined text
    text = processor.tokenizer(["a photo depicts " + p for p in prompts], padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**text)
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    hand = [float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
            for a, b in zip(img.double().numpy(), txt.double().numpy())]
    np.testing.assert_allclose(cos.numpy(), hand, rtol=0, atol=1e-6)
    # "A photo depicts " is three tokens between the start token and the caption's
    ids = score.token_ids(["cat"])[0]
    words = processor.tokenizer.convert_ids_to_tokens(ids)
    assert words == ["<|startoftext|>", "a</w>", "photo</w>", "depicts</w>", "cat</w>", "<|endoftext|>"]


def test_paper_prefix_cuts_long_captions_with_the_end_token_last(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    score = PaperClipScore(CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip))
    tok = score.tokenizer
    ids = score.token_ids([" ".join(["cat"] * 100)])[0]
    # GigaGAN: start, 3 prefix tokens, the caption's first 72 tokens, end = 77
    assert len(ids) == 77 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:4]) == ["a</w>", "photo</w>", "depicts</w>"]
    assert tok.convert_ids_to_tokens(ids[4:76]) == ["cat</w>"] * 72


def test_paper_and_torchmetrics_clip_differ_by_the_prefix_scale_and_clamp(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    prompts = ["a photo of the digit one", "two", "a handwritten three", "the number four"]
    # 256x256 images: the COCO crop and Lanczos step is the identity, so only the rules below separate the two
    means = []
    noise = [torch.randint(0, 256, (4, 3, 256, 256), generator=torch.Generator().manual_seed(s), dtype=torch.uint8)
             for s in range(2)]
    flat = [torch.full((4, 3, 256, 256), v, dtype=torch.uint8) for v in (200, 255)]
    for images in noise + flat:
        tm = make_clip_score(tiny_clip)
        tm.update(images, prompts)
        unclamped = float(tm.metric.score / tm.metric.n_samples)
        no_prefix = PaperClipScore(model, processor, prefix="").cosines(images, prompts).mean().item()
        paper = PaperClipScore(model, processor).cosines(images, prompts).mean().item()
        assert unclamped == pytest.approx(100 * no_prefix, abs=1e-4)  # x100, nothing else
        assert tm.compute() == pytest.approx(max(unclamped, 0.0), abs=1e-6)  # torchmetrics clamps the mean at 0
        assert abs(paper - no_prefix) > 1e-4  # the prefix changes the text embedding
        means.append(no_prefix)
    # the clamp was exercised both ways: this random CLIP gives noise a negative mean (torchmetrics reports 0) and
    # light flat images a positive one
    assert max(means[:2]) < 0 < min(means[2:])


def test_clip_protocol_paper_through_the_cli_is_recorded(tiny_sd_path, tiny_clip, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\nthe number two\n")
    common = ["--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts, "--num_images", 3,
              "--batch_size", 2, "--num_inference_steps", 1, "--guidance_scale", 1, "--metrics", "clip",
              "--clip_model", tiny_clip]
    paper = run_eval(eval_args(*common, "--clip_protocol", "paper", "--output_dir", tmp_path / "a"))
    p = paper["protocol"]["clip"]
    assert p["protocol"] == "paper" and p["prefix"] == "A photo depicts " and "no x100" in p["score_scale"]
    assert p["image_size"] == 32 and "GigaGAN" in p["follows"]
    # the same images scored by hand with the class: the mean over all images, whatever the batches
    from transformers import CLIPModel, CLIPProcessor

    from stepdistill.evaluation import load_images

    images = load_images(sorted((tmp_path / "a" / "images").glob("*.png")))
    score = PaperClipScore(CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip))
    expected = score.cosines(images, ["a cat", "the number two", "a cat"]).mean().item()
    assert paper["clip_score"] == pytest.approx(expected, abs=1e-6)  # batches of 2 vs one batch of 3: float32 bits
    tm = run_eval(eval_args(*common, "--output_dir", tmp_path / "a"))  # resumes: scores the same images
    assert tm["protocol"]["clip"]["protocol"] == "torchmetrics" and "100" in tm["protocol"]["clip"]["score_scale"]


@pytest.mark.parametrize("case", ["unet", "text_encoder", "pipeline", "not_json"])
def test_clip_model_that_is_not_a_clip_is_one_line(case, tiny_sd_path, tmp_path, monkeypatch):
    import diffusers

    if case == "not_json":
        bad = tmp_path / "weird"
        bad.mkdir()
        (bad / "config.json").write_text("[1, 2]")
    else:
        bad = tiny_sd_path if case == "pipeline" else tiny_sd_path / case
    expected = {"unet": "a Diffusers UNet2DConditionModel, not a CLIP",
                "text_encoder": "a CLIP text encoder alone, not a CLIP with image and text towers",
                "pipeline": "a Diffusers pipeline folder without config.json, not a CLIP",
                "not_json": "config.json is not an object"}[case]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")

    def no_sampling(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the input was checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_sampling)
    with pytest.raises(StepdistillError, match=re.escape(f"--clip_model {bad}: {expected}")) as info:
        run_eval(eval_args("--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts,
                           "--metrics", "clip", "--clip_model", bad, "--output_dir", tmp_path / "o"))
    assert "\n" not in str(info.value) and "laion/CLIP-ViT-g-14" in str(info.value)


# ---------------------------------------------------------------- KID

def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Binkowski et al.'s unbiased MMD^2 with the kernel (x.y / d + 1)^3, written out."""
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2 * kxy.mean())


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("reference"), [f"{i}.png" for i in range(12)])


def test_kid_equals_hand_mmd_and_torchmetrics_and_shares_fid_features(tiny_sd_path, reference_dir, tmp_path):
    from torchmetrics.image.kid import KernelInceptionDistance

    from stepdistill.evaluation import load_images

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    common = ["--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts, "--num_images", 10,
              "--batch_size", 4, "--num_inference_steps", 1, "--guidance_scale", 1, "--fid_extractor", EXTRACTOR,
              "--reference_dir", reference_dir]
    CountingLinear.calls = 0
    fid_only = run_eval(eval_args(*common, "--metrics", "fid", "--output_dir", tmp_path / "o"))
    fid_calls = CountingLinear.calls
    assert fid_calls == 10 + 12  # generated and reference images
    CountingLinear.calls = 0
    both = run_eval(eval_args(*common, "--metrics", "fid", "kid", "--kid_subset_size", 10, "--kid_subsets", 3,
                              "--output_dir", tmp_path / "o"))
    assert CountingLinear.calls == fid_calls  # one feature pass for both metrics
    assert both["fid"] == fid_only["fid"]  # FID is unchanged by KID beside it

    extractor = CountingLinear()
    fake = load_images(sorted((tmp_path / "o" / "images").glob("*.png")))
    real = load_images(sorted(reference_dir.glob("*.png")))
    with torch.no_grad():
        f_fake, f_real = extractor(fake).double().numpy(), extractor(real).double().numpy()
    # subset_size = all generated images: each subset holds all 10 of them and 10 of the 12 real ones
    # torchmetrics on the same features in float64, as the harness keeps them (in float32 it is 4e-6 off)
    kid = KernelInceptionDistance(feature=AsFloat64(CountingLinear()), subsets=3, subset_size=10)
    kid.update(real, real=True)
    kid.update(fake, real=False)
    torch.manual_seed(0)
    tm_mean, tm_std = kid.compute()
    assert both["kid"] == pytest.approx(float(tm_mean), rel=1e-6)
    assert both["kid_std"] == pytest.approx(float(tm_std), rel=1e-5, abs=1e-12)
    torch.manual_seed(0)
    hand = []
    for _ in range(3):
        r, f = torch.randperm(12)[:10].numpy(), torch.randperm(10)[:10].numpy()
        hand.append(unbiased_mmd2(f_real[r], f_fake[f]))
    assert both["kid"] == pytest.approx(float(np.mean(hand)), rel=1e-9)
    assert both["kid_std"] == pytest.approx(float(np.std(hand)), rel=1e-6)
    p = both["protocol"]
    assert p["kid"]["subset_size"] == 10 and p["kid"]["subsets"] == 3 and p["kid"]["seed"] == 0
    assert p["feature_extractor"]["name"] == EXTRACTOR and p["reference"]["num_images"] == 12

    # KID against saved statistics needs the features: ref-stats --keep_features
    stats = tmp_path / "ref.npz"
    run_ref_stats(ref_stats_args("--reference_dir", reference_dir, "--output", stats, "--fid_extractor", EXTRACTOR,
                                 "--keep_features"))
    np.testing.assert_allclose(load_features(stats), f_real, rtol=1e-12)
    from_stats = run_eval(eval_args(*common[:-2], "--reference_stats", stats, "--metrics", "kid",
                                    "--kid_subset_size", 10, "--kid_subsets", 3, "--output_dir", tmp_path / "o"))
    assert from_stats["kid"] == pytest.approx(both["kid"], rel=1e-9)
    assert from_stats["protocol"]["reference"]["kind"] == "stats" and from_stats["protocol"]["kid"]


def test_kid_bad_input_is_one_line_before_sampling(tiny_sd_path, reference_dir, tmp_path, monkeypatch):
    import diffusers

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    no_features = tmp_path / "plain.npz"
    run_ref_stats(ref_stats_args("--reference_dir", reference_dir, "--output", no_features, "--fid_extractor",
                                 EXTRACTOR))

    def no_sampling(*args, **kwargs):
        raise AssertionError("the pipeline was loaded before the input was checked")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_sampling)
    common = ["--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts, "--metrics", "kid",
              "--fid_extractor", EXTRACTOR, "--output_dir", tmp_path / "o"]
    cases = [
        (["--num_images", 8, "--reference_dir", reference_dir], r"--kid_subset_size 1000 exceeds --num_images 8"),
        (["--num_images", 20, "--kid_subset_size", 13, "--reference_dir", reference_dir],
         r"--kid_subset_size 13 exceeds the 12 reference images"),
        (["--num_images", 8, "--kid_subset_size", 4, "--reference_stats", no_features],
         r"plain.npz holds no features.*--keep_features"),
        (["--num_images", 8, "--kid_subset_size", 4, "--reference_dir", reference_dir, "--fid_resize", "clean"],
         r"--fid_resize clean is Inception's resize"),
    ]
    for extra, message in cases:
        with pytest.raises(StepdistillError, match=message) as info:
            run_eval(eval_args(*common, *extra))
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- caption lists and the COCO reference subset

COCO30K = REPO / "assets" / "prompts" / "coco2014-30k-gigagan.txt"


def test_gigagan_coco30k_list_is_read_verbatim(tmp_path):
    # the list DMD2 (main/coco_eval/captions_coco14_test.txt) and SiD-LSG (prompts/captions.txt) ship, byte for byte
    assert hashlib.sha256(COCO30K.read_bytes()).hexdigest() == \
        "edabd2a556026cbf5d36a5fffa35ad43d7ba71b72f6d640b727c1edefb7f1945"
    captions = read_captions(COCO30K)
    assert len(captions) == 30000 and len(set(captions)) == 29436  # duplicates are kept: image i takes line i
    assert captions[0] == "This wire metal rack holds several pairs of shoes and sandals"
    assert captions[3] == "A loft bed with a dresser underneath it."
    assert sum(c != c.strip() for c in captions) == 3488  # trailing spaces kept, as the papers pass them

    listed = tmp_path / "list.txt"
    listed.write_text("# not a comment here\n  two spaces \nthird\n")
    assert read_captions(listed) == ["# not a comment here", "  two spaces ", "third"]
    listed.write_text("one\n\nthree\n")
    with pytest.raises(StepdistillError, match="list.txt: line 2 is blank"):
        read_captions(listed)


def test_ref_stats_selects_the_listed_coco_images(tmp_path):
    val = write_images(tmp_path / "val2014", [f"COCO_val2014_{i:012d}.jpg" for i in (42, 7, 391895, 5, 9)],
                       size=(20, 16))
    listed = tmp_path / "subset.csv"
    listed.write_text('image_id,caption\n391895,"a man, riding"\n42,a cat\n391895,again\n7,a dog\n')
    meta = run_ref_stats(ref_stats_args("--reference_dir", val, "--captions_file", listed, "--output",
                                        tmp_path / "sub.npz", "--fid_extractor", EXTRACTOR, "--preprocess",
                                        "crop_lanczos_256", "--keep_features"))
    assert meta["num_images"] == 3 and meta["selection"]["num_listed"] == 3
    assert meta["selection"]["sha256"] == hashlib.sha256(listed.read_bytes()).hexdigest()

    # the same three files alone in a folder give the same statistics
    alone = tmp_path / "alone"
    alone.mkdir()
    for i in (391895, 42, 7):
        (alone / f"COCO_val2014_{i:012d}.jpg").write_bytes((val / f"COCO_val2014_{i:012d}.jpg").read_bytes())
    run_ref_stats(ref_stats_args("--reference_dir", alone, "--output", tmp_path / "alone.npz", "--fid_extractor",
                                 EXTRACTOR, "--preprocess", "crop_lanczos_256", "--keep_features"))
    a, b = load_stats(tmp_path / "sub.npz"), load_stats(tmp_path / "alone.npz")
    np.testing.assert_allclose(a.mu, b.mu, rtol=1e-12)
    np.testing.assert_allclose(a.sigma, b.sigma, rtol=1e-10, atol=1e-15)
    # in list order: 391895, 42, 7 (the folder sorts them 7, 42, 391895 by name)
    np.testing.assert_array_equal(load_features(tmp_path / "sub.npz"),
                                  load_features(tmp_path / "alone.npz")[[2, 1, 0]])
    assert read_captions(listed) == ["a man, riding", "a cat", "a dog"]  # the eval side of the same list

    missing = tmp_path / "missing.csv"
    missing.write_text("image_id,caption\n42,a cat\n1234,gone\n")
    with pytest.raises(StepdistillError, match=r"1 of the 2 listed images are not in the folder \(first: image_id "
                                               r"1234\)"):
        run_ref_stats(ref_stats_args("--reference_dir", val, "--captions_file", missing, "--output",
                                     tmp_path / "x.npz", "--fid_extractor", EXTRACTOR))
    with pytest.raises(StepdistillError, match="a .txt caption list names no images.*all of val2014"):
        run_ref_stats(ref_stats_args("--reference_dir", val, "--captions_file", COCO30K, "--output",
                                     tmp_path / "x.npz", "--fid_extractor", EXTRACTOR))


# ---------------------------------------------------------------- names and records

def test_preprocess_clean_is_the_old_name_and_old_clean_stats_are_refused(tiny_sd_path, reference_dir, tmp_path):
    from stepdistill.evaluation import save_stats

    args = eval_args("--preprocess", "clean", "--output_dir", tmp_path)
    assert args.preprocess == "crop_lanczos_256"
    old = tmp_path / "old.npz"
    save_stats(old, np.zeros(8), np.eye(8), preprocess="clean",
               feature_extractor={"name": EXTRACTOR, "weights_sha256": None})
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    with pytest.raises(StepdistillError, match="old.npz was made with --preprocess clean, the earlier "
                                               "crop_lanczos_256 .crop offset rounded down.; remake it"):
        run_eval(eval_args("--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts,
                           "--num_images", 2, "--fid_extractor", EXTRACTOR, "--reference_stats", old,
                           "--preprocess", "clean",
                           "--output_dir", tmp_path / "o"))


class Payload:
    """An object a pickle would construct (and could run code for): weights_only=True refuses it."""


def test_inception_weights_are_read_without_unpickling_code(tmp_path):
    from safetensors.torch import save_file

    state = {"Conv2d_1a_3x3.conv.weight": torch.randn(32, 3, 3, 3)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        torch.testing.assert_close(read_inception_weights(tmp_path / name), state)

    torch.save({"x": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(StepdistillError, match=r"--inception_weights \S*evil.pth: cannot read it as a state dict") \
            as info:
        read_inception_weights(tmp_path / "evil.pth")
    assert "\n" not in str(info.value)
    torch.save({"x": 3}, tmp_path / "int.pth")
    with pytest.raises(StepdistillError, match="not a state dict of tensors"):
        read_inception_weights(tmp_path / "int.pth")


def test_kid_and_fid_protocol_records_every_option(tiny_sd_path, reference_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    result = run_eval(eval_args("--pretrained_model_name_or_path", tiny_sd_path, "--prompts_file", prompts,
                                "--num_images", 4, "--batch_size", 4, "--num_inference_steps", 1,
                                "--guidance_scale", 1, "--metrics", "kid", "--kid_subset_size", 4,
                                "--kid_subsets", 2, "--fid_extractor", EXTRACTOR, "--reference_dir", reference_dir,
                                "--preprocess", "clean", "--output_dir", tmp_path / "o"))
    written = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert written["kid"] == result["kid"] and math.isfinite(written["kid"]) and "fid" not in written
    p = written["protocol"]
    assert p["preprocess"] == "crop_lanczos_256" and "Lanczos" in p["resize_rule"]
    assert "GigaGAN" in p["resize_rule"] and p["reference"]["kind"] == "dir"
    assert p["kid"]["subsets"] == 2 and "unbiased MMD" in p["kid"]["rule"]
    assert p["clip"] is None
