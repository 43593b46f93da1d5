"""`n2a report`: one static HTML page that shows a run to a person.

RUN/report.html needs no server, no network and no script: curves are inline SVG drawn
here, images are embedded as data URIs, so the file can be opened from disk, mailed or
archived on its own. It shows both stages' curves from their metrics.jsonl, the sample
grids over training time, the reconstruction grids, `n2a eval` results, the final
samples, the model card (RUN/README.md) and the spec. `n2a train` rewrites it whenever
it saves a grid.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import time
from pathlib import Path

from n2a_core.evaluation.generator import read_results

MAX_GRIDS = 12
"""Grids shown per kind, spread evenly over training (the last one always included)."""
MAX_POINTS = 600
"""Points drawn per curve; longer logs are thinned evenly."""
SKIPPED_KEYS = {"step", "elapsed_s", "eval/kid_se", "eval/kid_std"}  # the KID errors show in the eval table
COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"]


# -- data ------------------------------------------------------------------------------
def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a line cut short by a crash is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int | float):
            records.append(record)
    return records


def series_of(records: list[dict]) -> dict[str, list[tuple[float, float]]]:
    """key -> [(step, value)] for every numeric, finite metric, in the order first logged.

    A resumed run logs again from its last checkpoint: a step at or below one already seen
    drops that key's later points first (what TensorBoard calls purging orphaned data), so
    every curve runs forward once.
    """
    series: dict[str, list[tuple[float, float]]] = {}
    for record in records:
        step = float(record["step"])
        for key, value in record.items():
            if key in SKIPPED_KEYS or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                points = series.setdefault(key, [])
                while points and points[-1][0] >= step:
                    points.pop()
                points.append((step, float(value)))
    return series


def _order(key: str) -> tuple[int, str]:
    for rank, prefix in enumerate(("loss/", "val/", "eval/", "rec_loss", "perplexity", "usage")):
        if key.startswith(prefix):
            return rank, key
    return (9 if key.startswith(("grad_norm/", "lr/", "steps_per_s")) else 6), key


def _thin(points: list[tuple[float, float]], limit: int = MAX_POINTS) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    stride = len(points) / limit
    return [points[int(i * stride)] for i in range(limit)] + [points[-1]]


def _smooth(points: list[tuple[float, float]], window: int) -> list[tuple[float, float]]:
    """Centred moving average (the trend of a noisy loss)."""
    values = [v for _, v in points]
    out = []
    for i, (x, _) in enumerate(points):
        lo, hi = max(0, i - window // 2), min(len(values), i + window // 2 + 1)
        out.append((x, sum(values[lo:hi]) / (hi - lo)))
    return out


# -- SVG charts ------------------------------------------------------------------------
def _nice_ticks(lo: float, hi: float, count: int = 4, whole: bool = False) -> list[float]:
    """Round tick values in [lo, hi]; `whole` keeps them integers (steps: a one-point chart
    spans step - 1 .. step + 1, whose half steps would all print as the same number)."""
    if hi <= lo:
        return [lo]
    raw = max((hi - lo) / count, 1.0) if whole else (hi - lo) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = min((m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw), default=raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def line_chart(title: str, series: dict[str, list[tuple[float, float]]], width: int = 340,
               height: int = 200) -> str:
    """An inline SVG chart of one or more (x, y) series, with axes, ticks and a legend."""
    left, right, top, bottom = 52, 10, 24, 28
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = min(ys), max(ys)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    pad = (y_hi - y_lo) * 0.05 or abs(y_hi) * 0.05 or 1.0
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def sx(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * (width - left - right)

    def sy(y: float) -> float:
        return top + (y_hi - y) / (y_hi - y_lo) * (height - top - bottom)

    parts = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{left}" y="15" class="title">{html.escape(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'class="frame"/>']
    for y in _nice_ticks(y_lo, y_hi):
        parts.append(f'<line x1="{left}" x2="{width - right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="grid"/>'
                     f'<text x="{left - 4}" y="{sy(y) + 3:.1f}" class="tick" text-anchor="end">{_fmt(y)}</text>')
    for x in _nice_ticks(x_lo, x_hi, whole=True):
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 13}" class="tick" text-anchor="middle">'
                     f'{_fmt(x)}</text>')
    parts.append(f'<text x="{width - right}" y="{height - 3}" class="tick" text-anchor="end">step</text>')
    for i, (name, points) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        points = _thin(points)
        if len(points) == 1 or len(points) <= 12:
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in points]
        if len(points) > 1:
            noisy = len(points) > 50
            line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in points)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.2" '
                         f'stroke-opacity="{0.3 if noisy else 1}"/>')
            if noisy:
                trend = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in _smooth(points, len(points) // 25 + 1))
                parts.append(f'<polyline points="{trend}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        if len(series) > 1:
            parts.append(f'<text x="{width - right - 4}" y="{top + 12 + 12 * i}" class="legend" '
                         f'text-anchor="end" fill="{colour}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def charts(records: list[dict]) -> tuple[str, list[str]]:
    """The charts of a stage (a train and a validation loss share one) and the keys that
    never changed (named, not drawn)."""
    series = series_of(records)
    constant = [k for k, points in series.items() if len({v for _, v in points}) == 1 and len(points) > 1]
    drawn = {k: v for k, v in series.items() if k not in constant}
    out = []
    train_loss = next((k for k in drawn if k.startswith("loss/")), None)
    if train_loss and "val/loss" in drawn:
        out.append(line_chart("loss: train and validation",
                              {f"train {train_loss}": drawn.pop(train_loss), "val/loss": drawn.pop("val/loss")}))
    for key in sorted(drawn, key=_order):
        out.append(line_chart(key, {key: drawn[key]}))
    return "".join(out), constant


# -- images ----------------------------------------------------------------------------
def data_uri(path: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def step_of(path: Path) -> int | None:
    match = re.search(r"(\d+)$", path.stem)
    return int(match.group(1)) if match else None


def spread(paths: list[Path], limit: int = MAX_GRIDS) -> list[Path]:
    """At most `limit` paths evenly spread over the list, first and last included."""
    if len(paths) <= limit:
        return paths
    return [paths[round(i * (len(paths) - 1) / (limit - 1))] for i in range(limit)]


def gallery(paths: list[Path], caption) -> str:
    if not paths:
        return '<p class="none">none yet</p>'
    figures = [f'<figure><img src="{data_uri(p)}" alt="{html.escape(caption(p))}">'
               f"<figcaption>{html.escape(caption(p))}</figcaption></figure>" for p in paths]
    return f'<div class="gallery">{"".join(figures)}</div>'


def grids_over_time(folder: Path, prefix: str) -> list[Path]:
    paths = [p for p in folder.glob(f"{prefix}-*.png") if step_of(p) is not None]
    return spread(sorted(paths, key=step_of))


# -- eval table ------------------------------------------------------------------------
def eval_table(results: list[dict]) -> str:
    if not results:
        return '<p class="none">no evaluation yet: run <code>n2a eval RUN</code> or set training.eval_every</p>'
    columns = ["fd", "kid", "precision", "recall", "conditional_accuracy", "real_accuracy"]
    head = "".join(f"<th>{c}</th>" for c in ["step", "extractor", "images", "reference", *columns])
    rows = []
    for r in results:
        m = r.get("metrics", {})
        cells = []
        for c in columns:
            value = m.get(c)
            if value is None:
                text = "–"
            else:
                text = f"{value:.5f} ± {m.get('kid_se', 0):.5f}" if c == "kid" else f"{value:.4g}"
            cells.append(f"<td>{text}</td>")
        reference = r.get("reference", {})
        rows.append(f"<tr><td>{r.get('step')}</td><td>{html.escape(str(r.get('extractor', {}).get('type')))}</td>"
                    f"<td>{r.get('images')}</td>"
                    f"<td>{reference.get('images')} {html.escape(str(reference.get('split')))}"
                    f"</td>{''.join(cells)}</tr>")
    return f'<table><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


# -- the page --------------------------------------------------------------------------
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1180px;
 padding:0 16px;color:#222;background:#fff}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.meta{color:#666}.none{color:#888;font-style:italic}
.charts{display:flex;flex-wrap:wrap;gap:10px}
.chart{background:#fafafa;border:1px solid #e4e4e4;border-radius:4px}
.chart .title{font-size:12px;font-weight:600;fill:#333}.chart .tick{font-size:10px;fill:#666}
.chart .legend{font-size:10px}.chart .frame{fill:none;stroke:#bbb}.chart .grid{stroke:#e6e6e6}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0}figure img{image-rendering:pixelated;border:1px solid #ddd;max-width:360px;width:360px}
figcaption{font-size:12px;color:#555}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}
th{background:#f3f3f3}pre{background:#f6f6f6;border:1px solid #e4e4e4;padding:10px;overflow:auto;font-size:12px}
"""


def render_report(root: Path) -> str:
    """The report page of the run folder `root`, as HTML text."""
    root = Path(root)
    ae_records = read_metrics(root / "autoencoder" / "metrics.jsonl")
    diffusion_records = read_metrics(root / "diffusion" / "metrics.jsonl")
    spec_text = (root / "spec.yaml").read_text() if (root / "spec.yaml").is_file() else "(no spec.yaml)"
    card = root / "README.md"
    # `n2a train` writes samples/final, then final-2, ... after a resume: show the newest.
    finals = sorted((root / "samples").glob("final*/grid.png"), key=lambda p: p.stat().st_mtime)
    final = finals[-1] if finals else None
    steps = [f"stage 1: step {ae_records[-1]['step']}" if ae_records else "stage 1: not started",
             f"stage 2: step {diffusion_records[-1]['step']}" if diffusion_records else "stage 2: not started"]

    def stage_section(title: str, records: list[dict]) -> str:
        if not records:
            return f"<h2>{title}</h2><p class='none'>no metrics yet</p>"
        drawn, constant = charts(records)
        note = (f"<p class='meta'>constant throughout: {html.escape(', '.join(constant))}</p>" if constant else "")
        return f"<h2>{title}</h2><div class='charts'>{drawn}</div>{note}"

    step_caption = lambda p: f"step {step_of(p)}"  # noqa: E731
    body = [
        f"<h1>n2a run: {html.escape(root.resolve().name)}</h1>",
        f"<p class='meta'>{html.escape(' · '.join(steps))} · written {time.strftime('%Y-%m-%d %H:%M:%S')} · "
        f"{html.escape(str(root.resolve()))}</p>",
        stage_section("Stage 2: diffusion", diffusion_records),
        "<h2>Generator evaluation (n2a eval)</h2>", eval_table(read_results(root / "eval")),
        "<h2>Samples over training</h2>",
        gallery(grids_over_time(root / "diffusion" / "grids", "samples"), step_caption),
    ]
    if final is not None:
        body += ["<h2>Final samples</h2>", gallery([final], lambda p: str(p.relative_to(root)))]
    body += [
        stage_section("Stage 1: autoencoder", ae_records),
        "<h2>Reconstructions over training (top: input, bottom: reconstruction)</h2>",
        gallery(grids_over_time(root / "autoencoder" / "grids", "recon"), step_caption),
    ]
    if card.is_file():
        body += ["<h2>Model card</h2>", f"<pre>{html.escape(card.read_text())}</pre>"]
    body += ["<h2>Spec</h2>", f"<pre>{html.escape(spec_text)}</pre>"]
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>n2a report: "
            f"{html.escape(root.resolve().name)}</title><style>{STYLE}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(root: Path) -> Path:
    """Write RUN/report.html (atomically: a browser never reads half a page)."""
    root = Path(root)
    path = root / "report.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(render_report(root))
    os.replace(tmp, path)
    return path
