"""A line chart as inline SVG: the report stays one self-contained HTML file."""

from __future__ import annotations

from html import escape

COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2")


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, x_label: str, y_label: str,
               width: int = 640, height: int = 300) -> str:
    points = [p for values in series.values() for p in values]
    if not points:
        return f'<p class="empty">{escape(title)}: no data</p>'
    left, right, top, bottom = 60, 20, 30, 40
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg class="chart" role="img" aria-label="{escape(title)}" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
             f'<text x="{width / 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="#444"/>',
             f'<text x="{width / 2}" y="{height - 8}" text-anchor="middle" font-size="12">{escape(x_label)}</text>',
             f'<text x="14" y="{height / 2}" text-anchor="middle" font-size="12" '
             f'transform="rotate(-90 14 {height / 2})">{escape(y_label)}</text>']
    for i in range(5):
        value = y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{left - 6}" y="{sy(value) + 4:.1f}" text-anchor="end" font-size="10">{value:.3g}</text>')
        value = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{sx(value):.1f}" y="{height - bottom + 14}" text-anchor="middle" '
                     f'font-size="10">{value:.4g}</text>')
    for n, (name, values) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values)
        parts.append(f'<polyline class="series" data-name="{escape(name)}" fill="none" stroke="{color}" '
                     f'stroke-width="2" points="{coords}"/>')
        parts.append(f'<text x="{width - right - 4}" y="{top + 14 * (n + 1)}" text-anchor="end" font-size="11" '
                     f'fill="{color}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
