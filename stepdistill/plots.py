"""Loss curves as PNG with PIL alone (no plotting dependency): one panel per logged loss."""

from __future__ import annotations

import json
from pathlib import Path


def plot_losses(log_file: str | Path, out_path: str | Path, width: int = 360, height: int = 160) -> Path | None:
    from PIL import Image, ImageDraw

    log_file = Path(log_file)
    if not log_file.is_file():
        return None
    rows = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    keys = [k for k in rows[0] if k.startswith("loss")] if rows else []
    if not keys:
        return None
    canvas = Image.new("RGB", (width, height * len(keys)), "white")
    draw = ImageDraw.Draw(canvas)
    for panel, key in enumerate(keys):
        points = [(r["step"], r[key]) for r in rows if key in r]
        top = panel * height
        steps = [p[0] for p in points]
        values = [p[1] for p in points]
        # smooth with a running mean so the trend is visible over per-step noise
        win = max(1, len(values) // 50)
        smooth = [sum(values[max(0, i - win + 1):i + 1]) / len(values[max(0, i - win + 1):i + 1])
                  for i in range(len(values))]
        lo, hi = min(smooth), max(smooth)
        span = (hi - lo) or 1.0
        x0, x1, y0, y1 = 40, width - 10, top + 20, top + height - 20
        smin, smax = min(steps), max(steps)
        xy = [(x0 + (s - smin) / max(1, smax - smin) * (x1 - x0), y1 - (v - lo) / span * (y1 - y0))
              for s, v in zip(steps, smooth)]
        draw.rectangle([x0, y0, x1, y1], outline="gray")
        if len(xy) > 1:
            draw.line(xy, fill="navy", width=2)
        draw.text((x0, top + 4), f"{key}  (first {smooth[0]:.4g}, last {smooth[-1]:.4g})", fill="black")
        draw.text((2, y0), f"{hi:.3g}", fill="gray")
        draw.text((2, y1 - 10), f"{lo:.3g}", fill="gray")
    canvas.save(out_path)
    return Path(out_path)
