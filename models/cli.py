"""Command lines generated from configuration dataclasses: each field is declared once.

A field's flag is its name with dashes (--batch-size); its type, default and help come from the
field. `option` adds what the annotation cannot say (help text, choices, a checked type, a group):

    @dataclass
    class Config:
        epochs: int = option(20, "passes over the data", type=POSITIVE_INT)
        rules: tuple[str, ...] = option(("bp", "fa"), choices=RULES)

bool fields become --flag / --no-flag, tuples take several values, `T | None` fields default to None
(their help says what None means), and a field without a default is a required flag (or a positional
argument with option(positional=True)).

Every such command line also takes `--import MODULE` (any number of times): the module is imported before the
flags are read, so a feedback rule it registers (circuits.rules.register) is a choice of --rules:

    python -m models.compare --import mymodule --rules bp partial     # mymodule.py in the current folder
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import math
import os
import sys
import types
import typing
from typing import Any, Callable, Sequence, TypeVar

C = TypeVar("C")


def checked(kind: Callable[[str], Any], test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """An argparse type: `kind` of the text, refused (an argparse error naming the flag) unless `test` holds."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value
    return parse


POSITIVE_INT = checked(int, lambda v: v > 0, "a positive integer")
COUNT = checked(int, lambda v: v >= 0, "a non-negative integer")
POSITIVE = checked(float, lambda v: math.isfinite(v) and v > 0, "a positive number")
NON_NEGATIVE = checked(float, lambda v: math.isfinite(v) and v >= 0, "a non-negative number")


def within(low: float, high: float | None = None, *, kind: Callable[[str], Any] = float) -> Callable[[str], Any]:
    """An argparse type: `kind` of the text in [low, high) (a decay or momentum below 1), or at least `low`
    if `high` is None; e.g. option(0.9, type=within(0, 1)) refuses --momentum 5 when the command line is read."""
    noun = "an integer" if kind is int else "a number"
    what = f"{noun} in [{low:g}, {high:g})" if high is not None else f"{noun} of at least {low:g}"
    return checked(kind, lambda v: math.isfinite(v) and low <= v and (high is None or v < high), what)


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           choices: Sequence[Any] | Callable[[], Sequence[Any]] | None = None,
           type: Callable[[str], Any] | None = None, group: str | None = None, positional: bool = False,
           cli: bool = True, empty: bool = False) -> Any:
    """A dataclass field with what its command-line flag needs beyond the annotation. `choices` may be a function,
    asked when the parser is made (e.g. the rules registered by then); `cli=False`: no flag; `empty`: a tuple flag
    may be given no values (a tuple with a default of values otherwise needs at least one)."""
    metadata = dict(help=help, choices=choices, type=type, group=group, positional=positional, cli=cli, empty=empty)
    if isinstance(default, (list, dict, set)):
        raise TypeError("a mutable default: use a tuple")
    return dataclasses.field(default=default, metadata=metadata)


def _value_type(annotation: Any) -> tuple[Any, bool, bool]:
    """(the type of one value, optional, several values) of an annotation such as `tuple[int, ...] | None`."""
    args = typing.get_args(annotation)
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        annotation = next(a for a in args if a is not type(None))
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], optional, True
    return annotation, optional, False


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """One argument per field of the dataclass `config`, in field order, in its group if it names one."""
    hints = typing.get_type_hints(config)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(config):
        meta = {"help": "", "choices": None, "type": None, "group": None, "positional": False, "cli": True,
                "empty": False, **f.metadata}
        if not meta["cli"]:
            continue
        target = parser if meta["group"] is None else groups.setdefault(
            meta["group"], parser.add_argument_group(meta["group"]))
        kind, optional, several = _value_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": meta["help"] or None}
        required = f.default is dataclasses.MISSING
        if not required:
            kwargs["default"] = list(f.default) if several and f.default is not None else f.default
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["type"] or kind
            kwargs["choices"] = meta["choices"]() if callable(meta["choices"]) else meta["choices"]
            if several:
                kwargs["nargs"] = "*" if meta["empty"] or (not required and not f.default) else "+"
        if meta["positional"]:
            target.add_argument(f.name, **kwargs)
        else:
            target.add_argument("--" + f.name.replace("_", "-"), dest=f.name, required=required, **kwargs)


def import_modules(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> list[str]:
    """Add `--import MODULE` to `parser` and import the modules the command line names, before its other flags are
    read. The current folder is searched after the installed packages, so a user's own models.py shadows nothing."""
    help = "import MODULE first (a module in the current folder or installed), e.g. one that registers a rule"
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE", help=help)
    early = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    early.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    names = early.parse_known_args(argv)[0].imports
    folder = os.getcwd()
    if names and folder not in sys.path:
        sys.path.append(folder)
    for name in names:
        if name.endswith(".py"):
            parser.error(f"--import {name}: give the module's name ({name[:-3]}), not its file")
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not (name == e.name or name.startswith(e.name + ".")):
                raise               # the module was found, and something it imports is missing: its own error
            parser.error(f"--import {name}: no module {name!r} in {folder} or among the installed packages")
    return names


def parse(config: type[C], argv: Sequence[str] | None, parser: argparse.ArgumentParser) -> tuple[C, argparse.Namespace]:
    """The command line into an instance of the dataclass `config` (its fields added to `parser` first, after the
    modules of `--import` are imported: import_modules), and the namespace, which also holds any arguments the caller
    added to `parser` beyond the fields."""
    import_modules(parser, argv)
    add_options(parser, config)
    args = parser.parse_args(argv)
    hints = typing.get_type_hints(config)
    values = {}
    for f in dataclasses.fields(config):
        if f.name in vars(args):
            value = getattr(args, f.name)
            values[f.name] = tuple(value) if _value_type(hints[f.name])[2] and value is not None else value
    return config(**values), args
