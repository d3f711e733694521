"""Every option of every subcommand says what it does in its help (taken from its config field's comment)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import pytest

from mae_timm.cli import COMMANDS, build_parser
from mae_timm.utils.settings import add_config_arguments, field_comments


def _described(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):  # shards tiny-imagenet|imagefolder|...|verify
            found += [a for child in action.choices.values() for a in _described(child)]
        elif action.option_strings and action.help != argparse.SUPPRESS and action.dest != "help":
            found.append(action)
    return found


def options(command: str) -> list[argparse.Action]:
    parser = build_parser([command])
    return _described(next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_a_description(command):
    undescribed = [a.option_strings[-1] for a in options(command) if not a.help or a.help.startswith("default:")]
    assert options(command) and undescribed == [], f"{command}: options without a description: {undescribed}"


@dataclass
class Example:
    # a comment above the field
    # over two lines
    above: int = 1
    trailing: float = 0.5  # a trailing comment, 50 % of it
    bare: str = "x"


def test_help_comes_from_the_fields_comment():
    assert field_comments(Example) == {"above": "a comment above the field over two lines",
                                       "trailing": "a trailing comment, 50 % of it"}
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, Example)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["above"] == "a comment above the field over two lines (default: 1)"
    assert helps["trailing"] == "a trailing comment, 50 %% of it (default: 0.5)"  # argparse's escape of %
    assert helps["bare"] == "default: x"
    parser.format_help()  # formats with the escaped %
