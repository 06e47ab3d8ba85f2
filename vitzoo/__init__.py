"""vitzoo: Vision Transformers from small einops blocks, by name, with timm's weights."""

from vitzoo.ablate import ablate
from vitzoo.blocks import BlockOptions, register_block
from vitzoo.dense import DetectionBackbone, LinearSegmenter, detection_backbone
from vitzoo.export import export
from vitzoo.registry import create_model, list_models, model_entry, model_spec, register_model, unregister_model
from vitzoo.spec import ViTSpec
from vitzoo.timm_compat import from_timm
from vitzoo.train.data import data_config, eval_transform
from vitzoo.vit import VisionTransformer
from vitzoo.weights import export_timm, from_pretrained, save_pretrained

__version__ = "0.2.0"

__all__ = [
    "BlockOptions",
    "DetectionBackbone",
    "LinearSegmenter",
    "ViTSpec",
    "VisionTransformer",
    "ablate",
    "create_model",
    "data_config",
    "detection_backbone",
    "eval_transform",
    "export",
    "export_timm",
    "from_pretrained",
    "from_timm",
    "list_models",
    "model_entry",
    "model_spec",
    "register_block",
    "register_model",
    "save_pretrained",
    "unregister_model",
]
