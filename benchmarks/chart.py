"""chart.png: one stacked bar per variant (the comparison), stacked by segment (the breakdown).

matplotlib where importable; otherwise the same bars drawn with PIL, which is a dependency anyway.
"""
from __future__ import annotations

from pathlib import Path

from .bench import BenchResult

_STAGE_COLOURS = ["#1f4e79", "#2e75b6", "#5b9bd5", "#9dc3e6", "#bdd7ee"]
_RELAY_COLOURS = ["#c55a11", "#ed7d31", "#f4b183"]
_KIND_COLOURS = {"text": "#7f7f7f", "decode": "#70ad47"}


def _label(name: str) -> str:
    return name.split(" (")[0]  # "stage 1 (512x512, 40 steps)" -> "stage 1"


def _colour(kind: str, label: str) -> str:
    if kind == "stage":
        k = int(label.split()[-1]) - 1
        return _STAGE_COLOURS[k % len(_STAGE_COLOURS)]
    if kind == "relay":  # "relay 1->2"
        k = int(label.split()[-1].split("->")[0]) - 1
        return _RELAY_COLOURS[k % len(_RELAY_COLOURS)]
    return _KIND_COLOURS.get(kind, "#a5a5a5")


def bars(result: BenchResult) -> tuple[str, list[tuple[str, list[tuple[str, str, float]]]]]:
    """(axis title, [(variant, [(segment label, colour, value)])]): seconds if timed, else true TFLOP."""
    timed = all(s.median_s is not None for v in result.variants for s in v.segments)
    title = "median seconds per segment" if timed else "true TFLOP per segment (not timed)"
    rows = []
    for v in result.variants:
        segs = [(_label(s.name), _colour(s.kind, _label(s.name)), s.median_s if timed else s.true_tflop)
                for s in v.segments]
        rows.append((v.name, segs))
    return title, rows


def draw_chart(result: BenchResult, path: Path) -> None:
    title, rows = bars(result)
    try:
        import matplotlib
    except ImportError:
        _draw_pil(title, rows, f"mf-bench: {result.model}", path)
        return
    matplotlib.use("Agg")  # no display on a benchmark machine
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.7 * len(rows)))
    seen = set()
    for y, (_, segs) in enumerate(rows):
        left = 0.0
        for label, colour, value in segs:
            ax.barh(y, value, left=left, color=colour, label=None if label in seen else label)
            seen.add(label)
            left += value
        ax.text(left, y, f" {left:.3g}", va="center")
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.set_xlabel(title)
    ax.set_title(f"mf-bench: {result.model}")
    ax.margins(x=0.12)  # room for the total printed after each bar
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def _draw_pil(title: str, rows, heading: str, path: Path) -> None:
    from PIL import Image, ImageDraw

    width, left_margin, right_margin, row_h, top = 1000, 180, 90, 44, 40
    legend = list(dict.fromkeys((label, colour) for _, segs in rows for label, colour, _ in segs))
    height = top + row_h * len(rows) + 40 + 20 * ((len(legend) + 4) // 5)
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 10), f"{heading}: {title}", fill="black")
    vmax = max((sum(v for *_, v in segs) for _, segs in rows), default=0.0) or 1.0
    scale = (width - left_margin - right_margin) / vmax
    for i, (name, segs) in enumerate(rows):
        y = top + i * row_h
        d.text((10, y + row_h // 3), name[:26], fill="black")
        x = float(left_margin)
        for _, colour, value in segs:
            d.rectangle([x, y + 6, x + max(value * scale, 1.0), y + row_h - 6], fill=colour)
            x += value * scale
        d.text((x + 6, y + row_h // 3), f"{sum(v for *_, v in segs):.3g}", fill="black")
    y0 = top + row_h * len(rows) + 20
    for j, (label, colour) in enumerate(legend):
        x, y = 10 + (j % 5) * 190, y0 + (j // 5) * 20
        d.rectangle([x, y, x + 14, y + 14], fill=colour)
        d.text((x + 20, y), label, fill="black")
    tmp = path.with_name(f".{path.name}.tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
