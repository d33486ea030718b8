"""The command line: one-line errors with exit code 2, outputs, report, analyze, help.

The CLI runs in-process through graphprune.cli.main (argparse's SystemExit is caught
and turned into the exit code) and, for the real process exit code, through
`python -m graphprune`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

try:
    from _fixtures import (conv_to_output_model, copy_model, custom_act_model, float_params, independent_macs,
                           listing, node_weight, relu_model, resnet_onnx, sha256)  # noqa: F401
except ModuleNotFoundError:  # tests/ imported as a package
    from tests._fixtures import (conv_to_output_model, copy_model, custom_act_model, float_params,
                                 independent_macs, listing, node_weight, relu_model, resnet_onnx,  # noqa: F401
                                 sha256)

import graphprune
from graphprune.cli import main

OPTIONS = ["-o", "--output", "--target-flops", "--target-params", "--criterion", "--round-to", "--min-keep",
           "--protect", "--uniform", "--seed", "--verify", "--report", "-q", "--quiet"]
TOLERANCE = 0.02


def run_cli(capsys, *args) -> tuple[int, str, str]:
    try:
        rc = main([str(a) for a in args])
    except SystemExit as exc:  # argparse exits for --help and for flags it rejects
        rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out: str, err: str, pattern: str = "") -> None:
    assert rc == 2, f"exit code {rc}\nstdout: {out}\nstderr: {err}"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("graphprune: error:"), lines[0]
    assert "Traceback" not in err + out
    assert out == "", f"nothing should reach stdout on bad input, got:\n{out}"
    if pattern:
        assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"


def summary_ratio(out: str, what: str) -> float:
    m = re.search(rf"^{what}\s+\S+ -> \S+\s+\((\d+\.\d+)\)", out, re.M)
    assert m, f"no {what} line in:\n{out}"
    return float(m.group(1))


@pytest.fixture
def work(tmp_path, monkeypatch, resnet_onnx) -> Path:
    """tmp/in/model.onnx (a resnet_basic copy); the cwd is tmp/cwd, to catch stray files."""
    copy_model(resnet_onnx, tmp_path / "in")
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    monkeypatch.delenv("GRAPHPRUNE_DEBUG", raising=False)
    return tmp_path


# --------------------------------------------------------------------------- bad input


def _save(d: Path, model: onnx.ModelProto, name: str = "model.onnx") -> Path:
    onnx.save(model, d / name)
    return d / name


def _text_file(d: Path) -> Path:
    (d / "notes.onnx").write_text("this is not an onnx model, just text\n" * 4)
    return d / "notes.onnx"


def _truncated(d: Path) -> Path:
    (d / "cut.onnx").write_bytes((d / "model.onnx").read_bytes()[:200])
    return d / "cut.onnx"


def _existing_sub(d: Path) -> Path:
    (d / "sub").mkdir()
    return d / "sub"


def _with_opset(d: Path, version: int) -> Path:
    m = onnx.load(d / "model.onnx")
    for o in m.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = version
    return _save(d, m)


BAD_INPUT = {
    # id: (d -> argv, regex the error line must match); d is the folder holding model.onnx
    "missing-file": (lambda d: [d / "missing.onnx", "--target-flops", "0.5"], r"missing\.onnx.*no such file"),
    "directory": (lambda d: [d, "--target-flops", "0.5"], r"directory"),
    "text-file": (lambda d: [_text_file(d), "--target-flops", "0.5"], r"notes\.onnx"),
    "truncated": (lambda d: [_truncated(d), "--target-flops", "0.5"], r"cut\.onnx"),
    "opset-3": (lambda d: [_with_opset(d, 3), "--target-flops", "0.5"], r"opset 3\b"),
    "opset-99": (lambda d: [_with_opset(d, 99), "--target-flops", "0.5"], r"opset 99\b"),
    "flops-0": (lambda d: [d / "model.onnx", "--target-flops", "0"], r"--target-flops"),
    "flops-1.5": (lambda d: [d / "model.onnx", "--target-flops", "1.5"], r"--target-flops"),
    "flops-abc": (lambda d: [d / "model.onnx", "--target-flops", "abc"], r"--target-flops.*abc"),
    "flops-nan": (lambda d: [d / "model.onnx", "--target-flops", "nan"], r"--target-flops"),
    "params-0": (lambda d: [d / "model.onnx", "--target-params", "0"], r"--target-params"),
    "no-target": (lambda d: [d / "model.onnx"], r"--target-flops"),
    "round-to-0": (lambda d: [d / "model.onnx", "--target-flops", "0.5", "--round-to", "0"], r"--round-to"),
    "unknown-criterion": (lambda d: [d / "model.onnx", "--target-flops", "0.5", "--criterion", "nope"],
                          r"criterion"),
    "nothing-prunable-relu": (lambda d: [_save(d, relu_model(), "relu.onnx"), "--target-flops", "0.5",
                                         "--report", d / "rep.json"], r"nothing to prune|cannot reach"),
    "nothing-prunable-conv-output": (lambda d: [_save(d, conv_to_output_model(), "conv.onnx"),
                                                "--target-flops", "0.5"], r"nothing to prune|cannot reach"),
    "unreachable-target": (lambda d: [d / "model.onnx", "--target-flops", "0.01", "--report", d / "rep.json"],
                           r"cannot reach"),
    "protect-unknown-node": (lambda d: [d / "model.onnx", "--target-flops", "0.5", "--protect", "no_such_node"],
                             r"no_such_node"),
    "output-is-input": (lambda d: [d / "model.onnx", "--target-flops", "0.5", "-o", d / "model.onnx"],
                        r"input"),
    "output-is-input-dotted": (lambda d: [d / "model.onnx", "--target-flops", "0.5", "-o",
                                          _existing_sub(d) / ".." / "model.onnx"], r"input"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(case, work, capsys):
    make_argv, pattern = BAD_INPUT[case]
    d = work / "in"
    argv = make_argv(d)
    before = listing(work)
    model_sha = sha256(d / "model.onnx")
    rc, out, err = run_cli(capsys, *argv)
    assert_one_line_error(rc, out, err, pattern)
    assert listing(work) == before, "a failed run must not create files"
    assert sha256(d / "model.onnx") == model_sha


@pytest.mark.parametrize("case", ["missing-file", "directory", "truncated", "opset-99"])
def test_analyze_bad_input_exits_2(case, work, capsys):
    make_argv, pattern = BAD_INPUT[case]
    path = make_argv(work / "in")[0]
    before = listing(work)
    rc, out, err = run_cli(capsys, "analyze", path, "--json", work / "a.json")
    assert_one_line_error(rc, out, err, pattern)
    assert listing(work) == before


def test_output_is_a_directory_exits_2(work, capsys):
    (work / "outdir").mkdir()
    before = listing(work)
    rc, out, err = run_cli(capsys, work / "in" / "model.onnx", "--target-flops", "0.5", "-o", work / "outdir")
    assert_one_line_error(rc, out, err, r"directory")
    assert listing(work) == before


def test_output_is_input_through_missing_folder(work, capsys):
    src = work / "in" / "model.onnx"
    digest = sha256(src)
    rc, out, err = run_cli(capsys, src, "--target-flops", "0.5", "-o", f"{work / 'in'}/not_yet/../model.onnx")
    assert sha256(src) == digest, "the input file was overwritten"
    assert_one_line_error(rc, out, err, r"input")


def _subprocess(argv, cwd) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRAPHPRUNE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "graphprune", *map(str, argv)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", ["missing-file", "truncated", "flops-abc", "no-target", "nothing-prunable-relu",
                                  "output-is-input"])
def test_bad_input_real_exit_code(case, work):
    make_argv, pattern = BAD_INPUT[case]
    argv = make_argv(work / "in")
    before = listing(work)
    proc = _subprocess(argv, work / "cwd")
    assert_one_line_error(proc.returncode, proc.stdout, proc.stderr, pattern)
    assert listing(work) == before


def test_good_run_real_exit_code_matches_in_process(work, capsys):
    src = work / "in" / "model.onnx"
    proc = _subprocess([src, "--target-flops", "0.5", "-o", work / "sub.onnx"], work / "cwd")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "MACs" in proc.stdout
    rc, _, _ = run_cli(capsys, src, "--target-flops", "0.5", "-o", work / "inproc.onnx")
    assert rc == 0
    assert (work / "sub.onnx").read_bytes() == (work / "inproc.onnx").read_bytes()


# --------------------------------------------------------------------------- outputs


def test_default_output_beside_input(work, capsys):
    src = work / "in" / "model.onnx"
    rc, out, err = run_cli(capsys, src, "--target-flops", "0.5")
    assert rc == 0, err
    assert err == ""
    dst = work / "in" / "model.pruned.onnx"
    assert dst.is_file()
    assert listing(work / "cwd") == set(), "nothing is written to the working directory"
    assert listing(work / "in") == {"model.onnx", "model.pruned.onnx"}
    onnx.checker.check_model(onnx.load(dst), full_check=True)
    assert str(dst) in out or dst.name in out


def test_output_option(work, capsys):
    dst = work / "out" / "deep" / "small.onnx"
    rc, out, err = run_cli(capsys, work / "in" / "model.onnx", "--target-flops", "0.5", "-o", dst)
    assert rc == 0, err
    assert dst.is_file()
    assert not (work / "in" / "model.pruned.onnx").exists()
    assert listing(work / "out") == {"deep", "deep/small.onnx"}, "no temporary files left beside the output"
    assert len(onnx.load(dst).graph.node) > 0


def test_summary_and_report(work, capsys, resnet_onnx):
    src, dst, rep = work / "in" / "model.onnx", work / "small.onnx", work / "r" / "report.json"
    rc, out, err = run_cli(capsys, src, "--target-flops", "0.5", "-o", dst, "--report", rep)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    original, pruned = onnx.load(src), onnx.load(dst)

    # the summary prints MACs and params before -> after, matching the report
    assert summary_ratio(out, "MACs") == pytest.approx(report["macs_ratio"], abs=5e-4)
    assert summary_ratio(out, "params") == pytest.approx(report["params_ratio"], abs=5e-4)

    # MACs and params agree with an independent count on the files
    assert report["macs_before"] == independent_macs(original)
    assert report["macs_after"] == independent_macs(pruned)
    assert report["params_before"] == float_params(original)
    assert report["params_after"] == float_params(pruned)
    assert report["macs_after"] < report["macs_before"]

    # groups: members (tensor, axis) and removed channel indices
    assert report["groups"], "resnet_basic has prunable groups"
    by_name = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    checked = 0
    for g in report["groups"]:
        assert g["members"] and all({"tensor", "axis"} <= set(m) for m in g["members"])
        removed = g["removed"]
        assert removed == sorted(set(removed)) and all(isinstance(i, int) for i in removed)
        assert all(0 <= i < g["channels"] for i in removed)
        assert g["kept"] == g["channels"] - len(removed)
        # the root weight lost exactly the reported channels (when its other axes are untouched)
        root = next(m for m in g["members"] if f"{m['tensor']}[{m['axis']}]" == g["name"])
        w0, w1 = by_name[root["tensor"]], new[root["tensor"]]
        ax = root["axis"]
        if root["elements_per_channel"] == 1 and np.delete(w0.shape, ax).tolist() == np.delete(w1.shape, ax).tolist():
            np.testing.assert_array_equal(w1, np.delete(w0, removed, axis=ax))
            checked += 1
    assert checked >= 1
    assert sum(1 for g in report["groups"] if g["removed"]) >= 2

    # pinned channels carry a reason
    assert report["pinned"]
    for p in report["pinned"]:
        assert {"tensor", "axis", "reason"} <= set(p) and p["reason"].strip()
    assert any("graph output" in p["reason"] for p in report["pinned"])


@pytest.mark.parametrize("round_to", [None, 1], ids=["round-to-default", "round-to-1"])
@pytest.mark.parametrize("ratio", [0.7, 0.5])
def test_macs_ratio_lands_in_band(ratio, round_to, work, capsys):
    src, dst, rep = work / "in" / "model.onnx", work / "small.onnx", work / "report.json"
    extra = [] if round_to is None else ["--round-to", round_to]
    rc, out, err = run_cli(capsys, src, "--target-flops", ratio, "-o", dst, "--report", rep, *extra)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    assert ratio - TOLERANCE <= report["macs_ratio"] <= ratio
    measured = independent_macs(onnx.load(dst)) / independent_macs(onnx.load(src))
    assert measured == pytest.approx(report["macs_ratio"], rel=1e-9)


def test_target_params(work, capsys):
    src, dst, rep = work / "in" / "model.onnx", work / "small.onnx", work / "report.json"
    rc, out, err = run_cli(capsys, src, "--target-params", "0.6", "-o", dst, "--report", rep)
    assert rc == 0, err
    report = json.loads(rep.read_text())
    measured = float_params(onnx.load(dst)) / float_params(onnx.load(src))
    assert measured == pytest.approx(report["params_ratio"], rel=1e-9)
    assert 0.6 - TOLERANCE <= measured <= 0.6


def _kept_fractions(report) -> list[float]:
    return [g["kept"] / g["channels"] for g in report["groups"] if g["removed"]]


def test_uniform(work, capsys):
    src = work / "in" / "model.onnx"
    fractions = {}
    for flag in ("--uniform", None):
        rep = work / f"report{flag}.json"
        rc, out, err = run_cli(capsys, src, "--target-flops", "0.7", "--round-to", "1", "-o", work / "s.onnx",
                               "--report", rep, *([flag] if flag else []))
        assert rc == 0, err
        report = json.loads(rep.read_text())
        assert report["macs_ratio"] <= 0.7
        fractions[flag] = _kept_fractions(report)
        smallest = min(g["channels"] for g in report["groups"] if g["removed"])
    uniform = fractions["--uniform"]
    assert len(uniform) >= 3
    assert max(uniform) - min(uniform) <= 1 / smallest + 1e-9, uniform
    assert max(fractions[None]) - min(fractions[None]) > max(uniform) - min(uniform)


@pytest.mark.parametrize("ratio,round_to", [(0.5, 8), (0.5, 1), (0.7, 1)])
def test_uniform_lands_in_band_or_warns(ratio, round_to, work, capsys):
    rc, out, err = run_cli(capsys, work / "in" / "model.onnx", "--target-flops", ratio, "--round-to", round_to,
                           "--uniform", "-o", work / "s.onnx")
    assert rc == 0, err
    achieved = summary_ratio(out, "MACs")
    assert ratio - TOLERANCE - 5e-4 <= achieved <= ratio or "warning:" in out


@pytest.mark.parametrize("pattern,nodes", [
    ("/1/conv1/conv1.0/Conv", ["/1/conv1/conv1.0/Conv"]),
    ("/4/*", ["/4/conv1/conv1.0/Conv", "/4/conv2/conv2.0/Conv", "/4/downsample/downsample.0/Conv"]),
], ids=["exact", "glob"])
def test_protect_keeps_weight_shapes(pattern, nodes, work, capsys):
    src, dst, rep = work / "in" / "model.onnx", work / "s.onnx", work / "report.json"
    rc, out, err = run_cli(capsys, src, "--target-flops", "0.7", "--protect", pattern, "-o", dst, "--report", rep)
    assert rc == 0, err
    original, pruned = onnx.load(src), onnx.load(dst)
    old = {t.name: tuple(t.dims) for t in original.graph.initializer}
    new = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    for node in nodes:
        w = node_weight(original, node)
        assert node_weight(pruned, node) == w
        assert new[w] == old[w], f"{node}'s weight {w} changed shape"
    report = json.loads(rep.read_text())
    touching = [g for g in report["groups"] if set(g["nodes"]) & set(nodes)]
    assert touching and all(g["protected"] and not g["removed"] for g in touching)
    assert any(g["removed"] for g in report["groups"]), "the other groups are still pruned"
    assert report["macs_ratio"] <= 0.7


def test_random_criterion_seeds(work, capsys):
    src = work / "in" / "model.onnx"
    outs = {}
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        rc, _, err = run_cli(capsys, src, "--target-flops", "0.5", "--criterion", "random", "--seed", seed,
                             "-o", work / f"{name}.onnx", "-q")
        assert rc == 0, err
        outs[name] = (work / f"{name}.onnx").read_bytes()
    assert outs["a"] == outs["b"], "the same seed gives byte-identical files"
    assert outs["a"] != outs["c"], "another seed removes other channels"


def test_default_criterion_is_deterministic(work, capsys):
    src = work / "in" / "model.onnx"
    for name in ("a", "b"):
        rc, _, err = run_cli(capsys, src, "--target-flops", "0.5", "-o", work / f"{name}.onnx")
        assert rc == 0, err
    assert (work / "a.onnx").read_bytes() == (work / "b.onnx").read_bytes()


def test_input_file_unchanged(work, capsys):
    src = work / "in" / "model.onnx"
    digest, mtime = sha256(src), src.stat().st_mtime_ns
    for argv in ([src, "--target-flops", "0.5", "--verify", "--report", work / "r.json"],
                 [src, "--target-params", "0.5", "--uniform", "-o", work / "u.onnx"],
                 ["analyze", src, "--json", work / "a.json"]):
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 0, err
        assert sha256(src) == digest
    assert src.stat().st_mtime_ns == mtime


def test_verify_reports_mask_equivalence(work, capsys):
    rep = work / "report.json"
    rc, out, err = run_cli(capsys, work / "in" / "model.onnx", "--target-flops", "0.5", "--verify",
                           "-o", work / "s.onnx", "--report", rep)
    assert rc == 0, err
    assert re.search(r"mask equivalence holds", out), out
    oracle = json.loads(rep.read_text())["oracle"]
    assert oracle["equivalent"] is True
    assert all(v["max_rel"] <= 1e-4 for k, v in oracle.items() if k.startswith("batch"))


def test_quiet_prints_nothing(work, capsys):
    rc, out, err = run_cli(capsys, work / "in" / "model.onnx", "--target-flops", "0.5", "--quiet", "--verify",
                           "-o", work / "s.onnx")
    assert rc == 0, err
    assert out == "" and err == ""
    assert (work / "s.onnx").is_file()


# --------------------------------------------------------------------------- analyze


def test_analyze_lists_groups_pinned_and_macs(work, capsys):
    src, js = work / "in" / "model.onnx", work / "j" / "analysis.json"
    rc, out, err = run_cli(capsys, "analyze", src, "--json", js)
    assert rc == 0, err
    expected = graphprune.analyze(str(src))
    assert "prunable groups:" in out and "pinned (never removed):" in out and "MACs per layer" in out
    group_lines = re.findall(r"^\s+#\d+\s+\d+ ch\s", out, re.M)
    assert len(group_lines) == len(expected.groups) > 0
    pinned_part = out.split("pinned (never removed):")[1].split("MACs per layer")[0]
    assert re.search(r"\S+\[\d+\] \d+ ch: reaches graph output", pinned_part), pinned_part
    model = onnx.load(src)
    convs = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert all(name in out for name in convs)
    assert listing(work / "in") == {"model.onnx"}

    data = json.loads(js.read_text())
    assert len(data["groups"]) == len(expected.groups)
    assert all(g["members"] and g["channels"] > 0 for g in data["groups"])
    assert data["pinned"] and all(p["reason"] for p in data["pinned"])
    assert set(data["macs_per_node"]) == set(convs)
    assert sum(data["macs_per_node"].values()) == data["macs"] == independent_macs(model)


def test_analyze_shows_why_custom_op_is_pinned(work, capsys):
    path = work / "in" / "custom.onnx"
    onnx.save(custom_act_model(), path)
    rc, out, err = run_cli(capsys, "analyze", path)
    assert rc == 0, err
    pinned_part = out.split("pinned (never removed):")[1]
    assert re.search(r"w1\[0\] 16 ch: .*no op rule for custom::MyRelu", pinned_part), out


# --------------------------------------------------------------------------- help


def test_help_mentions_every_option_and_exit_codes(capsys):
    rc, out, err = run_cli(capsys, "--help")
    assert rc == 0
    from graphprune.cli import build_parser

    declared = {o for a in build_parser()._actions for o in a.option_strings}
    assert set(OPTIONS) <= declared
    for opt in sorted(declared):
        assert re.search(rf"(^|[\s,\[]){re.escape(opt)}\b", out), f"{opt} missing from --help"
    for name in graphprune.criterion_names():
        assert name in out
    assert "analyze" in out
    exit_line = next(line for line in out.splitlines() if "exit code" in line)
    assert re.search(r"\b0\b", exit_line) and re.search(r"\b1\b", exit_line) and re.search(r"\b2 bad input", exit_line)


def test_analyze_help(capsys):
    rc, out, err = run_cli(capsys, "analyze", "--help")
    assert rc == 0
    assert "--json" in out and "--top" in out
