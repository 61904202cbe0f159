"""Write docs/api.md, the API reference, from the public face of the package: the names in
``__all__`` of qdworker, qdworker.errors, qdworker.testing and qdworker.web3, with their
signatures and docstrings. Nothing else is public, so nothing else is listed.

    python tools/api_reference.py            # rewrite docs/api.md
    python tools/api_reference.py --check    # exit 1 if docs/api.md is not current

Importing qdworker.web3 validates the web3 settings; when they are not set, placeholders are
used for the import (they appear nowhere in the output).
"""

from __future__ import annotations

import enum
import importlib
import inspect
import os
import sys
import typing
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "api.md"
#: The public modules, in the order the reference lists them.
PUBLIC_MODULES = ("qdworker", "qdworker.errors", "qdworker.testing", "qdworker.web3")
HEADER = """\
# API reference

Generated from the public modules by `python tools/api_reference.py` (a test fails when this
file is not current). These names are the public API; every module whose name starts with an
underscore is private. The settings are in README.rst, the websocket protocol in
[websocket.md](websocket.md), the map of the code in [architecture.md](architecture.md).
"""


def _import_public() -> list[ModuleType]:
    os.environ.setdefault("WEB3_SUPPORTED_CHAINS", "anvil")
    os.environ.setdefault("WEB3_ANVIL_RPC", "http://127.0.0.1:8545")
    os.environ.setdefault("WEB3_SERVER_WALLET_PRIVATE_KEY", "0x" + "01" * 32)  # not a wallet
    return [importlib.import_module(name) for name in PUBLIC_MODULES]


def _doc(obj: object) -> str:
    return inspect.cleandoc(obj.__doc__ or "").strip()


def _annotation(annotation: object) -> str:
    if isinstance(annotation, str):  # postponed (from __future__ import annotations)
        return annotation
    return inspect.formatannotation(annotation)


def _signature(obj: object) -> str:
    """``(a: int = 1, *, b: str = 'x') -> str``, annotations as written in the source."""
    try:
        signature = inspect.signature(obj)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return ""
    params = [
        p.replace(annotation=inspect.Parameter.empty, default=inspect.Parameter.empty)
        for p in signature.parameters.values()
    ]
    text = str(signature.replace(parameters=params, return_annotation=inspect.Signature.empty))
    parts = []
    remaining = iter(signature.parameters.values())
    for piece in text[1:-1].split(", ") if len(text) > 2 else []:
        if piece in ("*", "/"):  # markers, not parameters
            parts.append(piece)
            continue
        param = next(remaining)
        if param.annotation is not inspect.Parameter.empty:
            piece += f": {_annotation(param.annotation)}"
        if param.default is not inspect.Parameter.empty:
            sep = " = " if param.annotation is not inspect.Parameter.empty else "="
            piece += f"{sep}{param.default!r}"
        parts.append(piece)
    result = f"({', '.join(parts)})"
    if signature.return_annotation is not inspect.Signature.empty:
        result += f" -> {_annotation(signature.return_annotation)}"
    return result


def _own_members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties defined by ``cls`` itself, in source order."""
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_") and name not in ("__aenter__", "__enter__", "__call__"):
            continue
        if isinstance(value, staticmethod | classmethod):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((name, value))
    return members


def _entry(module: str, name: str, obj: object) -> list[str]:
    lines = [f"### `{module}.{name}`", ""]
    if inspect.isclass(obj):
        bases = [b.__name__ for b in obj.__bases__ if b is not object]
        kind = "exception" if issubclass(obj, BaseException) else "class"
        head = f"{kind} {name}({', '.join(bases)})" if bases else f"{kind} {name}"
        protocol = getattr(obj, "_is_protocol", False)
        if not (issubclass(obj, BaseException | enum.Enum) or protocol) and "__init__" in vars(obj):
            head = f"{kind} {name}{_signature(obj)}"
        lines += ["```python", head, "```", ""]
        if _doc(obj):
            lines += [_doc(obj), ""]
        for member, value in _own_members(obj):
            if isinstance(value, property):
                lines += [f"- **`{member}`** (property)"]
                doc = _doc(value.fget)
            else:
                lines += [f"- **`{member}{_signature(value)}`**"]
                doc = _doc(value)
            if doc:
                lines += ["", "  " + doc.replace("\n", "\n  ").replace("\n  \n", "\n\n")]
            lines += [""]
    elif callable(obj) and inspect.isfunction(inspect.unwrap(obj)):
        prefix = "async def" if inspect.iscoroutinefunction(obj) else "def"
        lines += ["```python", f"{prefix} {name}{_signature(obj)}", "```", ""]
        if _doc(obj):
            lines += [_doc(obj), ""]
    else:
        shown = obj if typing.get_origin(obj) is not None else repr(obj)
        lines += ["```python", f"{name} = {shown}", "```", ""]
    return lines


def render() -> str:
    """The reference as Markdown (deterministic: same code, same text)."""
    out = [HEADER]
    for module in _import_public():
        out += [f"## `{module.__name__}`", "", _doc(module), ""]
        for name in sorted(module.__all__, key=str.lower):
            out += _entry(module.__name__, name, getattr(module, name))
    return "\n".join(out).rstrip() + "\n"


def main() -> None:
    text = render()
    if "--check" in sys.argv[1:]:
        if OUTPUT.read_text(encoding="utf-8") != text:
            sys.exit("docs/api.md is not current: run python tools/api_reference.py")
        return
    OUTPUT.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
