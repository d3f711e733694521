"""The ``mae-timm`` command.

Each subcommand lives in its own module under ``mae_timm/commands/`` and provides
``add_arguments(parser, name)`` and ``run(args, name) -> int`` (``name`` is the subcommand, so one module can
serve several, as ``evaluate`` does for knn / linprobe / finetune). Modules are imported only when their
subcommand runs, so ``mae-timm --help`` stays fast and optional extras stay optional.

This is the one place that turns errors a user can cause (``mae_timm.utils.USER_ERRORS``: ``UserError`` and other
``ValueError``s, a missing, clashing or unreadable file, a non-finite loss) into one line on stderr and exit code 2;
commands let them propagate, and anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module under mae_timm.commands, one-line help)
COMMANDS = {
    "shards": ("shards", "convert a dataset (tiny-imagenet, imagefolder, fashion-mnist) to WebDataset shards"),
    "pretrain": ("pretrain", "pretrain a registered pretext model (mae_*, apl_*) on shards or synthetic data"),
    "knn": ("evaluate", "k-nearest-neighbour accuracy of a checkpoint's encoder"),
    "linprobe": ("evaluate", "linear probe (frozen encoder, BatchNorm + linear)"),
    "finetune": ("evaluate", "fine-tune the encoder as a timm VisionTransformer"),
    "visualize": ("visualize", "write an original | masked | reconstruction figure for an image"),
    "export": ("export", "export the encoder as a timm local-dir folder (or a transformers folder, or safetensors)"),
    "compare": ("compare", "does pretraining help on these images? arms x seeds, hold-out choices, test once"),
    "demo": ("demo", "a small compare of raw pixels, scratch and MAE on bundled Fashion-MNIST images, with figures"),
}


def _load(module_name: str):
    return importlib.import_module(f"mae_timm.commands.{module_name}")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mae-timm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = None
    if argv:
        wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # only the chosen subcommand imports its module (and its optional dependencies)
        if name == wanted:
            _load(module_name).add_arguments(p, name)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.version:
        from mae_timm import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    module = _load(COMMANDS[args.command][0])
    from mae_timm.utils import USER_ERRORS

    try:
        return int(module.run(args, args.command) or 0)
    except USER_ERRORS as e:
        # errors a user can cause (bad settings, missing or clashing files, a diverged run) are one line
        print(f"mae-timm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
