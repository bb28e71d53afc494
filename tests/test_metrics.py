import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import scipy.linalg  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from stepdistill.evaluation import (  # noqa: E402
    build_tiny_clip,
    extract_features,
    fid_against_stats,
    frechet_distance,
    load_stats,
    make_clip_score,
    make_fid,
    save_stats,
    stats_from_features,
    stats_from_fid,
)


class RandomProjection(nn.Module):
    """A fixed random linear map of flattened uint8 pixels: a deterministic stand-in for Inception."""

    def __init__(self, in_features: int = 3 * 8 * 8, out_features: int = 8):
        super().__init__()
        self.num_features = out_features
        self.proj = nn.Linear(in_features, out_features)
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            self.proj.weight.copy_(torch.randn(out_features, in_features, generator=g) / in_features)
            self.proj.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.flatten(1).float())


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 200, (300, 3, 8, 8), generator=g, dtype=torch.uint8)
    fake = torch.randint(40, 256, (250, 3, 8, 8), generator=g, dtype=torch.uint8)
    return real, fake


def test_fid_of_a_set_with_itself_is_zero(images):
    real, _ = images
    extractor = RandomProjection()
    mu, sigma = stats_from_features(extract_features(extractor, real))
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6

    fid = make_fid(extractor)
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(fid.compute().item()) < 1e-6

    # without a num_features attribute the size comes from a dummy image of input_img_size
    del extractor.num_features
    fid = make_fid(extractor, input_img_size=(3, 8, 8))
    fid.update(real, real=True)
    fid.update(real, real=False)
    assert abs(fid.compute().item()) < 1e-6


def test_torchmetrics_fid_is_float64_and_matches_scipy(images):
    real, fake = images
    extractor = RandomProjection()
    fid = make_fid(extractor)
    for batch in real.split(128):
        fid.update(batch, real=True)
    for batch in fake.split(100):
        fid.update(batch, real=False)
    value = fid.compute()
    assert value.dtype == torch.float64

    with torch.no_grad():
        f_real = extractor(real).double().numpy()
        f_fake = extractor(fake).double().numpy()
    expected = scipy_fid(f_real, f_fake)
    assert expected > 1.0  # the two sets really differ, so the comparison means something
    assert value.item() == pytest.approx(expected, rel=1e-6)

    # the metric's accumulated statistics are the plain float64 mean and covariance
    mu, sigma = stats_from_fid(fid, real=True)
    np.testing.assert_allclose(mu, f_real.mean(0), rtol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(f_real, rowvar=False), rtol=1e-7, atol=1e-9)


def test_frechet_distance_matches_scipy():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(400, 16))
    f2 = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    mu1, s1 = stats_from_features(f1)
    mu2, s2 = stats_from_features(torch.from_numpy(f2).float())  # float32 input is promoted to float64
    assert mu2.dtype == np.float64 and s2.dtype == np.float64
    value = frechet_distance(mu1, s1, mu2, s2)
    expected = scipy_fid(f1, torch.from_numpy(f2).float().double().numpy())
    assert value == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(value, rel=1e-9)  # symmetric


def test_stats_round_trip_and_fid_against_saved_stats(images, tmp_path):
    real, fake = images
    extractor = RandomProjection()
    mu, sigma = stats_from_features(extract_features(extractor, real, batch_size=64))
    path = save_stats(tmp_path / "ref.npz", mu, sigma, extractor="random-projection", n=len(real))
    stats = load_stats(path)
    np.testing.assert_array_equal(stats.mu, mu)
    np.testing.assert_array_equal(stats.sigma, sigma)
    assert stats.mu.dtype == np.float64
    assert stats.meta == {"extractor": "random-projection", "n": len(real)}

    fid = make_fid(extractor)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    # a generator of batches works as well as one tensor
    from_file = fid_against_stats(fid, (b for b in fake.split(100)), stats.mu, stats.sigma)
    assert from_file == pytest.approx(fid.compute().item(), rel=1e-6)


def test_load_stats_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "ref.npz"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_stats(missing)
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, mean=np.zeros(3))
    with pytest.raises(ValueError, match="wrong.npz.*mu, sigma"):
        load_stats(wrong)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(ValueError, match="garbage.npz"):
        load_stats(garbage)


def test_fid_with_digits_classifier_returns_float64():
    from stepdistill.toy.classifier import DigitsClassifier

    torch.manual_seed(0)
    classifier = DigitsClassifier().eval()  # casts its input to float32: must not be converted to float64
    g = torch.Generator().manual_seed(2)
    real = torch.randint(0, 256, (80, 3, 16, 16), generator=g, dtype=torch.uint8)
    fake = torch.randint(0, 128, (80, 3, 16, 16), generator=g, dtype=torch.uint8)
    fid = make_fid(classifier)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    value = fid.compute()
    assert value.dtype == torch.float64 and math.isfinite(value.item())
    mu, sigma = stats_from_features(extract_features(classifier, real))
    assert fid_against_stats(classifier, fake, mu, sigma) == pytest.approx(value.item(), rel=1e-6)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def test_tiny_clip_loads_back_offline(tiny_clip):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    assert model.config.vision_config.image_size == 32
    ids = processor(text=["a photo of the digit seven"], return_tensors="pt")["input_ids"][0].tolist()
    # every known word is one token between the start and end tokens
    assert len(ids) == 2 + 6
    assert ids[-1] == model.config.text_config.eos_token_id


def test_clip_score_end_to_end(tiny_clip):
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (4, 3, 16, 16), generator=g, dtype=torch.uint8)
    prompts = ["a photo of the digit one", "two", "a handwritten three", "the number four"]

    metric = make_clip_score(tiny_clip)
    metric.update(images[:2], prompts[:2])
    metric.update(images[2:], prompts[2:])
    score = metric.compute()
    assert isinstance(score, float) and math.isfinite(score) and 0.0 <= score <= 100.0

    again = make_clip_score(tiny_clip)
    again.update(images, prompts)
    assert again.compute() == pytest.approx(score, abs=1e-4)
    metric.reset()
    metric.update(images, prompts)
    assert metric.compute() == again.compute()

    # the same formula computed directly with transformers: max(100 * mean cosine, 0)
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip), CLIPProcessor.from_pretrained(tiny_clip)
    with torch.no_grad():
        pixels = processor(images=list(images), return_tensors="pt")["pixel_values"]
        text = processor(text=prompts, return_tensors="pt", padding=True)
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(**text)
        img = img if isinstance(img, torch.Tensor) else img.pooler_output
        txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt, dim=-1)
    assert score == pytest.approx(max(100 * cos.mean().item(), 0.0), abs=1e-3)
