"""`key=value` command lines over a typed dataclass, for the entry points that are not training
runs (`generate.py`, `python -m train.evaluate`): OmegaConf does the typing, as Hydra does for
the training entries, and the same `_num` range rules apply (`train.config`).

    cfg = parse_cli(EvalConfig, sys.argv[1:], __doc__)   # --help prints the doc and every key

Every bad argument is reported at once (an argument without `=`, an unknown key, a value of the
wrong type, a value out of its range), as one `ValueError` whose lines name the keys; the
caller prints it as its `error:` line.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from typing import Any


def parse_cli(schema: type, argv: list[str], doc: str = "") -> Any:
    """`argv` (`key=value` items, nested keys dotted, lists as `[a,b]`) over `schema`'s
    defaults → an instance of `schema`. `-h`/`--help` prints `doc` and the keys and exits 0."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import section_problems

    if any(a in ("-h", "--help") for a in argv):
        print(help_text(schema, doc))
        raise SystemExit(0)
    base = OmegaConf.structured(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    scalars = {f.name for f in dataclasses.fields(schema) if _is_scalar(f.type)}
    problems, good = [], []
    for arg in argv:
        if "=" not in arg:
            problems.append(f"argument {arg!r}: expected key=value")
            continue
        key, _, value = arg.partition("=")
        key = key.lstrip("-").replace("-", "_")
        # a scalar key takes the text as given (a prompt may hold ": " or "#", which YAML
        # would read as a mapping or a comment); lists and nested keys are parsed
        if key.split(".")[0] not in names:
            problems.append(f"unknown option {key!r}; options: {', '.join(sorted(names))}")
            continue
        item = ({key: value} if key in scalars else OmegaConf.from_dotlist([f"{key}={value}"]))
        try:
            OmegaConf.merge(base, item)
        except OmegaConfBaseException as e:
            problems.append(f"bad override {key}: {str(e).splitlines()[0]} ({key}={value!r})")
            continue
        good.append(item)
    cfg = OmegaConf.to_object(OmegaConf.merge(base, *good))
    problems += section_problems(cfg, schema, "")
    if problems:
        raise ValueError("\n  ".join(problems))
    return cfg


def _is_scalar(kind) -> bool:
    text = str(kind)
    return not any(t in text for t in ("List", "Dict", "list", "dict"))


def help_text(schema: type, doc: str) -> str:
    """`doc`, then one line per key: name, type, default, range."""
    hints = typing.get_type_hints(schema)
    lines = [doc.strip(), "", "keys (key=value):"]
    for f in dataclasses.fields(schema):
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else "required")
        kind = getattr(hints[f.name], "__name__", str(hints[f.name]).replace("typing.", ""))
        rule = f"  ({f.metadata['range']})" if "range" in f.metadata else ""
        lines.append(f"  {f.name:<18} {kind:<22} default {default!r}{rule}")
    return "\n".join(lines)


def fail(message: str, code: int = 2) -> int:
    """Prints `error: message` on stderr; returns `code` for `main` to exit with."""
    print(f"error: {message}", file=sys.stderr)
    return code
