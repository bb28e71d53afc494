"""Tiny random Stable Diffusion pipelines built from configs, offline, for tests and smoke runs.

Each builder saves a complete pipeline folder with ``save_pretrained`` and returns its path, so callers load it with
``from_pretrained`` exactly as users load real models. Built in well under a second each. ``hub_cache_snapshot``
lays any pipeline folder out as a hub cache entry, so tests load it by a hub id, offline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizer import write_clip_tokenizer

WORDS = ("a photo of the an painting red blue green cat dog astronaut riding horse on moon small large "
         "house tree in with digit number").split()


def _tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    write_clip_tokenizer(directory, list(WORDS), model_max_length=77)
    return CLIPTokenizer.from_pretrained(directory)


def _text_encoder(tokenizer, hidden: int, projection: bool = False, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act=act,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae(scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16, scaling_factor=scaling_factor,
    )


def _sd_scheduler_config(prediction_type: str) -> dict:
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def build_tiny_sd(directory: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny SD 1.x pipeline (or SD 2.x-like with ``prediction_type="v_prediction"``) at 16x16 pixels."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(directory / "_tokenizer_src")
    v = prediction_type == "v_prediction"
    text_encoder = _text_encoder(tokenizer, 32, act="gelu" if v else "quick_gelu")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4) if v else 8, use_linear_projection=v, norm_num_groups=8,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
        scheduler=DDIMScheduler(**_sd_scheduler_config(prediction_type)), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(directory / "pipeline", safe_serialization=True)
    return directory / "pipeline"


def build_tiny_sd2_v(directory: str | Path, seed: int = 0) -> Path:
    return build_tiny_sd(directory, prediction_type="v_prediction", seed=seed)


def build_tiny_sdxl(directory: str | Path, seed: int = 0) -> Path:
    """A tiny SDXL pipeline: two text encoders (the second with projection → pooled embeds), ``text_time``
    additional embeddings, Euler scheduler, 16x16 pixels."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    directory = Path(directory)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(directory / "_tokenizer_src")
    text_encoder = _text_encoder(tokenizer, 32, act="gelu")
    text_encoder_2 = _text_encoder(tokenizer, 32, projection=True, act="gelu")
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size, norm_num_groups=8,
    )
    config = {k: v for k, v in _sd_scheduler_config("epsilon").items() if k not in ("clip_sample", "set_alpha_to_one")}
    scheduler = EulerDiscreteScheduler(**config, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(
        vae=_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(directory / "pipeline", safe_serialization=True)
    return directory / "pipeline"


def hub_cache_snapshot(pipeline_dir: str | Path, cache_dir: str | Path, repo_id: str,
                       commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay ``pipeline_dir`` out in ``cache_dir`` as the hub cache holds a downloaded repository:
    ``models--ORG--NAME/snapshots/<commit>/...`` (links to the files, as the cache links to its blobs) and
    ``refs/main`` naming the commit. With ``HF_HUB_CACHE=cache_dir`` and ``HF_HUB_OFFLINE=1`` set before
    huggingface_hub / diffusers are imported, ``repo_id`` then loads offline like a downloaded model. Returns the
    snapshot folder."""
    pipeline_dir = Path(pipeline_dir).resolve()
    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path in pipeline_dir.rglob("*"):
        if path.is_file():
            target = snapshot / path.relative_to(pipeline_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(path)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def build_pipeline_from_configs(directory: str | Path, configs_dir: str | Path, text_encoder: str = "tiny",
                                seed: int = 0, max_shard_size: str = "2GB") -> Path:
    """A pipeline folder whose UNet and VAE are built from real ``config.json`` files (random weights), e.g.
    ``assets/real_configs/sd15`` or ``.../sdxl``: real-size networks, offline. ``text_encoder="real"`` builds the text
    encoders from the configs too; ``"tiny"`` (2 layers) keeps the widths the UNet reads (hidden size, SDXL's pooled
    projection), for measurements where the text encoders' size does not matter. A small tokenizer either way.
    The weights are saved float32 in shards of ``max_shard_size`` (loading holds one shard at a time). A complete
    folder is reused."""
    import json

    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    directory, configs_dir = Path(directory), Path(configs_dir)
    out = directory / "pipeline"
    if (out / "model_index.json").is_file():
        return out

    def read(path):
        return {k: v for k, v in json.loads((configs_dir / path).read_text()).items() if not k.startswith("_")}

    torch.manual_seed(seed)
    tokenizer = _tokenizer(directory / "_tokenizer_src")
    unet = UNet2DConditionModel.from_config(read("unet/config.json"))
    sdxl = unet.config.addition_embed_type == "text_time"
    encoders = []
    for name, projection in (("text_encoder", False), ("text_encoder_2", True))[:2 if sdxl else 1]:
        config = read(f"{name}/config.json")
        if text_encoder == "tiny":
            encoders.append(_text_encoder(tokenizer, config["hidden_size"], projection, config["hidden_act"]))
            continue
        config = {k: v for k, v in config.items() if k not in ("architectures", "model_type")}
        config.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
        encoders.append((CLIPTextModelWithProjection if projection else CLIPTextModel)(CLIPTextConfig(**config)))
    scheduler_config = json.loads((configs_dir / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, scheduler_config["_class_name"]).from_config(scheduler_config)
    parts = dict(vae=AutoencoderKL.from_config(read("vae/config.json")), unet=unet, scheduler=scheduler,
                 tokenizer=tokenizer, text_encoder=encoders[0])
    if sdxl:
        pipe = diffusers.StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=tokenizer,
                                                   force_zeros_for_empty_prompt=True)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    tmp = directory / "pipeline.tmp"
    pipe.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    tmp.rename(out)
    return out


def build_random_inception(path: str | Path, seed: int = 0) -> Path:
    """torch-fidelity's FID Inception (the architecture of pt_inception-2015-12-05) with random weights, saved as a
    safetensors state dict at ``path``: for running the Inception FID/KID path end to end offline, numbers
    meaningless. Needs torch-fidelity (the ``make test-inception`` lane).

    torch-fidelity's constructor always loads weights (a download when given no file); here that load is stubbed out
    for the one construction, then the convolutions get a seeded He-normal init so features keep their scale through
    the 90-odd layers instead of fading to zero."""
    from unittest import mock

    import torch.nn as nn
    from safetensors.torch import save_file
    from torch_fidelity import feature_extractor_inceptionv3 as tf_inception

    path = Path(path)
    cls = tf_inception.FeatureExtractorInceptionV3
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(cls, "load_state_dict", lambda self, *args, **kwargs: None):
        net = cls("inception-v3-compat", ["2048"])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path
