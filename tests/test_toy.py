import json

import pytest
import torch
from safetensors.torch import load_file

from stepdistill.cli import main
from stepdistill.errors import StepdistillError
from stepdistill.prompts import read_prompts
from stepdistill.toy import data


def test_digit_of_prompt():
    assert data.digit_of_prompt("a handwritten digit seven") == 7
    assert data.digit_of_prompt("the number 3") == 3
    assert data.digit_of_prompt("a cat") is None
    assert data.digit_of_prompt("one or two") is None


def test_prompt_files_match_the_templates():
    from conftest import REPO

    train = read_prompts(REPO / "assets/prompts/tiny-digits-train.txt")
    evaluation = read_prompts(REPO / "assets/prompts/tiny-digits-eval.txt")
    assert train == data.train_prompts() and evaluation == data.eval_prompts()
    assert not set(train) & set(evaluation)  # evaluation templates are held out
    assert "a handwritten digit four" in train and "the number 4" in train
    assert sorted({data.digit_of_prompt(p) for p in evaluation}) == list(range(10))


def test_world_tokenizer_keeps_every_prompt_word_whole(toy_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(toy_path / "tokenizer")
    for word in data.vocabulary():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, tok.convert_ids_to_tokens(ids))  # <bos> word <eos>


def test_stock_pipeline_loads_the_world_and_follows_prompts(toy_path):
    """The world is a standard Diffusers folder and the teacher reads prompts (a quick version of the quality bar,
    which `stepdistill toy quality` measures on 1000 images)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from stepdistill.evaluation import cycle_prompts, generate
    from stepdistill.toy.evaluate import DigitsJudge

    pipe = StableDiffusionPipeline.from_pretrained(toy_path)
    cfg = pipe.scheduler.config
    assert (cfg.beta_schedule, cfg.clip_sample, cfg.set_alpha_to_one, cfg.steps_offset) == \
        ("scaled_linear", False, False, 1)
    assert pipe.unet.config.sample_size * 2 == data.RESOLUTION
    pipe.scheduler = DDIMScheduler.from_config(cfg)
    prompts = cycle_prompts(data.eval_prompts(), 80)
    images = generate(pipe, prompts, num_inference_steps=25, guidance_scale=3.0, progress=False)
    assert images.shape == (80, 3, data.RESOLUTION, data.RESOLUTION) and images.dtype == torch.uint8
    scores = DigitsJudge.from_world(toy_path).score(images, prompts)
    assert scores["prompt_agreement"] >= 0.9, scores


def test_classifier_reads_real_digits(toy_path):
    from stepdistill.toy.classifier import DigitsClassifier

    clf = DigitsClassifier.load(toy_path)
    images, labels = data.load_digits_images()
    with torch.no_grad():
        acc = (clf.logits(data.to_uint8(images)).argmax(1) == labels).float().mean().item()
    assert acc > 0.97


def test_export_data_is_an_imagefolder(tmp_path):
    from PIL import Image

    assert main(["toy", "export-data", str(tmp_path / "digits")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "digits/metadata.jsonl").read_text().splitlines()]
    assert len(rows) == 1797
    first = rows[0]
    assert set(first) >= {"file_name", "text"}
    assert data.digit_of_prompt(first["text"]) == first["label"]
    img = Image.open(tmp_path / "digits" / first["file_name"])
    assert img.size == (data.RESOLUTION, data.RESOLUTION) and img.mode == "RGB"
    # exporting into a non-empty directory is refused instead of mixing two exports
    assert main(["toy", "export-data", str(tmp_path / "digits")]) == 2


def test_build_is_seeded_and_reproducible(tmp_path):
    """Two fast builds with one seed give identical weights (the full build runs the same code, longer)."""
    for name in ("a", "b"):
        assert main(["toy", "build", "--fast", "--output_dir", str(tmp_path / name)]) == 0
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "digits_classifier.safetensors"):
        a, b = load_file(tmp_path / "a" / part), load_file(tmp_path / "b" / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert not (tmp_path / "a.partial").exists()


def test_empty_prompt_file(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n# only a comment\n\n")
    with pytest.raises(StepdistillError, match=r"prompts\.txt: prompt file is empty"):
        read_prompts(f)


def test_cli_names_a_bad_model_path(tmp_path, capsys):
    assert main(["toy", "quality", "--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err and "not a Diffusers pipeline" in err
