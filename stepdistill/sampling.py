"""Old import path of the generation helpers, kept for callers not yet moved to ``stepdistill.evaluation`` (where
the one generation path, :class:`stepdistill.evaluation.Sampler`, lives)."""

from .evaluation.images import save_grid
from .evaluation.sampler import cycle_prompts, generate

__all__ = ["cycle_prompts", "generate", "save_grid"]
