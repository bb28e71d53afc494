"""The Inception lane (``make test-inception``): Inception FID/KID end to end with random weights from a local file,
and our resizes, crop and CLIP preprocessing against torchvision, clean-fid and open_clip themselves.

Skipped where torchvision or torch-fidelity does not import (this project's default CPU torch build)."""

import argparse
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.inception

try:  # a torchvision built for another torch fails with errors other than ImportError
    import torch_fidelity  # noqa: F401
    import torchvision  # noqa: F401
except Exception as e:  # noqa: BLE001
    pytest.skip(f"the Inception lane needs torchvision and torch-fidelity ({type(e).__name__}: {e}); "
                "run `make test-inception`", allow_module_level=True)

from stepdistill import cli  # noqa: E402
from stepdistill.evaluation import (  # noqa: E402
    PaperClipScore,
    add_ref_stats_args,
    center_crop_lanczos,
    clean_fid_resize,
    inception_pool_features,
    make_inception,
    run_ref_stats,
)
from stepdistill.evaluation.extractors import sha256_file  # noqa: E402
from stepdistill.testing import build_random_inception  # noqa: E402


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    return build_random_inception(tmp_path_factory.mktemp("inception") / "inception_random.safetensors")


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def images(seed=0, n=4, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def test_the_three_resizes_give_different_inception_features(inception_weights):
    x = images()
    features = {}
    for resize in ("torchmetrics", "legacy_tf", "clean"):
        with torch.no_grad():
            features[resize] = make_inception(inception_weights, resize)(x).double()
        assert features[resize].shape == (4, 2048) and torch.isfinite(features[resize]).all()
        assert features[resize].abs().mean() > 1e-3  # the random network does not fade to zero
    for a, b in [("torchmetrics", "legacy_tf"), ("torchmetrics", "clean"), ("legacy_tf", "clean")]:
        assert (features[a] - features[b]).abs().max() > 1e-4 * features[a].abs().max(), (a, b)
    # clean = clean-fid's resize by hand, then the network without its own resize
    net = make_inception(inception_weights, "legacy_tf")
    resized = torch.from_numpy(np.stack([clean_fid_resize(im) for im in x.permute(0, 2, 3, 1).numpy()]))
    with torch.no_grad():
        by_hand = inception_pool_features(net, resized.permute(0, 3, 1, 2))
    torch.testing.assert_close(features["clean"], by_hand.double(), rtol=0, atol=0)


def test_pool_features_without_resize_are_the_nets_own_at_299(inception_weights):
    # at 299x299 both of the net's own resizes leave the image as it is, so its forward is the layers alone: this
    # checks the layer list inception_pool_features runs
    x = images(seed=1, n=2, size=299)
    for resize in ("torchmetrics", "legacy_tf"):
        net = make_inception(inception_weights, resize)
        with torch.no_grad():
            torch.testing.assert_close(inception_pool_features(net, x.float()), net(x), rtol=1e-5, atol=1e-5)


def test_clean_resize_is_clean_fids():
    from cleanfid.resize import build_resizer

    rng = np.random.default_rng(2)
    resizer = build_resizer("clean")
    for h, w in [(7, 5), (256, 256), (413, 388)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        np.testing.assert_array_equal(clean_fid_resize(image), resizer(image))


def test_crop_lanczos_is_gigagans_center_crop_long_edge():
    from torchvision.transforms import functional as TF

    rng = np.random.default_rng(3)
    for w, h in [(640, 425), (425, 640), (500, 375), (640, 480), (7, 4), (256, 256)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        # GigaGAN evaluation/data_util.py CenterCropLongEdge + PIL Lanczos to 256 (DMD2's resize_and_center_crop)
        theirs = TF.center_crop(im, min(im.size)).resize((256, 256), Image.LANCZOS)
        np.testing.assert_array_equal(np.asarray(center_crop_lanczos(im)), np.asarray(theirs))


def tiny_clip_224():
    """A CLIPModel with ViT-g/14's input size and mean/std (weights random, tiny), and a processor."""
    from transformers import CLIPConfig, CLIPModel

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406,
                                         eos_token_id=49407, pad_token_id=0, **common),
                        vision_config=dict(image_size=224, patch_size=56, **common), projection_dim=16)
    return CLIPModel(config).eval()


def open_clip_tokenizer_files(directory):
    """open_clip's BPE (the vocabulary of OpenAI's clip.tokenize) written as a transformers CLIPTokenizer."""
    from open_clip.tokenizer import SimpleTokenizer

    simple = SimpleTokenizer()
    # open_clip names its special tokens <start_of_text>/<end_of_text>; OpenAI's and the hub's CLIP tokenizers
    # <|startoftext|>/<|endoftext|> (the same ids, 49406/49407)
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): i for token, i in simple.encoder.items()}
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    (directory / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return directory / "vocab.json", directory / "merges.txt"


class _Processor:
    def __init__(self, tokenizer, mean, std):
        self.tokenizer = tokenizer
        self.image_processor = argparse.Namespace(image_mean=list(mean), image_std=list(std))


def test_paper_clip_pixels_are_open_clips_eval_transform():
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, image_transform

    model = tiny_clip_224()
    score = PaperClipScore(model, _Processor(None, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD), prefix="")
    # what open_clip.create_model_and_transforms("ViT-g-14", pretrained="laion2b_s12b_b42k") returns for eval
    transform = image_transform(224, is_train=False, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD)
    x = images(seed=4, n=3, size=300)
    ours = score.pixel_values(x)
    theirs = torch.stack([transform(center_crop_lanczos(Image.fromarray(im.permute(1, 2, 0).numpy())))
                          for im in x])
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def gigagan_tokens(captions, prefix="A photo depicts "):
    """GigaGAN's token splice (evaluation/evaluation.py compute_clip_score), described: tokenize with truncation to
    77, put the prefix's 3 tokens after the start token, keep 77, and make the last place the end token when it holds
    a token. open_clip.tokenize is OpenAI's clip.tokenize (same BPE, 77 places, zero padding)."""
    import open_clip

    tokens = open_clip.tokenize(captions)
    prefix_tokens = open_clip.tokenize([prefix])[:, 1:4].expand(len(captions), -1)
    spliced = torch.cat([tokens[:, :1], prefix_tokens, tokens[:, 1:]], dim=1)[:, :77].clone()
    spliced[:, 76][spliced[:, 76] > 0] = 49407
    return spliced


@pytest.mark.parametrize("fast", [False, True])
def test_paper_clip_tokens_are_gigagans(fast, tmp_path):
    from conftest import REPO
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    vocab, merges = open_clip_tokenizer_files(tmp_path)
    # pad with "!" (id 0, the id clip.tokenize pads with): the hard case, where "!" in a caption (3 of the 30k)
    # must still be the BPE token "!</w>"
    tokenizer = (CLIPTokenizerFast if fast else CLIPTokenizer)(str(vocab), str(merges), pad_token="!")
    score = PaperClipScore(tiny_clip_224(), _Processor(tokenizer, [0.5] * 3, [0.5] * 3))
    captions = (REPO / "assets" / "prompts" / "coco2014-30k-gigagan.txt").read_text().splitlines()  # all 30k
    captions += [" ".join(["A very long caption, with commas."] * 20), "UPPER  case\tand  spaces "]
    expected = gigagan_tokens(captions)
    ours = score.token_ids(captions)
    assert max(len(i) for i in ours) == 77
    padded = torch.tensor([i + [0] * (77 - len(i)) for i in ours])
    mismatched = [(c, a.tolist(), b.tolist()) for c, a, b in zip(captions, padded, expected) if not torch.equal(a, b)]
    assert not mismatched, mismatched[:3]


def test_inception_fid_and_kid_end_to_end(tiny_sd_path, inception_weights, reference_dir, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\na blue dog\n")
    results = {}
    for resize in ("torchmetrics", "legacy_tf", "clean"):
        out = tmp_path / "run"  # the images are generated once and resumed by the other two
        code = cli.main(["eval", "--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_file",
                         str(prompts), "--num_images", "6", "--batch_size", "3", "--num_inference_steps", "2",
                         "--guidance_scale", "3", "--metrics", "fid", "kid", "--fid_extractor", "inception",
                         "--inception_weights", str(inception_weights), "--fid_resize", resize, "--reference_dir",
                         str(reference_dir), "--preprocess", "crop_lanczos_256", "--kid_subset_size", "5",
                         "--kid_subsets", "10", "--output_dir", str(out), "--no_progress"])
        assert code == 0
        result = json.loads((out / "metrics.json").read_text())
        assert math.isfinite(result["fid"]) and result["fid"] > 0 and math.isfinite(result["kid"])
        fe = result["protocol"]["feature_extractor"]
        assert fe["fid_resize"] == resize and fe["num_features"] == 2048
        assert fe["weights_sha256"] == sha256_file(inception_weights)
        assert result["protocol"]["kid"]["subset_size"] == 5
        results[resize] = result
    assert len({r["fid"] for r in results.values()}) == 3  # each resize gives its own number
    with capsys.disabled():  # the figures, for the record (random weights: only their differences mean anything)
        print("\n" + json.dumps({k: {"fid": v["fid"], "kid": v["kid"], "kid_std": v["kid_std"]}
                                 for k, v in results.items()}))

    # the same reference saved once (with its features, for KID) gives the same numbers
    stats = tmp_path / "ref_clean.npz"
    run_ref_stats(add_ref_stats_args(argparse.ArgumentParser()).parse_args([
        "--reference_dir", str(reference_dir), "--output", str(stats), "--fid_extractor", "inception",
        "--inception_weights", str(inception_weights), "--fid_resize", "clean", "--preprocess", "crop_lanczos_256",
        "--keep_features", "--no_progress"]))
    code = cli.main(["eval", "--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_file", str(prompts),
                     "--num_images", "6", "--batch_size", "3", "--num_inference_steps", "2", "--guidance_scale", "3",
                     "--metrics", "fid", "kid", "--fid_extractor", "inception", "--inception_weights",
                     str(inception_weights), "--fid_resize", "clean", "--reference_stats", str(stats),
                     "--preprocess", "crop_lanczos_256", "--kid_subset_size", "5", "--kid_subsets", "10",
                     "--output_dir", str(tmp_path / "run"), "--no_progress"])
    assert code == 0
    again = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert again["fid"] == pytest.approx(results["clean"]["fid"], rel=1e-9)
    assert again["kid"] == pytest.approx(results["clean"]["kid"], rel=1e-9)
    # stats made with another resize are refused in one line
    code = cli.main(["eval", "--pretrained_model_name_or_path", str(tiny_sd_path), "--prompts_file", str(prompts),
                     "--num_images", "6", "--metrics", "fid", "--inception_weights", str(inception_weights),
                     "--reference_stats", str(stats), "--preprocess", "crop_lanczos_256",
                     "--output_dir", str(tmp_path / "other")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "made with --fid_resize clean but this run uses --fid_resize torchmetrics" in err
