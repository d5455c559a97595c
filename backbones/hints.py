"""'Did you mean' hints for unknown names. backbones/ is the lowest layer that needs one (an unknown timm name), so
the method registry and the run checks take it from here too: one helper, imported downward only."""

from __future__ import annotations

import difflib


def closest_name(name: str, known: list[str]) -> str:
    """' Did you mean X?' hint for an unknown name, or '' when nothing is close."""
    match = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    return f" Did you mean {match[0]!r}?" if match else ""
