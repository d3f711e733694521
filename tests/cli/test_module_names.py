"""Every ``mae_timm.xxx`` name that a docstring, a comment or a ``--help`` text shows a user exists."""

from __future__ import annotations

import argparse
import importlib
import re
from pathlib import Path

import mae_timm
from mae_timm.cli import COMMANDS, build_parser

NAME = re.compile(r"\bmae_timm(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def _resolves(dotted: str) -> bool:
    """``mae_timm.a.b.C.d``: the longest importable module prefix, then attributes down the rest."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _help_texts():
    """The --help of ``mae-timm`` and of every command (a command's options are added when it is the one asked)."""
    yield build_parser().format_help()
    for name in COMMANDS:
        parser = build_parser([name])
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        yield subparsers.choices[name].format_help()


def test_help_texts_docstrings_and_comments_name_only_what_exists():
    root = Path(mae_timm.__file__).parent
    texts = {f"{path.relative_to(root)}": path.read_text() for path in root.rglob("*.py")}
    texts.update({f"--help {i}": text for i, text in enumerate(_help_texts())})
    assert len(texts) > len(COMMANDS) and not _resolves("mae_timm.engine.config")  # the check can fail
    missing = sorted({f"{where}: {name}" for where, text in texts.items() for name in NAME.findall(text)
                      if not _resolves(name.rstrip("."))})
    assert not missing, missing
