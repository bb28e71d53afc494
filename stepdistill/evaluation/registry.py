"""The metric and FID-extractor registries the harness reads, so a world can plug in its own measures without the
harness knowing about it.

A metric is a factory ``factory(args, base_model, device) -> Metric``: it checks its inputs and loads what it needs
before any image is generated, is then fed every generated batch, and finally gives its scores and what the
protocol records about it. An FID extractor is a factory ``factory(args, base_model) -> Extractor`` selected by
``--fid_extractor NAME``.

The harness registers its own (``fid`` with the ``inception`` extractor, ``clip``) when the package is imported;
worlds register theirs from the modules in :data:`PLUGINS` (the tiny-digits world: the ``digits`` metric and
extractor), imported the first time the registry is read. Registration order is the order of the scores and
protocol entries in ``metrics.json``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

PLUGINS = ["stepdistill.toy.digits_metric"]
"""Modules that register metrics or extractors when imported (append a world's own module to plug it in)."""


class Metric(Protocol):
    """A metric may also define ``features(images, prompts) -> object`` (picklable, small: e.g. the batch's
    extractor features) and ``add_features(features, prompts)``, with ``update`` = both in turn; then a sharded
    evaluation computes each batch's features on the process that owns it and adds them all, in batch order, on the
    main process. A metric with ``update`` only is fed every batch on the main process instead."""

    def update(self, images: torch.Tensor, prompts: list[str]) -> None:
        """A batch of generated uint8 images ``(N, 3, H, W)`` and their prompts, in image order."""

    def compute(self) -> dict[str, float]:
        """The scores, under the spec's ``result_keys``."""

    def protocol(self) -> dict[str, Any]:
        """What ``metrics.json`` records about the metric, under the spec's ``protocol_keys``."""


@dataclass(frozen=True)
class MetricSpec:
    name: str
    factory: Callable[[Any, str, str], Metric]
    result_keys: tuple[str, ...]
    protocol_keys: tuple[str, ...] = ()
    min_images: int = 1
    default_prompts: Callable[[], tuple[list[str], str]] | None = None  # (prompts, where they come from)


@dataclass(frozen=True)
class ExtractorSpec:
    name: str
    factory: Callable[[Any, str | None], Any]
    add_arguments: Callable[[Any], None] | None = None  # adds the extractor's own command-line options


METRICS: dict[str, MetricSpec] = {}
EXTRACTORS: dict[str, ExtractorSpec] = {}
_imported: set[str] = set()


def register_metric(name: str, factory: Callable[[Any, str, str], Metric], *, result_keys: tuple[str, ...],
                    protocol_keys: tuple[str, ...] = (), min_images: int = 1,
                    default_prompts: Callable[[], tuple[list[str], str]] | None = None) -> MetricSpec:
    """Make ``--metrics NAME`` available. ``min_images``: the fewest images it can score; ``default_prompts``: the
    prompts a run uses when it is given none (a world's own evaluation prompts)."""
    METRICS[name] = MetricSpec(name, factory, tuple(result_keys), tuple(protocol_keys), min_images, default_prompts)
    return METRICS[name]


def register_extractor(name: str, factory: Callable[[Any, str | None], Any], *,
                       add_arguments: Callable[[Any], None] | None = None) -> ExtractorSpec:
    """Make ``--fid_extractor NAME`` available; ``factory(args, base_model)`` returns an ``Extractor``."""
    EXTRACTORS[name] = ExtractorSpec(name, factory, add_arguments)
    return EXTRACTORS[name]


def run_state(args) -> dict:
    """A dict that lives as long as one run (``run_eval`` starts a fresh one), through which the metrics of that run
    share expensive state (FID and KID: one extractor, each batch's features computed once)."""
    state = getattr(args, "_run_state", None)
    if state is None:
        state = {}
        setattr(args, "_run_state", state)
    return state


def load_plugins() -> None:
    for module in PLUGINS:
        if module not in _imported:
            _imported.add(module)
            importlib.import_module(module)


def metrics() -> dict[str, MetricSpec]:
    load_plugins()
    return METRICS


def extractors() -> dict[str, ExtractorSpec]:
    load_plugins()
    return EXTRACTORS
