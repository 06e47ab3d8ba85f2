"""Finding pretrained weights: timm's Hugging Face hub repos (through the local cache), its plain URLs, or paths."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import huggingface_hub.constants
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from vitzoo.weights.files import WEIGHT_FILES, WeightsError


def resolve_weights(pretrained_cfg: dict, pretrained: bool | str) -> Path:
    """The local file for ``pretrained``: a path as given, or the entry's hub file via the cache.

    Downloads go through ``huggingface_hub``, so ``HF_HOME``, ``HF_HUB_OFFLINE=1`` and an already
    filled cache work as they do for timm. The few weights timm publishes only at a plain URL come
    through torch.hub's cache (:func:`url_weights`).
    """
    if not isinstance(pretrained, bool):
        return Path(pretrained)
    if pretrained_cfg.get("file"):  # pretrained_cfg_overlay=dict(file=...), as in timm
        return Path(pretrained_cfg["file"])
    repo_id = pretrained_cfg.get("hf_hub_id")
    if not repo_id and pretrained_cfg.get("url"):
        return url_weights(pretrained_cfg["url"])
    if not repo_id:
        raise WeightsError(
            f"{pretrained_cfg.get('architecture', 'this model')} has no published weights; "
            "pass pretrained='path/to/weights.safetensors' or pretrained=False"
        )
    offline = False
    for filename in WEIGHT_FILES:
        try:
            return Path(hf_hub_download(repo_id, filename))
        except LocalEntryNotFoundError:
            offline = True
        except EntryNotFoundError:
            continue
    if offline:
        raise WeightsError(
            f"weights {repo_id} are not in the local Hugging Face cache and cannot be downloaded now; "
            "run once with internet access, or pass a local file as pretrained=PATH"
        )
    raise WeightsError(f"hub repo {repo_id} holds none of {', '.join(WEIGHT_FILES)}")


def url_weights(url: str) -> Path:
    """The file of weights published at ``url``, kept where timm keeps it: torch.hub's checkpoint folder
    (``$TORCH_HOME/hub/checkpoints``, named as the URL names it), so a file timm fetched is found without a
    download, and an offline machine (``HF_HUB_OFFLINE=1``) reads it from there."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name
    if path.is_file():
        return path
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise WeightsError(
            f"weights {url} are not in torch.hub's cache ({path}) and HF_HUB_OFFLINE=1 forbids a download; "
            "run once with internet access, or pass a local file as pretrained=PATH"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(path))  # a temporary file, renamed when complete
    except OSError as err:  # urllib.error.URLError included
        raise WeightsError(f"could not download {url} ({err}); pass a local file as pretrained=PATH") from None
    return path


TAG_KEYS = ("hf_hub_id", "url", "num_classes", "mean", "std", "crop_pct", "interpolation")


def tagged_cfg(name: str, tag: str) -> dict:
    """Where timm keeps the weights ``name.tag`` and how their inputs are preprocessed.

    timm's tags (``augreg_in21k``, ``fb_in1k``, ...) name other training runs of one architecture;
    timm's own table maps each to a hub repo, so vitzoo asks it (offline, no download).
    """
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}")
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*")]
        raise WeightsError(f"timm has no weights {name}.{tag}; tags of {name}: {', '.join(tags) or 'none'}")
    out = {key: getattr(cfg, key) for key in TAG_KEYS if getattr(cfg, key, None) is not None}
    return {key: list(v) if isinstance(v, tuple) else v for key, v in out.items()}
