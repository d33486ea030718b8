"""Pruning reports as pictures: PNG plots (matplotlib) and one self-contained HTML file.

* :func:`plot_widths` - per-layer (per-group) channel counts before and after pruning,
  from the prune report's ``groups``.
* :func:`plot_latency_vs_flops` - measured latency ratio against MACs ratio across FLOPs
  targets (points from ``report["latency"]["search"]`` of :func:`graphprune.latency.prune_to_latency`
  or from :func:`graphprune.latency.latency_vs_flops`), with the "latency falls as MACs do" line.
* :func:`write_report_html` - summary (MACs/params before and after, measured latency beside
  the MACs ratio), both plots and the per-layer table in one HTML file: images are embedded
  as base64 data URIs, styles are inline, nothing is fetched from anywhere.

matplotlib is imported lazily (``pip install matplotlib``); without it the HTML still has the
summary and the table, and says the plots need matplotlib.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import os
from pathlib import Path

from .errors import BadInputError
from .paths import write_text_atomic

__all__ = ["plot_widths", "plot_latency_vs_flops", "write_plots", "render_report_html", "write_report_html",
           "latency_points"]


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def _groups(report: dict) -> list[dict]:
    groups = report.get("groups")
    if not isinstance(groups, list):
        raise BadInputError("the report has no 'groups' list (give the report of graphprune.prune or --report)")
    return groups


def plot_widths(report: dict) -> bytes | None:
    """PNG bytes: each group's channel count before (grey) and after (blue); None without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    groups = _groups(report)
    n = max(len(groups), 1)
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.28 * n + 2), 22), 3.8))
    xs = list(range(len(groups)))
    before = [g["channels"] for g in groups]
    after = [g.get("kept", g["channels"]) for g in groups]
    ax.bar(xs, before, color="#c9ced6", label="before", width=0.8)
    ax.bar(xs, after, color="#2f6fdf", label="after", width=0.55)
    ax.set_xlabel("channel group (id)")
    ax.set_ylabel("channels / heads")
    ax.set_title("Per-layer widths before and after pruning")
    if len(groups) <= 40:
        ax.set_xticks(xs)
        ax.set_xticklabels([str(g["id"]) for g in groups], fontsize=7)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def latency_points(report: dict, points: list[dict] | None = None) -> list[dict]:
    """The (macs_ratio, latency_ratio) points to plot: `points`, else the report's search."""
    if points is None:
        points = (report.get("latency") or {}).get("search") or []
    return [p for p in points if p.get("macs_ratio") is not None and p.get("latency_ratio") is not None]


def plot_latency_vs_flops(points: list[dict], *, chosen: dict | None = None, target: float | None = None,
                          backend: str = "") -> bytes | None:
    """PNG bytes: measured latency ratio vs MACs ratio; None without matplotlib or points."""
    plt = _pyplot()
    if plt is None or not points:
        return None
    pts = sorted(points, key=lambda p: p["macs_ratio"])
    fig, ax = plt.subplots(figsize=(5.6, 4.2))
    xs = [1.0] + [p["macs_ratio"] for p in pts]
    ys = [1.0] + [p["latency_ratio"] for p in pts]
    ax.plot([0, 1], [0, 1], ls="--", color="#999999", lw=1, label="latency \u221d MACs")
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ax.plot([xs[i] for i in order], [ys[i] for i in order], marker="o", color="#2f6fdf", label="measured")
    if chosen is not None:
        ax.scatter([chosen["macs_ratio"]], [chosen["latency_ratio"]], s=120, facecolors="none",
                   edgecolors="#d9480f", linewidths=2, zorder=5, label="chosen")
    if target is not None:
        ax.axhline(target, color="#d9480f", lw=1, ls=":", label=f"latency target {target:g}")
    ax.set_xlim(0, 1.05)
    ax.set_ylim(0, max(1.1, max(ys) * 1.05))
    ax.set_xlabel("MACs ratio (pruned / original)")
    ax.set_ylabel("measured latency ratio")
    ax.set_title(f"Latency vs FLOPs{' (' + backend + ')' if backend else ''}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    return _png(fig)


def _latency_plot(report: dict, points: list[dict] | None) -> bytes | None:
    lat = report.get("latency") or {}
    pts = latency_points(report, points)
    chosen = None
    if lat.get("measured_ratio") is not None and lat.get("macs_ratio") is not None:
        chosen = {"macs_ratio": lat["macs_ratio"], "latency_ratio": lat["measured_ratio"]}
    return plot_latency_vs_flops(pts, chosen=chosen, target=lat.get("target"), backend=lat.get("backend_label", ""))


def write_plots(report: dict, out_dir: "str | os.PathLike", *, points: list[dict] | None = None,
                stem: str = "graphprune") -> dict[str, str]:
    """Write `<stem>.widths.png` and (with latency points) `<stem>.latency.png`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for key, png in (("widths", plot_widths(report)), ("latency", _latency_plot(report, points))):
        if png is not None:
            path = out / f"{stem}.{key}.png"
            path.write_bytes(png)
            written[key] = str(path)
    return written


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#1d2433;
padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #e1e4ea;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #e1e4ea;padding:.25em .6em;text-align:right}
th{background:#f4f6f9}td.l,th.l{text-align:left}tr.pruned td{background:#f7faff}
.muted{color:#6b7280;font-size:.85em}img{max-width:100%;border:1px solid #e1e4ea}.warn{color:#b45309}
"""


def _fmt(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f'<p class="muted">({html.escape(alt)}: no plot; matplotlib is not installed or there is no data)</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _summary_rows(report: dict) -> list[tuple[str, str, str, str]]:
    rows = [("MACs", _fmt(report.get("macs_before")), _fmt(report.get("macs_after")),
             f"{report['macs_ratio']:.3f}" if report.get("macs_ratio") is not None else "-"),
            ("parameters", _fmt(report.get("params_before")), _fmt(report.get("params_after")),
             f"{report['params_ratio']:.3f}" if report.get("params_ratio") is not None else "-")]
    lat = report.get("latency") or {}
    if lat.get("original_ms") is not None:
        rows.append((f"latency (ms, {lat.get('backend_label', lat.get('backend', ''))})", f"{lat['original_ms']:.3f}",
                     f"{lat['pruned_ms']:.3f}", f"{lat['measured_ratio']:.3f}"))
    return rows


def _bench_table(bench: dict) -> str:
    rows = "".join(
        f"<tr><td class=l>{html.escape(str(r['model']))}</td><td>{r['median_ms']:.3f}</td><td>{r['p10_ms']:.3f}</td>"
        f"<td>{r['p90_ms']:.3f}</td><td>{100 * r['spread']:.1f}%</td><td>{r['throughput']:.1f}</td>"
        f"<td>{r['ratio']:.3f}</td></tr>" for r in bench.get("models", []))
    return (f"<p>backend: {html.escape(str(bench.get('backend_label', bench.get('backend', ''))))}, batch "
            f"{bench.get('batch', '')}, {bench.get('runs', '')} runs</p><table><tr><th class=l>model</th>"
            "<th>median ms</th><th>p10 ms</th><th>p90 ms</th><th>spread</th><th>items/s</th><th>ratio</th></tr>"
            f"{rows}</table>")


def _layer_table(report: dict) -> str:
    lut = ((report.get("latency") or {}).get("lut") or {})
    rounded = report.get("latency_round") or {}
    body = []
    for g in _groups(report):
        kept = g.get("kept", g["channels"])
        nodes = g.get("nodes") or []
        node_text = ", ".join(nodes[:4]) + (f" (+{len(nodes) - 4})" if len(nodes) > 4 else "")
        flags = []
        if g.get("protected"):
            flags.append("protected")
        if str(g["id"]) in rounded:
            r = rounded[str(g["id"])]
            flags.append(f"latency table: {r['allocated']} \u2192 {r['chosen']}")
        unit = "heads" if g.get("kind") == "heads" else "ch"
        cls = ' class="pruned"' if kept < g["channels"] else ""
        body.append(f"<tr{cls}><td>{g['id']}</td><td class=l>{html.escape(str(g.get('name', '')))}</td>"
                    f"<td>{g['channels']} {unit}</td><td>{kept}</td><td>{kept / max(g['channels'], 1):.2f}</td>"
                    f"<td class=l>{html.escape(node_text)}</td><td class=l>{html.escape('; '.join(flags))}</td></tr>")
    note = f'<p class="muted">latency table: {html.escape(str(lut.get("path", "")))}</p>' if lut else ""
    return (note + "<table><tr><th>group</th><th class=l>name</th><th>before</th><th>after</th><th>kept</th>"
            "<th class=l>layers</th><th class=l>notes</th></tr>" + "".join(body) + "</table>")


def render_report_html(report: dict, *, title: str = "graphprune report", model: str | None = None,
                       points: list[dict] | None = None, bench: dict | None = None) -> str:
    """The report as one self-contained HTML document (see :func:`write_report_html`)."""
    groups = _groups(report)
    widths = plot_widths(report)
    latency_png = _latency_plot(report, points)
    lat = report.get("latency") or {}
    parts = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    meta = [f"model: {html.escape(model)}"] if model else []
    meta.append(f"generated {_dt.datetime.now().isoformat(timespec='seconds')}")
    parts.append(f'<p class="muted">{" &middot; ".join(meta)}</p>')
    parts.append("<h2>Summary</h2><table><tr><th class=l></th><th>before</th><th>after</th><th>ratio</th></tr>")
    for name, before, after, ratio in _summary_rows(report):
        parts.append(f"<tr><td class=l>{html.escape(name)}</td><td>{before}</td><td>{after}</td><td>{ratio}</td></tr>")
    parts.append("</table>")
    pruned = sum(1 for g in groups if g.get("kept", g["channels"]) < g["channels"])
    facts = [f"{len(groups)} channel groups, {pruned} pruned", f"{len(report.get('pinned', []))} weight axes pinned"]
    if lat:
        facts.append(f"latency target {lat.get('target')}: measured {lat.get('measured_ratio', float('nan')):.3f} "
                     f"x the original ({'met' if lat.get('met') else 'not met'}), MACs ratio "
                     f"{lat.get('macs_ratio', float('nan')):.3f}")
        if lat.get("lut_predicted_ratio") is not None:
            facts.append(f"latency table predicted {lat['lut_predicted_ratio']:.3f}")
    if "oracle" in report:
        facts.append(f"mask-equivalence oracle {'holds' if report['oracle'].get('equivalent') else 'FAILS'}")
    parts.append("<ul>" + "".join(f"<li>{html.escape(f)}</li>" for f in facts) + "</ul>")
    for w in report.get("warnings", []):
        parts.append(f'<p class="warn">warning: {html.escape(str(w))}</p>')
    if bench:
        parts.append("<h2>Latency side by side</h2>" + _bench_table(bench))
    parts.append("<h2>Per-layer widths</h2>" + _img(widths, "per-layer widths before and after"))
    parts.append("<h2>Latency vs FLOPs</h2>" + _img(latency_png, "latency vs FLOPs"))
    parts.append("<h2>Per-layer table</h2>" + _layer_table(report))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report_html(report: dict, path: "str | os.PathLike", *, title: str = "graphprune report",
                      model: str | None = None, points: list[dict] | None = None, bench: dict | None = None) -> str:
    """Write the self-contained HTML report (summary, plots, per-layer table) to `path`.

    `report` is a PruneResult's report (or the JSON of `--report`); `points` are extra
    latency-vs-FLOPs points (default: the report's latency search); `bench` a
    :func:`graphprune.bench.bench_models` result to show. Returns the path written.
    """
    path = Path(path)
    if path.is_dir():
        raise BadInputError(f"--report-html {path} is a directory; give a file name")
    text = render_report_html(report, title=title, model=model, points=points, bench=bench)
    write_text_atomic(path, text, flag="--report-html")   # a fresh temporary name, then a rename
    return str(path)
