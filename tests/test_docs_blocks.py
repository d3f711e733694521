"""Every ```python block of README.md and docs/*.md runs as written, so the docs cannot drift from the code.

Each file's blocks run in order in one namespace (a later block may use what an earlier one defined), from a fresh
temporary working directory (files a block writes land there), with the repository root on ``sys.path`` and its
paths reachable as ``REPO`` would be: relative paths in the docs are written from the repository root, so the
temporary directory links the root's top-level entries (``configs``, ``docs``, ``mae_timm`` ...). Blocks fenced
```python no-run (too slow for a CPU in a minute, or needing data or a GPU) are skipped and counted; models that a
block registers with timm are removed again afterwards.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import timm.models._registry as registry

import mae_timm  # noqa: F401  (its models are registered before a block runs; only a block's own are removed)

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python([^\n]*)\n(.*?)^```", re.S | re.M)
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[tuple[int, str, bool]]:
    """(line, source, runs) of every ```python block; ``runs`` is False for ```python no-run."""
    text = path.read_text()
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append((line, match.group(2), "no-run" not in match.group(1).split()))
    return blocks


def test_the_fence_reader_sees_every_block_and_no_run(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("a\n```python\nx = 1\n```\n```python no-run\nslow()\n```\n```bash\nls\n```\n```python\ny = x\n```\n")
    assert python_blocks(doc) == [(2, "x = 1\n", True), (5, "slow()\n", False), (11, "y = x\n", True)]


@pytest.fixture
def docs_cwd(tmp_path, monkeypatch):
    """A fresh cwd that sees the repository's top-level entries as the root does (relative paths in the docs)."""
    for entry in ROOT.iterdir():
        if not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    registered = set(registry._model_entrypoints)
    yield tmp_path
    for name in set(registry._model_entrypoints) - registered:  # a block's @register_model stays in that block
        registry._model_entrypoints.pop(name, None)
        registry._model_to_module.pop(name, None)
        for names in registry._module_to_models.values():
            names.discard(name)
        registry._model_pretrained_cfgs.pop(name, None)
        registry._model_default_cfgs.pop(name, None)
        registry._model_has_pretrained.discard(name)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path, docs_cwd, capsys):
    blocks = python_blocks(path)
    namespace = {"__name__": f"docs_{path.stem}"}
    module_name = namespace["__name__"]
    sys.modules[module_name] = type(sys)(module_name)  # dataclasses and pickling look the module up
    sys.modules[module_name].__dict__.update(namespace)
    namespace = sys.modules[module_name].__dict__
    try:
        for line, source, runs in blocks:
            if not runs:
                continue
            try:
                exec(compile(source, f"{path.relative_to(ROOT)}:{line}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"{path.relative_to(ROOT)}, the ```python block at line {line} fails: "
                                     f"{type(e).__name__}: {e}") from e
    finally:
        sys.modules.pop(module_name, None)
    skipped = sum(not runs for _, _, runs in blocks)
    print(f"{path.name}: {len(blocks) - skipped} blocks ran, {skipped} no-run")
