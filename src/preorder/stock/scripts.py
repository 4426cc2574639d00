"""The Lua scripts of the stock protocol, read from stock/lua/."""

from __future__ import annotations

from importlib import resources


def script_text(name: str) -> str:
    return resources.files("preorder.stock").joinpath("lua", name).read_text()
