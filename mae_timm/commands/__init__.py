"""Subcommands of ``mae-timm``: each module has ``add_arguments(parser, name)`` and ``run(args, name) -> int``."""
