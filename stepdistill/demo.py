"""``make demo``: the main job on the tiny-digits world. For now it samples the teacher and writes its grid and
figures to ``runs/demo/``; the distillation methods extend it."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import StepdistillError


def run_demo(output_dir: str | Path, model: str, num_images: int = 1000) -> Path:
    from .toy.evaluate import format_table, quality_table

    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StepdistillError(f"{output_dir}: cannot create the demo output directory ({e.strerror})") from e
    grid = output_dir / "teacher_grid.png"
    result = quality_table(model, num_images=num_images, steps=(25, 8, 4, 2), guidance_scale=3.0,
                           grid_path=str(grid))
    table = format_table(result)
    (output_dir / "metrics.json").write_text(json.dumps(result, indent=2))
    (output_dir / "report.md").write_text(
        "# stepdistill demo: the tiny-digits teacher\n\n"
        f"{num_images} images on the held-out evaluation prompts, DDIM, guidance 3.\n\n{table}\n\n"
        "Rows of the grid: 25, 8, 4 and 2 DDIM steps; columns: digits 0-9.\n\n![teacher](teacher_grid.png)\n")
    print(table)
    print(f"wrote {output_dir}/report.md and {grid}")
    return output_dir
