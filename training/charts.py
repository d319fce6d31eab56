"""Server-side SVG charts for the admin (no JavaScript library, no CDN). Pure Python."""

from html import escape


def _frame(kind, title, width, height, pads, low, high, y_label, x_first, x_last=None):
    """The opening <svg>, the plot box, three y-axis labels and the first (and last) x label.

    Returns (parts, plot width, plot height, y of a value); the caller adds its lines and "</svg>".
    """
    pad_left, pad_right, pad_top, pad_bottom = pads
    plot_w, plot_h = width - pad_left - pad_right, height - pad_top - pad_bottom

    def y_of(value):
        return pad_top + plot_h * (1 - (value - low) / (high - low))

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="{kind}" viewBox="0 0 {width} {height}" '
        f'width="100%" style="max-width:{width}px" role="img" aria-label="{escape(title)}">',
        f'<rect x="{pad_left}" y="{pad_top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#ccc"/>',
    ]
    for fraction in (0, 0.5, 1):
        value = low + (high - low) * fraction
        parts.append(f'<text x="{pad_left - 4}" y="{y_of(value) + 4:.1f}" font-size="10" text-anchor="end">{y_label(value)}</text>')
    parts.append(f'<text x="{pad_left}" y="{height - 8}" font-size="10">{escape(str(x_first))}</text>')
    if x_last is not None:
        parts.append(f'<text x="{width - pad_right}" y="{height - 8}" font-size="10" text-anchor="end">{escape(str(x_last))}</text>')
    return parts, plot_w, plot_h, y_of


def loss_chart_svg(train_points, dev_points=(), *, width=640, height=220, title=""):
    """A line chart of [step, loss] points: train loss in blue, dev loss as orange dots+line."""
    points = list(train_points) + list(dev_points)
    if not points:
        return ""
    pad_left = 48
    max_step = max(step for step, _ in points) or 1
    losses = [loss for _, loss in points]
    low, high = min(losses), max(losses)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    parts, plot_w, _plot_h, y_of = _frame(
        "loss-chart", title, width, height, (pad_left, 12, 16, 28), low, high, lambda value: f"{value:.3g}", 0, max_step
    )

    def xy(step, loss):
        return pad_left + plot_w * step / max_step, y_of(loss)

    def polyline(series, colour):
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in series))
        return f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>'

    if train_points:
        parts.append(polyline(train_points, "#2563eb"))
    if dev_points:
        parts.append(polyline(dev_points, "#ea580c"))
        for step, loss in dev_points:
            x, y = xy(step, loss)
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="#ea580c"/>')
    parts.append("</svg>")
    return "".join(parts)


PALETTE = ("#2563eb", "#ea580c", "#16a34a", "#9333ea", "#dc2626", "#0891b2", "#ca8a04", "#4b5563")


def series_chart_svg(labels, series, *, width=640, height=220, title="", percent=False):
    """Lines over categorical x labels (e.g. days): series is {name: [value or None per label]}.

    A None leaves a gap. Each series gets a colour of PALETTE and a legend entry; `percent` shows
    values in [0, 1] as percentages on the axis.
    """
    values = [v for points in series.values() for v in points if v is not None]
    if not labels or not values:
        return ""
    pad_left = 48
    low, high = (0.0, 1.0) if percent else (0.0, max(values) or 1.0)
    parts, plot_w, _plot_h, y_of = _frame(
        "series-chart", title, width, height, (pad_left, 12, 16 + 14 * ((len(series) + 3) // 4), 28), low, high,
        (lambda value: f"{value:.0%}") if percent else (lambda value: f"{value:.4g}"),
        labels[0], labels[-1] if len(labels) > 1 else None,
    )
    step = plot_w / max(1, len(labels) - 1)

    def xy(index, value):
        return pad_left + step * index, y_of(value)

    for number, (name, points) in enumerate(series.items()):
        colour = PALETTE[number % len(PALETTE)]
        x_legend, y_legend = pad_left + (number % 4) * (plot_w / 4), 12 + 14 * (number // 4)
        parts.append(f'<rect x="{x_legend:.1f}" y="{y_legend - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(f'<text x="{x_legend + 14:.1f}" y="{y_legend + 1}" font-size="10">{escape(str(name))}</text>')
        run = []  # consecutive points without a gap
        for index, value in enumerate(list(points) + [None]):
            if value is not None:
                run.append(xy(index, value))
                continue
            if len(run) > 1:
                coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
                parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
            for x, y in run:
                parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{colour}"/>')
            run = []
    parts.append("</svg>")
    return "".join(parts)
