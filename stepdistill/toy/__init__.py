"""The embedded tiny-digits world: a small but genuinely trained Stable Diffusion pipeline for scikit-learn's
bundled digits, its classifier-based metrics, and the commands that build and check it."""

from pathlib import Path

WORLD_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny-digits-sd"
