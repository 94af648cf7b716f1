"""Command-line options written once: a config dataclass's field carries its flag, help and choices (`option`),
and the parser's arguments (`add_arguments`), the parsed values (`values`) and the flags that pass them on to a
child process (`to_argv`) all follow from the dataclass.

A field's flag is `--field-name` unless its metadata names another; a bool field is a switch that turns its
default off or on (`--no-prefix-caching` for a True default); help text may say `{default}`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from typing import Any


def option(default: Any, help: str, *, flag: str | None = None, choices: Iterable | None = None,
           type: type | None = None) -> Any:  # fmt: skip
    """A dataclass field that is also a command-line option (`type`: where the default does not say it)."""
    metadata = {"help": help, "flag": flag, "choices": None if choices is None else list(choices), "type": type}
    return dataclasses.field(default=default, metadata=metadata)


def _options(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def flag(f: dataclasses.Field) -> str:
    name = f.name.replace("_", "-")
    return f.metadata["flag"] or (f"--no-{name}" if f.default is True else f"--{name}")


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, skip: Iterable[str] = ()):
    """One argument per option field of `cls` (except `skip`), its value landing in `args.<field name>`."""
    for f in _options(cls):
        if f.name in skip:
            continue
        text = f.metadata["help"].format(default=f.default).replace("%", "%%")
        if isinstance(f.default, bool):
            action = "store_false" if f.default else "store_true"
            parser.add_argument(flag(f), dest=f.name, action=action, help=text)
        else:
            kind = f.metadata["type"] or type(f.default)
            metavar = None if f.metadata["choices"] else flag(f).removeprefix("--").replace("-", "_").upper()
            parser.add_argument(flag(f), dest=f.name, type=kind, default=f.default, choices=f.metadata["choices"],
                                metavar=metavar, help=text)  # fmt: skip


def values(args: argparse.Namespace, cls: type, skip: Iterable[str] = ()) -> dict[str, Any]:
    """The option fields of `cls` (except `skip`) as parsed: keyword arguments for `cls`."""
    return {f.name: getattr(args, f.name) for f in _options(cls) if f.name not in skip}


def to_argv(config: dict[str, Any], cls: type) -> list[str]:
    """Flags that give a child process's parser the same values (those left at their defaults are left out)."""
    argv = []
    for f in _options(cls):
        value = config.get(f.name, f.default)
        if value is None or value == f.default:
            continue
        argv += [flag(f)] if isinstance(f.default, bool) else [flag(f), str(value)]
    return argv
