"""PNG plots and the self-contained HTML report."""
from __future__ import annotations

import base64
import re

import pytest

try:
    from _latency_models import FakeBackend, conv_chain
except ModuleNotFoundError:  # tests/ imported as a package
    from tests._latency_models import FakeBackend, conv_chain

import graphprune
from graphprune import report_html
from graphprune.errors import BadInputError
from graphprune.latency import prune_to_latency
from graphprune.report_html import (plot_latency_vs_flops, plot_widths, render_report_html, write_plots,
                                    write_report_html)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_matplotlib = pytest.mark.skipif(report_html._pyplot() is None, reason="matplotlib is not installed")


@pytest.fixture(scope="module")
def report():
    return graphprune.prune(conv_chain(), target_flops=0.5, verify=True).report


@pytest.fixture(scope="module")
def latency_report():
    return prune_to_latency(conv_chain(), 0.6, FakeBackend(), use_lut=False, runs=1, warmup=0).report


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)]


def _assert_self_contained(text: str) -> None:
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not re.search(r"<(script|link|iframe)\b", text, re.I)
    refs = re.findall(r"\b(?:href|src)\s*=\s*[\"']?([^\"'\s>]*)", text, re.I)
    assert all(ref.startswith("data:") for ref in refs), "external reference"
    assert "url(" not in text and "@import" not in text


@needs_matplotlib
def test_plots_are_png(report, latency_report):
    assert plot_widths(report).startswith(PNG_MAGIC)
    points = latency_report["latency"]["search"]
    assert plot_latency_vs_flops(points, target=0.6).startswith(PNG_MAGIC)
    assert plot_latency_vs_flops([]) is None


@needs_matplotlib
def test_html_with_widths_plot(report, tmp_path):
    path = write_report_html(report, tmp_path / "sub" / "report.html", model="conv_chain.onnx")
    text = open(path, encoding="utf-8").read()
    _assert_self_contained(text)
    images = _images(text)
    assert len(images) == 1 and images[0].startswith(PNG_MAGIC)  # widths; no latency points to plot
    assert "Per-layer widths" in text and "Per-layer table" in text and "conv_chain.onnx" in text
    assert "oracle holds" in text
    for g in report["groups"]:
        assert f"<td>{g['id']}</td>" in text
    assert "MACs" in text and f"{report['macs_ratio']:.3f}" in text
    # written through a fresh temporary name and a rename: a stale fixed-name temp is never used
    stale = tmp_path / "sub" / ".report.html.tmp"
    stale.write_text("someone else's")
    write_report_html(report, path, model="conv_chain.onnx")
    assert stale.read_text() == "someone else's"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [".report.html.tmp", "report.html"]


@needs_matplotlib
def test_html_with_latency(latency_report, tmp_path):
    text = open(write_report_html(latency_report, tmp_path / "r.html"), encoding="utf-8").read()
    _assert_self_contained(text)
    assert len(_images(text)) == 2
    lat = latency_report["latency"]
    assert f"{lat['measured_ratio']:.3f}" in text and "latency target 0.6" in text


@needs_matplotlib
def test_html_with_bench_and_points(report, tmp_path):
    from graphprune.bench import bench_models

    bench = bench_models([conv_chain(), conv_chain(width=16)], backend="ort-cpu", runs=2, warmup=0,
                         labels=["original", "pruned"])
    points = [{"macs_ratio": 0.5, "latency_ratio": 0.6}, {"macs_ratio": 0.25, "latency_ratio": 0.4}]
    text = render_report_html(report, points=points, bench=bench, title="t <&>")
    _assert_self_contained(text)
    assert len(_images(text)) == 2 and "Latency side by side" in text and "t &lt;&amp;&gt;" in text


@needs_matplotlib
def test_write_plots(latency_report, tmp_path):
    written = write_plots(latency_report, tmp_path, stem="m")
    assert set(written) == {"widths", "latency"}
    for path in written.values():
        assert open(path, "rb").read().startswith(PNG_MAGIC)


def test_without_matplotlib(report, tmp_path, monkeypatch):
    monkeypatch.setattr(report_html, "_pyplot", lambda: None)
    text = open(write_report_html(report, tmp_path / "r.html"), encoding="utf-8").read()
    _assert_self_contained(text)
    assert not _images(text) and "matplotlib is not installed" in text and "Per-layer table" in text


def test_bad_report(tmp_path, report):
    with pytest.raises(BadInputError, match="groups"):
        write_report_html({"macs_ratio": 0.5}, tmp_path / "r.html")
    with pytest.raises(BadInputError, match="directory"):
        write_report_html(report, tmp_path)
