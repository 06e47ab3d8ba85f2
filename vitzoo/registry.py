"""The zoo as data: reads ``registry/*.toml`` into named specs and builds models by name.

A registry file holds a ``[family]`` table (paper, spec and pretrained defaults shared by its
models) and one ``[models.NAME]`` table per model. A model entry is spec fields plus three
reserved keys: ``variant`` (``"S/16"``: a size from the ``[sizes]`` table and a patch size),
``pretrained`` (where its weights come from, their preprocessing and reported accuracy) and
``notes``. See README "Adding a model".
"""

from __future__ import annotations

import fnmatch
import logging
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vitzoo.blocks.pooling import with_global_pool
from vitzoo.errors import did_you_mean
from vitzoo.features import FEATURE_KEYWORDS, FeatureGetter, features_model
from vitzoo.migrate import timm_keywords
from vitzoo.size import MAX_PARAMS
from vitzoo.spec import ViTSpec, merge_fields, set_paths
from vitzoo.vit import VisionTransformer
from vitzoo.weights import from_pretrained, load_pretrained, read_checkpoint
from vitzoo.weights.export import is_folder_path
from vitzoo.weights.hub import tagged_cfg

logger = logging.getLogger("vitzoo")

_PACKAGE_DIR = Path(__file__).resolve().parent
# Wheels carry the registry inside the package; a source checkout keeps it at the top level.
REGISTRY_DIR = next(
    (d for d in (_PACKAGE_DIR / "registry", _PACKAGE_DIR.parent / "registry") if d.is_dir()),
    _PACKAGE_DIR.parent / "registry",
)
RESERVED_KEYS = ("variant", "pretrained", "notes")


@dataclass(frozen=True)
class ModelEntry:
    """One named model: its spec, where its weights come from, and the file that declared it."""

    name: str
    spec: ViTSpec
    pretrained_cfg: dict[str, Any] = field(default_factory=dict)
    family: str = "user"
    paper: str = ""
    notes: str = ""
    source: str = "register_model()"

    @property
    def has_weights(self) -> bool:
        return any(key in self.pretrained_cfg for key in ("hf_hub_id", "url", "file"))


_entries: dict[str, ModelEntry] = {}
_sizes: dict[str, dict[str, Any]] = {}
_loaded = False


def _parse_variant(variant: str, sizes: dict[str, dict[str, Any]], where: str) -> dict[str, Any]:
    size, _, patch = variant.partition("/")
    if size not in sizes or not patch.isdigit():
        raise ValueError(
            f"{where}: variant {variant!r} should be SIZE/PATCH with SIZE one of {sorted(sizes)}"
        )
    return {**sizes[size], "patch_size": int(patch)}


def _entries_from_file(path: Path, sizes: dict[str, dict[str, Any]]) -> list[ModelEntry]:
    data = tomllib.loads(path.read_text())
    family = data.get("family", {})
    out = []
    for name, raw in data.get("models", {}).items():
        where = f"{path.name} [models.{name}]"
        fields = merge_fields(family.get("spec", {}), {k: v for k, v in raw.items() if k not in RESERVED_KEYS})
        if "variant" in raw:
            fields = {**_parse_variant(raw["variant"], sizes, where), **fields}
        try:
            spec = ViTSpec.from_dict(fields)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        out.append(ModelEntry(
            name=name, spec=spec, pretrained_cfg={**family.get("pretrained", {}), **raw.get("pretrained", {})},
            family=family.get("name", path.stem), paper=family.get("paper", ""), notes=raw.get("notes", ""),
            source=str(path.name),
        ))
    return out


def _registry() -> dict[str, ModelEntry]:
    """All entries, reading the TOML files on first use; names registered in code take precedence."""
    global _loaded
    if not _loaded:
        files = sorted(REGISTRY_DIR.glob("*.toml"))
        if not files:
            raise FileNotFoundError(f"no registry files found in {REGISTRY_DIR}; reinstall vitzoo")
        for path in files:
            _sizes.update(tomllib.loads(path.read_text()).get("sizes", {}))
        loaded: dict[str, ModelEntry] = {}
        for path in files:
            for entry in _entries_from_file(path, _sizes):
                if entry.name in loaded:
                    raise ValueError(
                        f"model {entry.name!r} is declared in both {loaded[entry.name].source} and {path.name}"
                    )
                loaded[entry.name] = entry
        _entries.update({k: v for k, v in loaded.items() if k not in _entries})
        _loaded = True
    return _entries


def register_model(
    name: str, spec: ViTSpec | dict[str, Any], pretrained_cfg: dict[str, Any] | None = None,
    *, notes: str = "", overwrite: bool = False,
) -> ModelEntry:
    """Add a model under ``name`` so ``create_model(name)`` builds it."""
    entries = _registry()
    if name in entries and not overwrite:
        raise ValueError(f"model {name!r} already exists ({entries[name].source}); pass overwrite=True")
    spec = spec if isinstance(spec, ViTSpec) else ViTSpec.from_dict(spec)
    entries[name] = ModelEntry(name=name, spec=spec, pretrained_cfg=dict(pretrained_cfg or {}), notes=notes)
    return entries[name]


def unregister_model(name: str) -> ModelEntry:
    """Remove ``name`` from the registry, whether ``register_model``, ``load_registry_file`` or
    ``registry/*.toml`` put it there, and return its entry; an unknown name raises with the closest names.

    ``register_model(..., overwrite=True)`` replaces a model but cannot take one away: a notebook that
    drops a variant it tried, or a test that registered models, uses this to leave the registry as it
    was. The TOML files are not touched, so a zoo model removed here is back in the next process.
    """
    entry = model_entry(name)
    del _registry()[name]
    return entry


def load_registry_file(path: str | Path, *, overwrite: bool = False) -> list[str]:
    """Add the models of a user's TOML file (same layout as ``registry/*.toml``); their names.

    Lets a project keep its own variants, including ones made of blocks it registered with
    ``register_block`` (register the blocks first: entries are validated on reading).
    """
    entries, path = _registry(), Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"registry file {path} does not exist; pass the path of a .toml file")
    _sizes.update(tomllib.loads(path.read_text()).get("sizes", {}))
    new = _entries_from_file(path, _sizes)
    taken = [e.name for e in new if e.name in entries and not overwrite]
    if taken:
        raise ValueError(f"{path.name}: models {', '.join(taken)} already exist; rename them or pass overwrite=True")
    entries.update({e.name: e for e in new})
    return [e.name for e in new]


def list_models(pattern: str | Iterable[str] = "*", pretrained: bool = False) -> list[str]:
    """Sorted model names matching a shell-style pattern (or any of several patterns)."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    return sorted(
        name for name, entry in _registry().items()
        if any(fnmatch.fnmatchcase(name, p) for p in patterns) and (entry.has_weights or not pretrained)
    )


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name raises with the closest names."""
    entries = _registry()
    if name not in entries:
        raise ValueError(f"unknown model {name!r}; {did_you_mean(name, entries)}")
    return entries[name]


def model_spec(name: str, **overrides: Any) -> ViTSpec:
    """The spec of ``name`` with ``overrides`` applied (any ViTSpec field)."""
    spec = model_entry(name).spec
    return spec.replace(**overrides) if overrides else spec


def create_model(
    name: str, pretrained: bool | str = False, *, num_classes: int | None = None,
    img_size: int | tuple[int, int] | None = None, pretrained_cfg_overlay: dict[str, Any] | None = None,
    max_params: int | None = MAX_PARAMS, features_only: bool = False, checkpoint_path: str | None = None,
    **overrides: Any,
) -> VisionTransformer | FeatureGetter:
    """Build a model by registry name, like ``timm.create_model``; ``name.tag`` picks timm's weights of
    that tag (``vit_base_patch16_224.augreg_in21k``), and a ``save_pretrained`` folder is a name too.

    ``num_classes``, ``img_size`` and any other :class:`ViTSpec` field override the entry
    (``mlp="swiglu"``, ``depth=6``, ``attn={"qk_norm": True}``, ``drop={"path": 0.1}``...); timm's keyword
    names for the same settings (``drop_path_rate=0.1``, ``qk_norm=True``, ``init_values=1e-5``,
    ``global_pool="avg"``) work as in timm. ``pretrained`` is False, True
    (the entry's default weights from the Hugging Face hub, or its cache when offline), or a path
    to a weights file or a directory written by ``save_pretrained``; weights are adapted to the
    requested spec and the adaptations are logged. With spec overrides (a swapped block, more
    tokens, another depth) the tensors that still fit load and the rest are logged as new or dropped.
    ``pretrained_cfg_overlay`` replaces entries of the preprocessing config, ``file`` included (timm's
    way of pointing ``pretrained=True`` at a local file). A checkpoint of another implementation
    (torchvision, HF transformers, JAX, vit-pytorch, Meta's Sapiens2) also sets what it implies and no
    tensor size shows (HF's 1e-12 epsilon, its prefix tokens, qkv bias, pooling), unless an override
    says otherwise. ``max_params`` refuses a spec estimated above that many parameters before anything
    is allocated (None: no limit); raise it to build a model larger than the default 10 billion.

    The rest of timm's keywords work as in timm: ``features_only=True`` returns the hidden states of
    ``out_indices`` (default: the last 3 blocks) as maps, with ``feature_info`` (:mod:`vitzoo.features`);
    ``checkpoint_path`` loads a file after building, as strictly as timm; ``pretrained_cfg`` (a dict)
    overlays the preprocessing config; ``act_layer``/``norm_layer`` pick the MLP and norm entries; and
    ``scriptable``/``exportable`` change nothing (the modules are the same either way).

    Every model also takes patch sequences (:mod:`vitzoo.packing`: images at their own size and aspect ratio,
    packed into rows) with its ordinary weights; ``naflex=True`` (timm's ``use_naflex=True``) makes it take images
    of any size too (``dynamic_img_size=True``).
    """
    features = {k: overrides.pop(k) for k in FEATURE_KEYWORDS if k in overrides}
    if features and not features_only:
        raise ValueError(f"{', '.join(features)}: feature options apply with features_only=True")
    if isinstance(overrides.get("pretrained_cfg"), dict):
        pretrained_cfg_overlay = {**overrides.pop("pretrained_cfg"), **(pretrained_cfg_overlay or {})}
    model = _create(name, pretrained, num_classes, img_size, pretrained_cfg_overlay, max_params, overrides)
    if checkpoint_path:
        load_pretrained(model, checkpoint_path)
    return features_model(model, features) if features_only else model


def _create(
    name: str, pretrained: bool | str, num_classes: int | None, img_size: int | tuple[int, int] | None,
    pretrained_cfg_overlay: dict[str, Any] | None, max_params: int | None, overrides: dict[str, Any],
) -> VisionTransformer:
    """The model :func:`create_model` builds before any feature wrapper or later checkpoint."""
    global_pool = overrides.pop("global_pool", None)  # timm's name, read as the model's pooling reads it
    if is_folder_path(name):  # its config.json holds the spec and its weights come along
        if pretrained not in (False, True) or pretrained_cfg_overlay:
            raise ValueError(f"{name} is a save_pretrained folder, which brings its own weights and config; "
                             "pass pretrained=PATH and pretrained_cfg_overlay with a registry name instead")
        sizes = {k: v for k, v in (("num_classes", num_classes), ("img_size", img_size)) if v is not None}
        return from_pretrained(name, max_params=max_params, global_pool=global_pool, **sizes,
                               **timm_keywords(overrides))
    name, _, tag = name.partition(".")
    entry = model_entry(name)
    cfg = {"architecture": name, **entry.pretrained_cfg, **(tagged_cfg(name, tag) if tag else {})}
    cfg.update(pretrained_cfg_overlay or {})
    changes = timm_keywords(overrides, entry.spec.mlp.name_at(entry.spec.depth - 1))
    if num_classes is not None or cfg.get("num_classes", entry.spec.num_classes) != entry.spec.num_classes:
        changes["num_classes"] = cfg["num_classes"] if num_classes is None else num_classes
    if img_size is not None:
        changes["img_size"] = img_size
    checkpoint = read_checkpoint(cfg, pretrained) if pretrained else None
    asked = set_paths(changes) | ({"pool"} if global_pool is not None else set())
    implied = {key: value for key, value in (checkpoint.hints() if checkpoint else {}).items()
               if key not in asked and key.partition(".")[0] not in asked and entry.spec.get(key) != value}
    for key, value in implied.items():
        logger.info("%s: %s=%r, as the checkpoint implies", name, key, value)
    spec = entry.spec.replace(**changes, **implied) if changes or implied else entry.spec
    model = VisionTransformer(with_global_pool(spec, global_pool), pretrained_cfg=cfg, max_params=max_params)
    if checkpoint:
        for line in load_pretrained(model, checkpoint, partial=bool(overrides) or global_pool is not None).adapted:
            logger.info("%s: %s", name, line)
    return model
