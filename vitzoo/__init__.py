"""vitzoo: Vision Transformers from small einops blocks, by name, with timm's weights."""

from vitzoo.ablate import ablate
from vitzoo.blocks import register_block
from vitzoo.registry import create_model, list_models, model_entry, model_spec, register_model
from vitzoo.spec import ViTSpec
from vitzoo.timm_compat import from_timm
from vitzoo.vit import VisionTransformer

__version__ = "0.1.0"

__all__ = [
    "ViTSpec",
    "ablate",
    "VisionTransformer",
    "create_model",
    "from_timm",
    "list_models",
    "model_entry",
    "model_spec",
    "register_block",
    "register_model",
]
