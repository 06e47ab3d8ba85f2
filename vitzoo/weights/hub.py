"""Finding pretrained weights: timm's Hugging Face hub repos (through the local cache) or paths."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

from vitzoo.weights.files import WEIGHT_FILES, WeightsError


def resolve_weights(pretrained_cfg: dict, pretrained: bool | str) -> Path:
    """The local file for ``pretrained``: a path as given, or the entry's hub file via the cache.

    Downloads go through ``huggingface_hub``, so ``HF_HOME``, ``HF_HUB_OFFLINE=1`` and an already
    filled cache work as they do for timm.
    """
    if not isinstance(pretrained, bool):
        return Path(pretrained)
    repo_id = pretrained_cfg.get("hf_hub_id")
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
