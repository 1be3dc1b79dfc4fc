"""Weights saved before the anatomy: old key prefixes renamed when a state dict is loaded.

(The anatomy itself, every model's ``encoder``, ``decoder`` and ``head``, is described in
``pixelwise.models``.) Grouping a model's layers into those parts renamed some state-dict keys (e.g.
SegNet's ``classifier.weight`` is now ``head.weight``). A model class that was regrouped lists the
renames in ``OLD_KEYS`` and inherits `LoadsOldKeys`: ``load_state_dict`` then reads weights files and
checkpoints of both layouts, and ``state_dict`` writes the current one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar


def current_key(key: str, renames: Mapping[str, str]) -> str:
    """`key` with its old prefix replaced by the new one (the first prefix of `renames` that matches)."""
    for old, new in renames.items():
        if key.startswith(old):
            return new + key[len(old) :]
    return key


def current_keys(model: Any, keys: Iterable[str]) -> list[str]:
    """The names `keys` (of a state dict saved by any earlier layout of `model`) have in `model` now."""
    renames = getattr(model, "OLD_KEYS", {})
    return [current_key(k, renames) for k in keys]


class LoadsOldKeys:
    """Mixin for an ``nn.Module`` whose state dicts once had other key names.

    Attributes:
        OLD_KEYS: old key prefix -> current prefix, relative to the module, the first match wins.
            No current key may start with an old prefix, so renaming a current state dict is a no-op.
    """

    OLD_KEYS: ClassVar[dict[str, str]] = {}

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        # Runs before the children load (they are handed the renamed keys), so a strict load sees
        # neither missing nor unexpected keys for a file of the old layout.
        for key in [k for k in state_dict if k.startswith(prefix)]:
            new = prefix + current_key(key[len(prefix) :], self.OLD_KEYS)
            if new != key:
                state_dict[new] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[misc]
