"""The README's Python examples run as written, so the docs cannot rot."""
from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples():
    blocks = python_blocks()
    assert len(blocks) >= 4
    text = README.read_text()
    assert "graphprune MODEL --target-flops" in text and "pytest" in text


def test_readme_python_examples_run(tmp_path, monkeypatch, capsys):
    import graphprune.passes.criteria as criteria

    monkeypatch.chdir(tmp_path)
    before = dict(criteria.CRITERIA)
    namespace: dict = {}
    try:
        for block in python_blocks():
            exec(compile(block, str(README), "exec"), namespace)
    finally:
        criteria.CRITERIA.clear()
        criteria.CRITERIA.update(before)
    out = capsys.readouterr().out
    assert "no op rule for custom::MyAct" in out
    assert (tmp_path / "model.pruned.onnx").exists()
    assert namespace["group_sizes"] and all(n > 0 for n in namespace["group_sizes"])
