"""Arms of a compare as a type, parsed once: what is pretrained (or not), with which recipe, under which budget.

Spelling (``--arms``, comma-separated, or a YAML file of the same): ``pretext{setting=value,...}@budget``, e.g.
``mae``, ``mae@compute``, ``mae{mask_ratio=0.9,decoder_depth=1}``, ``mae{blr=3e-3}@wall``.

- pretext: ``raw_pixels``, ``scratch`` (the ``mae`` architecture at random init), ``mae``, ``early_mask``, ``apl``,
  or ``pretext:timm_vit`` (e.g. ``mae:vit_small_patch16_224``);
- settings: a compare pretraining setting (:data:`RECIPE_SETTINGS`) or a keyword of the arm's model (e.g.
  ``decoder_depth``); values are YAML scalars; a model keyword that the model refuses stops the compare before
  any training, in one line;
- budget: ``updates`` (default: ``--updates`` updates), ``compute`` (the FLOPs of ``--updates`` updates of the
  ``mae`` arm), ``wall`` (the wall time of ``--updates`` updates of the ``mae`` arm, from rates measured on this
  machine).

An arm's name is its whole spelling: ``mae{mask_ratio=0.9}`` and ``mae`` are distinct rows and folders.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mae_timm.utils import UserError
from mae_timm.utils.settings import split_outside_braces

__all__ = ["BUDGETS", "BUILTIN_ARMS", "RECIPE_SETTINGS", "REFERENCE", "Arm", "parse_arm", "parse_arms"]

# arm -> registered pretext model; scratch is the mae architecture at random init, raw_pixels the input itself
BUILTIN_ARMS = {"mae": "mae_vit_tiny_patch8_64", "early_mask": "mae_vit_tiny_early_mask", "apl": "apl_vit_tiny_64",
                "scratch": "mae_vit_tiny_patch8_64", "raw_pixels": None}
BUDGETS = ("updates", "compute", "wall")
# the compare settings an arm may set for itself (the rest of its settings are keywords of its model)
RECIPE_SETTINGS = ("batch_size", "blr", "mask_ratio", "norm_pix_loss", "crop_scale_min", "warmup_fraction")
REFERENCE = "mae"  # the arm whose --updates set the compute and wall budgets

_SPELLING = re.compile(r"^(?P<pretext>[A-Za-z0-9_.:\-]+)(?:\{(?P<settings>[^{}]*)\})?(?:@(?P<budget>\w+))?$")


@dataclass(frozen=True)
class Arm:
    """One arm: its name (the whole spelling), pretext, recipe settings and budget rule."""

    name: str
    pretext: str
    settings: dict = field(default_factory=dict, hash=False, compare=False)
    budget: str = "updates"

    @property
    def pretrains(self) -> bool:
        return self.pretext not in ("raw_pixels", "scratch")

    @property
    def recipe(self) -> dict:
        """The settings that replace compare's pretraining settings for this arm."""
        return {k: v for k, v in self.settings.items() if k in RECIPE_SETTINGS}

    @property
    def model_kwargs(self) -> dict:
        """The settings that are keywords of the arm's model."""
        return {k: v for k, v in self.settings.items() if k not in RECIPE_SETTINGS}


def _scalar(arm: str, key: str, text: str):
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if isinstance(value, str):  # YAML 1.1 reads 3e-3 as a string; a number is meant
        try:
            value = float(value) if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", value) else value
        except ValueError:
            pass
    if value is None or isinstance(value, (list, dict)):
        raise UserError(f"arm {arm!r}: setting {key} needs one value (a number, true/false or a word), got {text!r}")
    return value


def parse_arm(spelling: str) -> Arm:
    """``pretext{k=v,...}@budget`` -> :class:`Arm`; anything else is a one-line error naming the choices."""
    name = re.sub(r"\s+", "", spelling)
    match = _SPELLING.match(name)
    pretext = match and match["pretext"]
    if not match or (pretext not in BUILTIN_ARMS and (":" not in pretext or pretext.startswith(":"))):
        raise UserError(f"unknown arm {spelling!r}; choose from {', '.join(BUILTIN_ARMS)} or pretext:encoder, with "
                        "optional {setting=value,...} and @compute or @wall")
    budget = match["budget"] or "updates"
    if budget not in BUDGETS:
        raise UserError(f"arm {spelling!r}: budget must be one of {', '.join('@' + b for b in BUDGETS)}")
    settings = {}
    for item in filter(None, (match["settings"] or "").split(",")):
        key, eq, text = item.partition("=")
        if not eq or not key.isidentifier() or key in settings:
            raise UserError(f"arm {spelling!r}: settings are key=value pairs, each key once; got {item!r}")
        settings[key] = _scalar(spelling, key, text)
    if settings and not (pretext in BUILTIN_ARMS and BUILTIN_ARMS[pretext] is not None) and ":" not in pretext:
        raise UserError(f"arm {spelling!r}: raw_pixels takes no settings")
    if pretext == "scratch" and budget != "updates":
        raise UserError(f"arm {spelling!r}: scratch is not pretrained, so it has no budget")
    return Arm(name, pretext, settings, budget)


def _from_yaml(path: Path) -> list[str]:
    """An arms file: a list whose items are spellings or mappings ``{pretext: mae, settings: {...}, budget: wall}``."""
    try:
        items = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(items, list):
        raise UserError(f"{path}: an arms file is a YAML list of arms")
    spellings = []
    for item in items:
        if isinstance(item, str):
            spellings.append(item)
        elif isinstance(item, dict) and set(item) <= {"pretext", "settings", "budget"} and "pretext" in item:
            settings = item.get("settings") or {}
            values = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items())
            budget = item.get("budget", "updates")
            spellings.append(f"{item['pretext']}{'{' + values + '}' if values else ''}"
                             f"{'' if budget == 'updates' else '@' + str(budget)}")
        else:
            raise UserError(f"{path}: each arm is a spelling or a mapping of pretext, settings, budget; got {item!r}")
    return spellings


def parse_arms(text: str) -> list[Arm]:
    """``--arms``: comma-separated spellings, or the path of an arms YAML file (``.yaml`` / ``.yml``)."""
    path = Path(text.strip())
    spellings = _from_yaml(path) if path.suffix in (".yaml", ".yml") and path.is_file() else split_outside_braces(text)
    if path.suffix in (".yaml", ".yml") and not path.is_file():
        raise UserError(f"arms file {path} does not exist")
    arms = [parse_arm(s) for s in spellings]
    if not arms:
        raise UserError("--arms names no arm")
    names = [arm.name for arm in arms]
    if len(set(names)) < len(names):
        raise UserError(f"--arms names an arm twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    return arms
