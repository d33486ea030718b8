"""Hostile and careless input: every promise of the README, judged by properties.

A corpus of bad inputs, bad outputs and bad flags is built in a temporary folder (none is
checked in as a file). Each case runs the CLI in-process and is judged the same way:

- the exit code is 0 or 2 (never 1, "internal error"), and where the case decides it, that one;
- exit 2 prints exactly one line on stderr (`graphprune: error: ...`), no traceback;
- nothing in the folder changes on failure: the input bytes, special files (FIFOs, sockets,
  symbolic links) and everything else stay as they were, and nothing is created;
- on success only the outputs that were asked for appear or change (plus the model's data file);
- a run never blocks on a FIFO (a watchdog fails the test instead of hanging it).

Two hypothesis fuzzers follow: the loader on mutated bytes of a valid small model, and the
analysis on random small graphs, both bounded so the module stays well under a minute.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from graphprune.cli import main
from graphprune.errors import NothingToPruneError

OPSET = 17
WATCHDOG_S = 60


# --------------------------------------------------------------------------- small models


def _weights(seed: int = 0, dtype=np.float32) -> list[onnx.TensorProto]:
    rng = np.random.default_rng(seed)
    shapes = {"w1": (16, 3, 3, 3), "b1": (16,), "w2": (16, 16, 3, 3), "b2": (16,), "w3": (16, 10), "b3": (10,)}
    return [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(dtype), n) for n, s in shapes.items()]


def conv_net(height="H", width=8, *, seed: int = 0) -> onnx.ModelProto:
    """x[N,3,H,W] -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> MatMul -> Add -> y."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "w3"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "b3"], ["y"], name="fc_bias"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, height, width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])
    graph = helper.make_graph(nodes, "net", [x], [y], _weights(seed))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _save(model: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(model.SerializeToString())
    return path


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name == name)


# --------------------------------------------------------------------------- the corpus


@dataclass
class Case:
    name: str
    build: Callable[[Path], list]  # makes files under root/in and returns the argv
    expect: int | None = None  # the exit code where the case decides it (else 0 or 2)
    pattern: str = ""  # what the error line must say
    outputs: tuple = ()  # paths (relative to root) a successful run may create or change
    check: Callable[[Path], None] | None = None  # more to assert afterwards


CASES: list[Case] = []


def case(name, expect=None, pattern="", outputs=(), check=None):
    def register(build):
        CASES.append(Case(name, build, expect, pattern, tuple(outputs), check))
        return build
    return register


def good(root: Path) -> Path:
    return _save(conv_net(), root / "in" / "model.onnx")


PRUNE = ["--target-flops", "0.6"]


# input files that are not models

@case("empty file", 2, r"not a readable ONNX model|empty graph|not an ONNX model")
def _(root):
    (root / "in" / "m.onnx").write_bytes(b"")
    return [root / "in" / "m.onnx", *PRUNE]


@case("garbage bytes", 2, r"m.onnx")
def _(root):
    (root / "in" / "m.onnx").write_bytes(np.random.default_rng(1).bytes(3000))
    return [root / "in" / "m.onnx", *PRUNE]


@case("truncated model", 2, r"m.onnx")
def _(root):
    data = conv_net().SerializeToString()
    (root / "in" / "m.onnx").write_bytes(data[: len(data) // 2])
    return [root / "in" / "m.onnx", *PRUNE]


@case("a JSON file", 2, r"j.onnx")
def _(root):
    (root / "in" / "j.onnx").write_text('{"graph": {"node": []}}')
    return [root / "in" / "j.onnx", *PRUNE]


@case("input is a directory", 2, r"directory")
def _(root):
    (root / "in" / "d.onnx").mkdir()
    return [root / "in" / "d.onnx", *PRUNE]


@case("input missing", 2, r"no such file")
def _(root):
    return [root / "in" / "missing.onnx", *PRUNE]


@case("input symlink loop", 2, r"loop")
def _(root):
    os.symlink("b.onnx", root / "in" / "a.onnx")
    os.symlink("a.onnx", root / "in" / "b.onnx")
    return [root / "in" / "a.onnx", *PRUNE]


@case("analyze: input symlink to itself", 2, r"loop")
def _(root):
    os.symlink("self.onnx", root / "in" / "self.onnx")
    return ["analyze", root / "in" / "self.onnx"]


@case("input dangling symlink", 2, r"no such file|missing|dangling")
def _(root):
    os.symlink("nowhere.onnx", root / "in" / "m.onnx")
    return [root / "in" / "m.onnx", *PRUNE]


@case("input is a FIFO (must not block)", 2, r"not a regular file|FIFO")
def _(root):
    os.mkfifo(root / "in" / "fifo.onnx")
    return [root / "in" / "fifo.onnx", *PRUNE]


@case("input is a symlink to /dev/null", 2, r"not a regular file|device")
def _(root):
    os.symlink("/dev/null", root / "in" / "null.onnx")
    return ["analyze", root / "in" / "null.onnx"]


@case("a graph with no nodes", 2, r"no nodes|empty graph")
def _(root):
    m = conv_net()
    del m.graph.node[:]
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


# models that are not well formed

@case("a cycle", 2, r"cycle")
def _(root):
    m = conv_net()
    _node(m, "conv1").input[0] = "r2"  # conv1 now reads relu2's output: conv1 -> ... -> relu2 -> conv1
    m.graph.node.append(helper.make_node("Identity", ["x"], ["unused"], name="keep_x"))
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("duplicate tensor names (two producers)", 2, r"duplicate|more than once|twice")
def _(root):
    m = conv_net()
    _node(m, "relu2").output[0] = "r1"  # r1 is produced twice
    _node(m, "pool").input[0] = "r1"
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("node output named like an initializer", 2, r"duplicate|more than once|initializer")
def _(root):
    m = conv_net()
    _node(m, "relu1").output[0] = "w2"
    _node(m, "conv2").input[0] = "w2"
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("analyze: duplicate node outputs", 2, r"duplicate|more than once|twice")
def _(root):
    m = conv_net()
    _node(m, "relu2").output[0] = "r1"
    _node(m, "pool").input[0] = "r1"
    return ["analyze", _save(m, root / "in" / "m.onnx")]


@case("undefined tensor", 2, r"ghost")
def _(root):
    m = conv_net()
    _node(m, "conv2").input[0] = "ghost"
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("missing opset import", 2, r"opset")
def _(root):
    m = conv_net()
    del m.opset_import[:]
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("custom domain without opset import (a warning)", None, r"opset|my\.domain", outputs=("in/m.pruned.onnx",))
def _(root):
    m = conv_net()
    m.graph.node.insert(1, helper.make_node("Act", ["c1"], ["a1"], name="act", domain="my.domain"))
    _node(m, "relu1").input[0] = "a1"
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("unsupported opset", 2, r"opset")
def _(root):
    m = conv_net()
    m.opset_import[0].version = 99
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("unknown op in the default domain (fails onnx.checker)", None, r"checker|NoSuchOp",
      outputs=("in/m.pruned.onnx",))
def _(root):
    m = conv_net()
    m.graph.node.insert(1, helper.make_node("NoSuchOp", ["c1"], ["a1"], name="odd"))
    _node(m, "relu1").input[0] = "a1"
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("negative declared dimension", None, outputs=("in/m.pruned.onnx",))
def _(root):
    m = conv_net()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = -5
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


# weights whose bytes are wrong

@case("raw data of the wrong length", 2, r"w2|bytes")
def _(root):
    m = conv_net()
    t = next(t for t in m.graph.initializer if t.name == "w2")
    t.raw_data = t.raw_data[:-12]
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("typed float_data of the wrong length", 2, r"w2|values")
def _(root):
    m = conv_net()
    t = next(t for t in m.graph.initializer if t.name == "w2")
    values = numpy_helper.to_array(t).ravel()[:-5].tolist()
    t.ClearField("raw_data")
    t.float_data.extend(values)
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("negative initializer dimension", 2, r"b1|negative")
def _(root):
    m = conv_net()
    next(t for t in m.graph.initializer if t.name == "b1").dims[0] = -16
    return ["analyze", _save(m, root / "in" / "m.onnx")]


@case("-o is the empty string", 2, r"empty")
def _(root):
    return [good(root), *PRUNE, "-o", ""]


@case("node names that are not UTF-8", 2, r"UTF-8")
def _(root):
    data = conv_net().SerializeToString()
    data = data.replace(b"relu1", b"\x80elu1", 1)  # same length: the protobuf framing stays valid
    (root / "in" / "m.onnx").write_bytes(data)
    return ["analyze", root / "in" / "m.onnx"]


def _external(root: Path, location: str, offset: int = 0, length: int | None = None) -> Path:
    """The model with w2's data in `location` (relative to the model's folder)."""
    m = conv_net()
    t = next(t for t in m.graph.initializer if t.name == "w2")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length or 16 * 16 * 9 * 4))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return _save(m, root / "in" / "m.onnx")


@case("external data escapes the folder", 2, r"outside|escape")
def _(root):
    (root / "secret.bin").write_bytes(b"\0" * 16 * 16 * 9 * 4)
    return [_external(root, "../secret.bin"), *PRUNE]


@case("external data is a symlink", 2, r"symbolic link")
def _(root):
    (root / "secret.bin").write_bytes(b"\0" * 16 * 16 * 9 * 4)
    os.symlink(root / "secret.bin", root / "in" / "w.bin")
    return [_external(root, "w.bin"), *PRUNE]


@case("external data is a directory", 2, r"directory")
def _(root):
    (root / "in" / "w.bin").mkdir()
    return [_external(root, "w.bin"), *PRUNE]


@case("external data too short", 2, r"short|truncated")
def _(root):
    (root / "in" / "w.bin").write_bytes(b"\0" * 100)
    return [_external(root, "w.bin"), *PRUNE]


@case("external data offset past its end", 2, r"past the end|offset")
def _(root):
    (root / "in" / "w.bin").write_bytes(b"\0" * 100)
    return [_external(root, "w.bin", offset=10_000), *PRUNE]


@case("external data missing", 2, r"missing")
def _(root):
    return [_external(root, "w.bin"), *PRUNE]


@case("-o is the input's external data file", 2, r"w\.bin|input")
def _(root):
    (root / "in" / "w.bin").write_bytes(np.zeros(16 * 16 * 9, np.float32).tobytes())
    return [_external(root, "w.bin"), *PRUNE, "-o", root / "in" / "w.bin"]


@case("--report is the input's external data file", 2, r"w\.bin|input")
def _(root):
    (root / "in" / "w.bin").write_bytes(np.zeros(16 * 16 * 9, np.float32).tobytes())
    return [_external(root, "w.bin"), *PRUNE, "--report", root / "in" / "w.bin"]


# models graphprune cannot work on, said in one line

@case("whole-bf16 model", None, r"bfloat16|bf16", outputs=("in/m.pruned.onnx",))
def _(root):
    m = conv_net()
    del m.graph.initializer[:]
    m.graph.initializer.extend(helper.make_tensor(t.name, TensorProto.BFLOAT16, t.dims,
                                                  numpy_helper.to_array(t).ravel().tolist())
                               for t in _weights())
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.elem_type = TensorProto.BFLOAT16
    return [_save(m, root / "in" / "m.onnx"), *PRUNE]


@case("huge declared height 2^24: analyze", 0)
def _(root):
    return ["analyze", _save(conv_net(height=2**24), root / "in" / "m.onnx")]


@case("huge declared height 2^40: prune", None, outputs=("in/m.pruned.onnx",))
def _(root):
    return [_save(conv_net(height=2**40), root / "in" / "m.onnx"), *PRUNE]


@case("huge declared height 2^24 with --verify (inputs too large to make)", 2, r"too large")
def _(root):
    return [_save(conv_net(height=2**24), root / "in" / "m.onnx"), *PRUNE, "--verify"]


@case("NaN weights with --verify", 2, r"NaN")
def _(root):
    m = conv_net()
    t = next(t for t in m.graph.initializer if t.name == "w3")
    a = numpy_helper.to_array(t).copy()
    a[3, 4] = np.nan
    t.CopyFrom(numpy_helper.from_array(a, "w3"))
    return [_save(m, root / "in" / "m.onnx"), *PRUNE, "--verify"]


@case("Inf weights with --verify", 2, r"Inf|NaN")
def _(root):
    m = conv_net()
    t = next(t for t in m.graph.initializer if t.name == "b3")
    t.CopyFrom(numpy_helper.from_array(np.full(10, np.inf, np.float32), "b3"))
    return [_save(m, root / "in" / "m.onnx"), *PRUNE, "--verify"]


def string_input_net() -> onnx.ModelProto:
    """A float image and a string label: the label gates the classifier output."""
    m = conv_net()
    m.graph.input.append(helper.make_tensor_value_info("label", TensorProto.STRING, ["N"]))
    m.graph.initializer.append(helper.make_tensor("cat", TensorProto.STRING, [], [b"cat"]))
    m.graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], np.int64), "col"))
    m.graph.node.extend([
        helper.make_node("Equal", ["label", "cat"], ["is_cat"], name="eq"),
        helper.make_node("Cast", ["is_cat"], ["gate"], name="cast", to=TensorProto.FLOAT),
        helper.make_node("Reshape", ["gate", "col"], ["gate2"], name="col_gate"),
        helper.make_node("Mul", ["y0", "gate2"], ["y"], name="gated"),
    ])
    _node(m, "fc_bias").output[0] = "y0"
    m.opset_import[0].version = 19  # Equal takes strings from opset 19
    return m


@case("string input with --verify", None, r"string|verify-inputs", outputs=("in/m.pruned.onnx",))
def _(root):
    return [_save(string_input_net(), root / "in" / "m.onnx"), *PRUNE, "--verify"]


# outputs that would destroy something

@case("-o is the input", 2, r"input")
def _(root):
    return [good(root), *PRUNE, "-o", root / "in" / "model.onnx"]


@case("-o is a hard link to the input", 2, r"input")
def _(root):
    src = good(root)
    os.link(src, root / "in" / "link.onnx")
    return [src, *PRUNE, "-o", root / "in" / "link.onnx"]


@case("-o is a symlink to the input", 2, r"input")
def _(root):
    src = good(root)
    os.symlink("model.onnx", root / "in" / "link.onnx")
    return [src, *PRUNE, "-o", root / "in" / "link.onnx"]


@case("--report is the input", 2, r"input")
def _(root):
    return [good(root), *PRUNE, "--report", root / "in" / "model.onnx"]


@case("--report-html is the input", 2, r"input")
def _(root):
    return [good(root), *PRUNE, "--report-html", root / "in" / "model.onnx"]


@case("analyze --json is the input", 2, r"input")
def _(root):
    return ["analyze", good(root), "--json", root / "in" / "model.onnx"]


@case("analyze --json is a symlink to the input", 2, r"input")
def _(root):
    src = good(root)
    os.symlink(src, root / "in" / "a.json")
    return ["analyze", src, "--json", root / "in" / "a.json"]


@case("bench --json is an input model", 2, r"input")
def _(root):
    src = good(root)
    return ["bench", src, "--json", src, "--runs", "1", "--warmup", "0"]


@case("-o equals --report", 2, r"same file|both")
def _(root):
    return [good(root), *PRUNE, "-o", root / "out.onnx", "--report", root / "out.onnx"]


@case("--report equals --report-html through a symlink", 2, r"same file|both")
def _(root):
    (root / "r.json").write_text("{}")
    os.symlink("r.json", root / "r.html")
    return [good(root), *PRUNE, "--report", root / "r.json", "--report-html", root / "r.html"]


@case("--report is the --calib file", 2, r"input|calib")
def _(root):
    np.savez(root / "in" / "calib.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    return [good(root), *PRUNE, "--calib", root / "in" / "calib.npz", "--report", root / "in" / "calib.npz"]


@case("-o is a FIFO", 2, r"FIFO|regular file")
def _(root):
    os.mkfifo(root / "fifo")
    return [good(root), *PRUNE, "-o", root / "fifo"]


@case("-o is a symlink to /dev/null", 2, r"device|regular file")
def _(root):
    os.symlink("/dev/null", root / "null.onnx")
    return [good(root), *PRUNE, "-o", root / "null.onnx"]


@case("-o is a symlink to a FIFO", 2, r"FIFO|regular file")
def _(root):
    os.mkfifo(root / "fifo")
    os.symlink("fifo", root / "out.onnx")
    return [good(root), *PRUNE, "-o", root / "out.onnx"]


@case("--report is a socket", 2, r"socket|regular file")
def _(root):
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    try:  # bind by a short relative name (socket paths are limited to ~100 bytes)
        os.chdir(root)
        sock.bind("sock")
    finally:
        os.chdir(cwd)
    _SOCKETS.append(sock)
    return [good(root), *PRUNE, "--report", root / "sock"]


_SOCKETS: list = []


@case("-o is a dangling symlink", 2, r"symbolic link|dangling|missing")
def _(root):
    os.symlink("nowhere/x.onnx", root / "out.onnx")
    return [good(root), *PRUNE, "-o", root / "out.onnx"]


@case("-o is a symlink loop", 2, r"loop")
def _(root):
    os.symlink("out.onnx", root / "out.onnx")
    return [good(root), *PRUNE, "-o", root / "out.onnx"]


def _written_through(root: Path) -> None:
    assert (root / "link.onnx").is_symlink(), "the symlink itself was replaced"
    onnx.checker.check_model(onnx.load(str(root / "target.onnx")))


@case("-o is a symlink to a regular file (written through)", 0, outputs=("target.onnx",), check=_written_through)
def _(root):
    (root / "target.onnx").write_bytes(b"old")
    os.symlink("target.onnx", root / "link.onnx")
    return [good(root), *PRUNE, "-o", root / "link.onnx"]


@case("-o newdir/ (trailing slash)", 2, r"directory|folder")
def _(root):
    return [good(root), *PRUNE, "-o", str(root / "newdir") + "/"]


@case("-o an existing directory", 2, r"directory|folder")
def _(root):
    (root / "outdir").mkdir()
    return [good(root), *PRUNE, "-o", root / "outdir"]


@case("-o name too long", 2, r"too long")
def _(root):
    return [good(root), *PRUNE, "-o", root / ("m" * 300 + ".onnx")]


@case("-o name that leaves no room for its temporary name", 2, r"too long")
def _(root):
    return [good(root), *PRUNE, "-o", root / ("m" * 245 + ".onnx")]


@case("--report name too long (model not written)", 2, r"too long")
def _(root):
    return [good(root), *PRUNE, "-o", root / "out.onnx", "--report", root / ("r" * 300 + ".json")]


@case("--report under a regular file (model not written)", 2, r"not a (folder|directory)|report")
def _(root):
    (root / "file.txt").write_text("x")
    return [good(root), *PRUNE, "-o", root / "out.onnx", "--report", root / "file.txt" / "r.json"]


@case("--report-html under a regular file (model not written)", 2, r"not a (folder|directory)|report")
def _(root):
    (root / "file.txt").write_text("x")
    return [good(root), *PRUNE, "-o", root / "out.onnx", "--report-html", root / "file.txt" / "r.html"]


@case("-o under a regular file", 2, r"not a (folder|directory)")
def _(root):
    (root / "file.txt").write_text("x")
    return [good(root), *PRUNE, "-o", root / "file.txt" / "out.onnx"]


@case("analyze --json too long", 2, r"too long")
def _(root):
    return ["analyze", good(root), "--json", root / ("a" * 300 + ".json")]


@case("-o in a new folder", 0, outputs=("new", "new/sub", "new/sub/out.onnx"))
def _(root):
    return [good(root), *PRUNE, "-o", root / "new" / "sub" / "out.onnx"]


@case("all outputs at once", 0, outputs=("out.onnx", "r.json", "r.html"))
def _(root):
    return [good(root), *PRUNE, "-o", root / "out.onnx", "--report", root / "r.json", "--report-html",
            root / "r.html", "--verify"]


# bad flags

@case("--seed -5", 2, r"seed|-5")
def _(root):
    return [good(root), *PRUNE, "--seed", "-5"]


@case("--target-flops 0", 2, r"0")
def _(root):
    return [good(root), "--target-flops", "0"]


@case("--target-flops nan", 2, r"nan")
def _(root):
    return [good(root), "--target-flops", "nan"]


@case("--target-flops abc", 2, r"abc")
def _(root):
    return [good(root), "--target-flops", "abc"]


@case("--round-to 0", 2, r"round-to|0")
def _(root):
    return [good(root), *PRUNE, "--round-to", "0"]


@case("an unknown flag", 2, r"--bogus")
def _(root):
    return [good(root), *PRUNE, "--bogus"]


@case("no target", 2, r"target")
def _(root):
    return [good(root)]


@case("--calib missing", 2, r"calib|no such")
def _(root):
    return [good(root), *PRUNE, "--calib", root / "in" / "none.npz"]


@case("--calib garbage", 2, r"calib|c\.npz")
def _(root):
    (root / "in" / "c.npz").write_bytes(b"not an npz")
    return [good(root), *PRUNE, "--calib", root / "in" / "c.npz"]


@case("--calib is a FIFO (must not block)", 2, r"FIFO")
def _(root):
    os.mkfifo(root / "in" / "calib.npz")
    return [good(root), *PRUNE, "--calib", root / "in" / "calib.npz"]


@case("--verify-inputs is a directory", 2, r"directory")
def _(root):
    (root / "in" / "v.npz").mkdir()
    return [good(root), *PRUNE, "--verify-inputs", root / "in" / "v.npz"]


@case("--verify-inputs of the wrong shape", 2, r"x|shape")
def _(root):
    np.savez(root / "in" / "v.npz", x=np.zeros((1, 3), np.float32))
    return [good(root), *PRUNE, "--verify-inputs", root / "in" / "v.npz"]


@case("--verify-inputs holding NaN", 2, r"NaN")
def _(root):
    x = np.zeros((1, 3, 8, 8), np.float32)
    x[0, 0, 0, 0] = np.nan
    np.savez(root / "in" / "v.npz", x=x)
    return [good(root), *PRUNE, "--verify-inputs", root / "in" / "v.npz"]


@case("analyze: --top -3 lists nothing but runs", None)
def _(root):
    return ["analyze", good(root), "--top", "-3"]


@case("bench: a missing model", 2, r"missing|no such")
def _(root):
    return ["bench", root / "in" / "none.onnx", "--runs", "1"]


if os.geteuid() == 0:  # a device node of our own (never the machine's /dev/null)
    @case("-o is a character device node", 2, r"device|regular file")
    def _(root):
        os.mknod(root / "dev.onnx", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        return [good(root), *PRUNE, "-o", root / "dev.onnx"]


# --------------------------------------------------------------------------- the properties


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry below `root` (symbolic links not followed): its kind and content."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st_ = os.lstat(p)
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISREG(st_.st_mode):
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest(), st_.st_ino)
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("special", stat.S_IFMT(st_.st_mode), st_.st_rdev)
    return out


@contextlib.contextmanager
def watchdog(seconds: int):
    def fire(signum, frame):
        raise TimeoutError(f"the run took over {seconds}s (blocked on a FIFO?)")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(capsys, argv) -> tuple[int, str, str]:
    with watchdog(WATCHDOG_S):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = exc.code
    out, err = capsys.readouterr()
    return rc, out, err


def _allowed(rel: str, outputs: tuple) -> bool:
    """An output asked for, or the data file a model output may get (<name>.<token>.data)."""
    return rel in outputs or any(re.fullmatch(re.escape(o) + r"\.[0-9a-f]{8}\.data", rel) for o in outputs)


@pytest.fixture
def root(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # stray files in the working folder show up in the snapshot
    monkeypatch.delenv("GRAPHPRUNE_DEBUG", raising=False)
    yield tmp_path
    while _SOCKETS:
        _SOCKETS.pop().close()


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_hostile_case(c: Case, root: Path, capsys):
    argv = c.build(root)
    before = snapshot(root)
    null_before = os.stat("/dev/null")
    rc, out, err = run_cli(capsys, argv)
    after = snapshot(root)
    assert rc in (0, 2), f"exit {rc}\nstdout: {out[-2000:]}\nstderr: {err}"
    if c.expect is not None:
        assert rc == c.expect, f"exit {rc}, expected {c.expect}\nstdout: {out[-2000:]}\nstderr: {err}"
    assert "Traceback" not in out + err and "internal error" not in err, err
    lines = err.splitlines()
    if rc == 2:
        assert len(lines) == 1, f"exit 2 must print one line on stderr, got:\n{err}"
        assert lines[0].startswith("graphprune: error: "), lines[0]
        if c.pattern:
            assert re.search(c.pattern, lines[0]), f"{c.pattern!r} not in {lines[0]!r}"
        assert after == before, f"a failed run changed the folder: {_diff(before, after)}"
    else:
        if c.pattern and c.expect is None:  # a warning (stdout) or an error must say it
            assert re.search(c.pattern, out + err), f"{c.pattern!r} not in:\n{out}\n{err}"
        changed = _diff(before, after)
        unasked = [rel for rel in changed if not _allowed(rel, c.outputs)]
        assert not unasked, f"created or changed without being asked: {unasked}"
        for rel, entry in before.items():
            if entry[0] in ("special", "link"):
                assert after.get(rel) == entry, f"{rel} ({entry[0]}) was touched"
        if c.check is not None:
            c.check(root)
    null_after = os.stat("/dev/null")
    assert stat.S_ISCHR(null_after.st_mode) and null_after.st_rdev == null_before.st_rdev


def _diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def test_corpus_is_large_enough():
    assert len(CASES) >= 40


@pytest.mark.parametrize("late", ["--report-html", "--report"])
def test_report_failing_late_leaves_no_output(late, root, capsys, monkeypatch):
    """A report that cannot be written after the model was (its folder turned into a file while the run
    went on: a failure no check beforehand can see) takes the model and the other report back out:
    a run that exits 2 leaves no output."""
    import graphprune.report_html as report_html

    render = report_html.render_report_html

    def render_then_break_folder(*args, **kwargs):
        text = render(*args, **kwargs)
        (root / "late").write_text("now a file")  # the folder the late report was to be written in
        return text

    monkeypatch.setattr(report_html, "render_report_html", render_then_break_folder)
    src = good(root)
    before = snapshot(root)
    reports = {"--report": root / "r.json", "--report-html": root / "r.html", late: root / "late" / "r.out"}
    rc, out, err = run_cli(capsys, [src, *PRUNE, "-o", root / "out.onnx",
                                    *[a for flag, p in reports.items() for a in (flag, p)]])
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and "late" in err, err
    after = snapshot(root)
    assert after.pop("late")[0] == "file"
    assert after == before, _diff(before, after)


# --------------------------------------------------------------------------- fuzz: the loader


_VALID = conv_net(height=8).SerializeToString()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_loader_mutated_bytes(tmp_path_factory, data):
    """Mutated bytes of a valid model (flips, cuts, insertions): analyze exits 0 or 2 with one line,
    never an internal error, and leaves the file as it was."""
    raw = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 6), label="mutations")):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "byte"]), label="kind")
        pos = data.draw(st.integers(0, max(len(raw) - 1, 0)), label="pos")
        if kind == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "byte" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
        elif kind == "cut":
            del raw[pos: pos + data.draw(st.integers(1, 64))]
        else:
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    folder = tmp_path_factory.mktemp("fuzz")
    path = folder / "m.onnx"
    path.write_bytes(bytes(raw))
    before = snapshot(folder)
    with watchdog(60):
        import io
        from contextlib import redirect_stderr, redirect_stdout

        err, out = io.StringIO(), io.StringIO()
        with redirect_stderr(err), redirect_stdout(out):
            rc = main(["analyze", str(path)])
    assert rc in (0, 2), err.getvalue()
    if rc == 2:
        assert len(err.getvalue().splitlines()) == 1, err.getvalue()
    assert "internal error" not in err.getvalue()
    assert snapshot(folder) == before


# --------------------------------------------------------------------------- fuzz: the analysis


_UNARY = ["Relu", "Sigmoid", "Tanh", "Identity", "Neg", "Abs"]


@st.composite
def random_graphs(draw) -> onnx.ModelProto:
    """A random small CNN: convolutions (grouped or not), elementwise ops, residual adds, concats and
    pools between the input and one output, with random (possibly huge) declared spatial sizes."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    height = draw(st.sampled_from([4, 8, "H", 2**20, 2**31]))
    nodes, inits = [], []
    tensors = [("x", 4)]  # (name, channels)
    k = 0
    for _ in range(draw(st.integers(1, 7))):
        k += 1
        op = draw(st.sampled_from(["conv", "conv", "unary", "add", "concat", "pool", "bn"]))
        src, ch = tensors[draw(st.integers(0, len(tensors) - 1))]
        out = f"t{k}"
        if op == "conv":
            oc = draw(st.sampled_from([4, 8, 12]))
            groups = draw(st.sampled_from([1, 2, 4])) if ch % 4 == 0 and oc % 4 == 0 else 1
            w = (rng.standard_normal((oc, ch // groups, 3, 3)) * 0.3).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"w{k}"))
            nodes.append(helper.make_node("Conv", [src, f"w{k}"], [out], name=f"conv{k}", pads=[1, 1, 1, 1],
                                          group=groups))
            tensors.append((out, oc))
        elif op == "unary":
            nodes.append(helper.make_node(draw(st.sampled_from(_UNARY)), [src], [out], name=f"u{k}"))
            tensors.append((out, ch))
        elif op == "add":
            same = [t for t in tensors if t[1] == ch]
            other = same[draw(st.integers(0, len(same) - 1))][0]
            nodes.append(helper.make_node("Add", [src, other], [out], name=f"add{k}"))
            tensors.append((out, ch))
        elif op == "concat":
            other, och = tensors[draw(st.integers(0, len(tensors) - 1))]
            nodes.append(helper.make_node("Concat", [src, other], [out], name=f"cat{k}", axis=1))
            tensors.append((out, ch + och))
        elif op == "pool":
            nodes.append(helper.make_node("MaxPool", [src], [out], name=f"pool{k}", kernel_shape=[3, 3],
                                          pads=[1, 1, 1, 1]))
            tensors.append((out, ch))
        else:
            for p, v in (("s", 1.0), ("b", 0.0), ("m", 0.0), ("v", 1.0)):
                inits.append(numpy_helper.from_array((v + 0.1 * rng.standard_normal(ch)).astype(np.float32)
                                                     if p != "v" else np.abs(1 + 0.1 * rng.standard_normal(ch))
                                                     .astype(np.float32), f"{p}{k}"))
            nodes.append(helper.make_node("BatchNormalization", [src, f"s{k}", f"b{k}", f"m{k}", f"v{k}"], [out],
                                          name=f"bn{k}"))
            tensors.append((out, ch))
    last, ch = tensors[-1]
    inits.append(numpy_helper.from_array((rng.standard_normal((5, ch, 1, 1)) * 0.3).astype(np.float32), "head"))
    nodes.append(helper.make_node("Conv", [last, "head"], ["y"], name="head"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, height, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, height, 8])  # every op keeps H x W
    graph = helper.make_graph(nodes, "random", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


@settings(max_examples=80, deadline=None)
@given(random_graphs())
def test_fuzz_analysis_random_graphs(model):
    """The analysis of a random small graph finishes (whatever the declared sizes), every channel of a
    group is a real channel of its tensor, and pruning it keeps the mask-equivalence oracle where the
    graph is small enough to run."""
    import graphprune

    res = graphprune.analyze(model)
    d = res.to_dict()
    assert d["macs"] >= 0 and d["params"] > 0
    for g in res.groups:
        assert g.size >= 1
    height = model.graph.input[0].type.tensor_type.shape.dim[2]
    assert not res.context.report.get("warnings"), res.context.report["warnings"]  # a valid graph
    if res.groups and (height.dim_param or height.dim_value <= 8):
        try:
            result = graphprune.prune(model, target_flops=0.7, verify=True, round_to=1)
        except NothingToPruneError as exc:  # too much pinned for the target: said in one line
            assert "\n" not in str(exc)
            return
        assert result.report["oracle"]["equivalent"], result.report["oracle"]
        onnx.checker.check_model(result.model, full_check=True)
