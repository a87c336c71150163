"""Mixer registry. Every module in this folder is imported so that its
`@register(kind)` runs: adding a mixer is adding a file."""
import importlib
import pkgutil

from loom.models.mixers.base import MIXERS, Mixer, MixerDims, SeqContext, register

for _m in pkgutil.iter_modules(__path__):
    if _m.name not in ("base",):
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["MIXERS", "Mixer", "MixerDims", "SeqContext", "register"]
