"""Prompt files: one prompt per line; blank lines and lines starting with '#' are skipped."""

from __future__ import annotations

from pathlib import Path

from .errors import StepdistillError


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise StepdistillError(f"{path}: prompt file not found; pass a text file with one prompt per line")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise StepdistillError(f"{path}: prompt file is empty; write one prompt per line")
    return prompts
