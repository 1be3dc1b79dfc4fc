"""The README's Python examples use only names they define or import (one once used an undefined `x`),
and its library section says how to keep PyTorch's OpenMP threads from spinning on a shared CPU."""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def undefined_names(code: str) -> list[str]:
    """Names read before any statement of the block binds them (top-level code, in order)."""
    bound, missing = set(dir(builtins)), []
    for statement in ast.parse(code).body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in bound:
                missing.append(node.id)
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
    return missing


def test_readme_python_examples_define_every_name_they_use():
    blocks = python_blocks()
    assert blocks
    for code in blocks:
        assert undefined_names(code) == [], code


def test_readme_tells_library_users_about_omp_wait_policy():
    text = README.read_text(encoding="utf-8")
    assert "OMP_WAIT_POLICY=PASSIVE" in text.split("## Models")[0]  # where the library is introduced


def test_the_coming_from_section_runs(tmp_path, monkeypatch, one_thread):
    """The "Coming from smp / torchvision / the Hub" calls run as written (offline: the clone stands in for
    the torch.hub path, and the saved folder goes to a temporary directory), so they cannot go stale."""
    import pytest

    pytest.importorskip("timm")
    pytest.importorskip("huggingface_hub")
    text = README.read_text(encoding="utf-8")
    section = text.split("## Coming from smp / torchvision / the Hub")[1].split("\n## ")[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks and all("path/to/pixelwise" in b for b in blocks)
    monkeypatch.chdir(tmp_path)
    for code in blocks:
        exec(compile(code.replace("path/to/pixelwise", str(README.parent)), "README.md", "exec"), {})
    assert (tmp_path / "my-unet" / "config.json").is_file()
