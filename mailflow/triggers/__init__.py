"""The registry of triggers. Adding one: a module here plus a template folder."""

from __future__ import annotations

from mailflow.triggers.base import ContextDefaults, Trigger

__all__ = ["ContextDefaults", "Trigger", "get_trigger", "registry"]


def registry() -> dict[str, Trigger]:
    """Every known trigger by name."""
    from mailflow.triggers import abandoned_cart, order_status, weekly_digest, welcome

    return {
        t.name: t
        for t in (
            abandoned_cart.TRIGGER,
            welcome.TRIGGER,
            order_status.TRIGGER,
            weekly_digest.TRIGGER,
        )
    }


def get_trigger(name: str) -> Trigger:
    """The trigger called ``name``; an unknown name is refused with the valid ones."""
    triggers = registry()
    try:
        return triggers[name]
    except KeyError:
        raise KeyError(f"unknown trigger {name!r}; known: {', '.join(sorted(triggers))}") from None
