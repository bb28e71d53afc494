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


def plot_series(series: dict[str, list[tuple[float, float]]], out_path: str | Path, title: str, xlabel: str,
                ylabel: str, width: int = 420, height: int = 260, log_x: bool = False, log_y: bool = False,
                label_points: bool = True) -> Path:
    """Line chart of a few named series of (x, y) points, with the values printed at the points (PIL only).
    ``log_x`` / ``log_y``: logarithmic axes (values > 0); x ticks at the data's x values."""
    import math

    from PIL import Image, ImageDraw

    fx = math.log if log_x else (lambda v: v)
    fy = math.log if log_y else (lambda v: v)
    gx = math.exp if log_x else (lambda v: v)
    gy = math.exp if log_y else (lambda v: v)
    series = {name: [(fx(x), fy(y)) for x, y in pts] for name, pts in series.items()}

    colors = ["navy", "darkred", "darkgreen", "darkorange", "purple", "teal", "saddlebrown", "deeppink", "olive",
              "black"]
    points = [p for s in series.values() for p in s]
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    xlo, xhi, ylo, yhi = min(xs), max(xs), min(ys), max(ys)
    pad = 0.08 * ((yhi - ylo) or 1.0)
    ylo, yhi = ylo - pad, yhi + pad
    x0, x1, y0, y1 = 50, width - 20, 30, height - 60
    legend_rows = (len(series) + 1) // 2  # two per row below the axis; the canvas grows past two rows
    canvas = Image.new("RGB", (width, height + 12 * max(0, legend_rows - 2)), "white")
    draw = ImageDraw.Draw(canvas)

    def at(x, y):
        return (x0 + (x - xlo) / ((xhi - xlo) or 1.0) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0))

    draw.rectangle([x0, y0, x1, y1], outline="gray")
    draw.text((x0, 8), title, fill="black")
    draw.text((x0, y1 + 22), xlabel, fill="black")
    draw.text((2, y0 - 14), ylabel, fill="black")
    for frac in ((0.0, 0.25, 0.5, 0.75, 1.0) if log_y else (0.0, 1.0)):
        yv = ylo + frac * (yhi - ylo)
        draw.text((2, at(xlo, yv)[1] - 5), f"{gy(yv):.3g}" if log_y else f"{yv:.2f}", fill="gray")
    for x in sorted(set(xs)):
        draw.text((at(x, ylo)[0] - 3, y1 + 4), f"{gx(x):.3g}", fill="gray")
    for i, (name, pts) in enumerate(series.items()):
        color = colors[i % len(colors)]
        xy = [at(x, y) for x, y in sorted(pts)]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for (x, y), (px, py) in zip(sorted(pts), xy):
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
            if label_points:
                draw.text((px + 4, py - 12), f"{gy(y):.2f}", fill=color)
        draw.text((x0 + 4 + 200 * (i % 2), y1 + 36 + 12 * (i // 2)), f"-- {name}", fill=color)
    canvas.save(out_path)
    return Path(out_path)
