"""Server-side SVG charts for the admin (no JavaScript library, no CDN). Pure Python."""

from html import escape


def loss_chart_svg(train_points, dev_points=(), *, width=640, height=220, title=""):
    """A line chart of [step, loss] points: train loss in blue, dev loss as orange dots+line."""
    points = list(train_points) + list(dev_points)
    if not points:
        return ""
    pad_left, pad_right, pad_top, pad_bottom = 48, 12, 16, 28
    max_step = max(step for step, _ in points) or 1
    losses = [loss for _, loss in points]
    low, high = min(losses), max(losses)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    plot_w, plot_h = width - pad_left - pad_right, height - pad_top - pad_bottom

    def xy(step, loss):
        return pad_left + plot_w * step / max_step, pad_top + plot_h * (1 - (loss - low) / (high - low))

    def polyline(series, colour):
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in series))
        return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="loss-chart" viewBox="0 0 {width} {height}" '
        f'width="100%" style="max-width:{width}px" role="img" aria-label="{escape(title)}">',
        f'<rect x="{pad_left}" y="{pad_top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
    ]
    for fraction in (0, 0.5, 1):
        value = low + (high - low) * fraction
        _, y = xy(0, value)
        parts.append(f'<text x="{pad_left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{value:.3g}</text>')
    parts.append(f'<text x="{pad_left}" y="{height - 8}" font-size="10">0</text>')
    parts.append(f'<text x="{width - pad_right}" y="{height - 8}" font-size="10" text-anchor="end">{max_step}</text>')
    if train_points:
        parts.append(polyline(train_points, "#2563eb"))
    if dev_points:
        parts.append(polyline(dev_points, "#ea580c"))
        for step, loss in dev_points:
            x, y = xy(step, loss)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#ea580c"/>')
    parts.append("</svg>")
    return "".join(parts)
