"""The evaluation harness: generate images from a base pipeline or any stepdistill output, score them with the
registered metrics and record the protocol that makes the numbers comparable.

- ``captions``: prompt files, COCO-style captions, a metric's default prompts
- ``images``: image files, the ``crop_lanczos_256`` preprocessing, clean-fid's resize, grids
- ``fid``, ``clip``: FID statistics and the CLIP score (torchmetrics' or the papers'); ``extractors``: FID feature
  extractors (Inception with its three resizes to 299) and the ``fid`` and ``kid`` metrics
- ``registry``: metrics and extractors by name; worlds plug theirs in (``stepdistill.toy.digits_metric``)
- ``sampler``: the one generation path (evaluation, validation grids, the tiny-digits scorer)
- ``pipeline``, ``protocol``, ``run``: ``run_eval`` (``stepdistill eval``); ``ref_stats``: ``run_ref_stats``
- ``shard``: a multi-process run's share of the batches and the collectives that join the shares
- ``bench``: what the sampler costs beyond its UNet evaluations; ``cli``: the command-line arguments
"""

from .bench import bench_outputs, bench_sampling, format_bench_table, format_outputs_table
from .captions import caption_image_ids, prompt_source, read_captions, select_images_by_id
from .cli import add_eval_args, add_ref_stats_args, register
from .clip import (
    CLIP_PROTOCOLS,
    CLIP_SCALE,
    PAPER_PREFIX,
    ClipMetric,
    ClipScore,
    PaperClipScore,
    build_tiny_clip,
    check_clip_model,
    make_clip_score,
)
from .extractors import (
    FID_RESIZES,
    CleanResizeInception,
    Extractor,
    FeatureSource,
    FidMetric,
    KidMetric,
    build_extractor,
    inception_extractor,
    inception_pool_features,
    make_inception,
)
from .fid import (
    FeatureStats,
    extract_features,
    fid_against_stats,
    frechet_distance,
    load_features,
    load_stats,
    make_fid,
    save_stats,
    stats_from_features,
    stats_from_fid,
)
from .images import (
    CLEAN_SIZE,
    CROP_LANCZOS,
    IMAGES_DIR,
    PREPROCESS_ALIASES,
    RESIZE_RULES,
    canonical_preprocess,
    center_crop_lanczos,
    check_reference_dir,
    clean_fid_resize,
    clean_resize,
    image_path,
    list_images,
    load_images,
    preprocess_images,
    save_grid,
)
from .pipeline import SamplerSettings
from .protocol import GENERATION_NAME, METRICS_NAME, SEEDING
from .ref_stats import run_ref_stats
from .registry import EXTRACTORS, METRICS, PLUGINS, Metric, MetricSpec, register_extractor, register_metric
from .run import run_eval
from .sampler import ForwardMeter, Sampler, cycle_prompts, generate

# the harness's own, registered first so that their entries lead metrics.json; worlds add theirs through PLUGINS
register_extractor("inception", inception_extractor)
register_metric("fid", FidMetric, result_keys=("fid",),
                protocol_keys=("reference", "preprocess", "resize_rule", "feature_extractor"), min_images=2)
register_metric("clip", ClipMetric, result_keys=("clip_score",), protocol_keys=("clip",))
register_metric("kid", KidMetric, result_keys=("kid", "kid_std"),
                protocol_keys=("reference", "preprocess", "resize_rule", "feature_extractor", "kid"), min_images=2)
