"""Readers of timm model classes other than ``VisionTransformer``: one module per family, each giving the
:class:`~vitzoo.spec.ViTSpec` of a built instance of its class (see :func:`vitzoo.timm_compat.spec_from_timm`).

Each module defines ``TIMM_CLASS`` (the timm class it reads) and ``spec(model) -> ViTSpec``, which refuses
what vitzoo cannot express with :func:`vitzoo.timm_compat.refuse`; ``READERS`` maps each class to its reader.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from vitzoo.spec import ViTSpec

READERS: dict[type, Callable[[nn.Module], ViTSpec]] = {}

from vitzoo.timm_families import beit, cait, convit, gemma4, mixer, relpos, sam, vlm_towers, xcit  # noqa: E402

READERS.update({module.TIMM_CLASS: module.spec for module in (beit, cait, convit, mixer, relpos, sam, xcit)})
READERS.update(dict.fromkeys(vlm_towers.TIMM_CLASSES, vlm_towers.spec))
READERS.update(dict.fromkeys(gemma4.TIMM_CLASSES, gemma4.spec))
