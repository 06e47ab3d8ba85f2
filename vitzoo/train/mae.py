"""Masked autoencoder (MAE, He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

Each image loses a random ``mask_ratio`` of its patches (noise-argsort shuffling, as in the paper); the
encoder, any registry model whose blocks treat tokens as a set, sees the visible patches only
(:meth:`~vitzoo.vit.VisionTransformer.forward_visible`: positions added before the others are dropped,
prefix tokens kept). A small decoder of vitzoo's own blocks puts a shared mask token in each gap, adds
its own position embedding and predicts the pixels of every patch; the loss is the mean squared error on
the masked patches only, against targets normalized per patch (``norm_pix_loss``). The encoder keeps
timm's layout, so its weights load into the registry model as any checkpoint does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Literal, NamedTuple

import torch
from einops import rearrange, repeat
from torch import nn

from vitzoo.blocks.attention import ATTENTIONS
from vitzoo.blocks.encoder import ENCODER_BLOCKS
from vitzoo.blocks.mlp import MLPS
from vitzoo.blocks.norm import NORMS
from vitzoo.blocks.position import POSITIONS
from vitzoo.fields import AT_LEAST_ONE, Range, check_fields, described
from vitzoo.spec import ViTSpec
from vitzoo.subset import subset_problem
from vitzoo.train.objective import Objective
from vitzoo.vit import VisionTransformer

Grid = tuple[int, int]
EVAL_SEED = 0  # the masks of every evaluation batch are drawn from it
# the encoder's parts after its tokens, which MAE never runs (an attention pool, a projector, the pooled norm, a
# feature map's neck, heads): fine-tuning trains them
READOUT = ("neck", "attn_pool", "fc_norm", "head", "head_dist")


@dataclass(frozen=True)
class MaeOptions:
    """The masked autoencoder's own settings (the paper's defaults: 75% masked, an 8-block 512-wide decoder)."""

    mask_ratio: float = described(0.75, "share of each image's patches the encoder does not see",
                                  Range(0, 1, open_low=True))
    decoder_dim: int = described(512, "width of the decoder's tokens", AT_LEAST_ONE)
    decoder_depth: int = described(8, "transformer blocks of the decoder", AT_LEAST_ONE)
    decoder_heads: int = described(16, "attention heads of the decoder's blocks", AT_LEAST_ONE)
    decoder_pos: Literal["sincos2d", "learned"] = described(
        "sincos2d", "the decoder's position embedding: fixed 2-D sine-cosine (the paper's) or learned")
    norm_pix_loss: bool = described(True, "normalize each target patch by its own mean and variance (the paper's "
                                          "better setting)")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.decoder_dim % self.decoder_heads:
            raise ValueError(f"decoder_dim={self.decoder_dim} is not divisible by decoder_heads={self.decoder_heads}; "
                             f"pick a width that is a multiple of the heads")
        if self.decoder_pos == "sincos2d" and self.decoder_dim % 4:
            raise ValueError(f"decoder_pos='sincos2d' needs decoder_dim divisible by 4, got {self.decoder_dim}")


def visible_count(patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees per image: ``patches * (1 - mask_ratio)`` rounded down (the paper's), at least 1."""
    return max(1, int(patches * (1 - mask_ratio)))


class Masking(NamedTuple):
    """One batch's masks: which patches each image keeps, and where each patch sits in the encoder's order."""

    keep: torch.Tensor  # (b, k): the visible patches, in the order the encoder sees them
    restore: torch.Tensor  # (b, n): each patch's place in [visible in keep's order, then masked]

    @property
    def mask(self) -> torch.Tensor:
        """``(b, n)`` True where a patch is hidden from the encoder."""
        return self.restore >= self.keep.shape[1]


def random_masking(
    batch: int, patches: int, mask_ratio: float, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Masking:
    """Noise-argsort shuffling (the paper's): each image draws one uniform number per patch and keeps the
    :func:`visible_count` with the lowest, so exactly that many per image. The numbers come from ``generator``
    (None: the global generator, which a run's checkpoints restore, so a resumed run draws the masks it would
    have drawn)."""
    shuffle = torch.rand(batch, patches, generator=generator, device=device).argsort(dim=1)
    return Masking(shuffle[:, :visible_count(patches, mask_ratio)], shuffle.argsort(dim=1))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``(b, c, H, W) -> (b, h * w, p * p * c)``: each patch's pixels, patches row-major (the decoder's target)."""
    return rearrange(images, "b c (h p1) (w p2) -> b (h w) (p1 p2 c)", p1=patch_size, p2=patch_size)


def unpatchify(patches: torch.Tensor, grid: Grid, patch_size: int) -> torch.Tensor:
    """The inverse of :func:`patchify`: ``(b, h * w, p * p * c) -> (b, c, H, W)``."""
    return rearrange(patches, "b (h w) (p1 p2 c) -> b c (h p1) (w p2)", h=grid[0], w=grid[1], p1=patch_size,
                     p2=patch_size)


def masked_patch_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True,
) -> torch.Tensor:
    """Mean squared error over the masked patches only (``mask`` ``(b, n)``, True where masked); with
    ``norm_pix`` each target patch is first normalized by its own mean and variance. Visible patches are
    copies of the input and would teach nothing, so they do not count."""
    target = target.float()
    if norm_pix:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()


class MaeDecoder(nn.Module):
    """The MAE decoder: encoder tokens projected to its width, a shared learned mask token in each masked place,
    its own position embedding, plain pre-norm blocks (vitzoo's ``prenorm`` block, ``mhsa``, ``gelu``), a norm and
    a linear map to each patch's pixels. Names as in the paper's code (``decoder_embed``, ``mask_token``, ...)."""

    def __init__(self, encoder_dim: int, grid: Grid, num_prefix: int, pixels: int, options: MaeOptions) -> None:
        super().__init__()
        dim, self.grid, self.num_prefix = options.decoder_dim, tuple(grid), num_prefix
        norm = partial(NORMS.build, "layernorm", options=None)
        self.decoder_embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = POSITIONS.build(options.decoder_pos, self.grid, dim, 0)  # the patch tokens' positions
        self.pos_embed = self.position.init_table()
        self.blocks = nn.Sequential(*(
            ENCODER_BLOCKS.build("prenorm", dim, ATTENTIONS.build("mhsa", dim, heads, norm, 0.0, 0.0, i),
                                 MLPS.build("gelu", dim, 4 * dim, norm, 0.0), norm, 0.0)
            for i, heads in enumerate([options.decoder_heads] * options.decoder_depth)
        ))
        self.decoder_norm = norm(dim)
        self.decoder_pred = nn.Linear(dim, pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        VisionTransformer._init_linear(self)

    def forward(self, x: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Encoder tokens ``(b, prefix + k, encoder_dim)`` of the visible patches, in :class:`Masking`'s keep order,
        and its ``restore`` ``(b, n)`` -> the predicted pixels of every patch ``(b, n, pixels)``."""
        x = self.decoder_embed(x)
        prefix, visible = x[:, :self.num_prefix], x[:, self.num_prefix:]
        hidden = repeat(self.mask_token, "1 1 d -> b m d", b=len(x), m=restore.shape[1] - visible.shape[1])
        shuffled = torch.cat([visible, hidden.to(visible.dtype)], dim=1)  # visible first, then the mask tokens
        x = shuffled.gather(1, repeat(restore, "b n -> b n d", d=shuffled.shape[-1]))  # each at its place
        pos = self.position(self.pos_embed, self.grid)
        x = torch.cat([prefix, x + pos.to(x.dtype)], dim=1)
        for block in self.blocks:
            x = block(x, None)
        return self.decoder_pred(self.decoder_norm(x))[:, self.num_prefix:]


class MaskedAutoencoder(nn.Module):
    """A registry encoder and a :class:`MaeDecoder`; ``forward(images)`` is the training loss.

    The training loop reads a model's ``spec``, ``pretrained_cfg``, ``blocks`` and ``no_weight_decay``: they are the
    encoder's (the decoder's mask token and position table also skip weight decay). The state_dict holds the
    encoder under ``encoder.`` and the decoder under ``decoder.``; :attr:`encoder` alone is the pretrained model.
    The encoder's readout (:data:`READOUT`) is frozen here, ``requires_grad`` False: set it back to fine-tune the
    same encoder object in this process (a model loaded from the encoder folder trains all of it).
    """

    def __init__(self, encoder: VisionTransformer, options: MaeOptions = MaeOptions()) -> None:
        problem = subset_problem(encoder.spec)
        if problem:
            raise ValueError(f"MAE runs the encoder on the visible patches only, and this model cannot run on a "
                             f"subset of its patch tokens: {problem}; pretrain a model whose blocks treat tokens as "
                             f"a set (plain ViT blocks with absolute or rotary positions)")
        super().__init__()
        spec = encoder.spec
        self.encoder, self.options = encoder, options
        for name in READOUT:  # frozen: DDP would wait for their gradients; they are saved as initialised
            part = getattr(encoder, name, None)
            if part is not None:
                part.requires_grad_(False)
        self.decoder = MaeDecoder(spec.embed_dim, spec.grid_size, spec.num_prefix_tokens,
                                  spec.patch_size**2 * spec.in_chans, options)

    @property
    def spec(self) -> ViTSpec:
        return self.encoder.spec

    @property
    def pretrained_cfg(self) -> dict:
        return self.encoder.pretrained_cfg

    @property
    def blocks(self) -> nn.Sequential:
        """The encoder's blocks (FSDP shards each)."""
        return self.encoder.blocks

    def no_weight_decay(self) -> set[str]:
        own = {"decoder.mask_token", *(["decoder.pos_embed"] if self.decoder.pos_embed is not None else [])}
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()} | own

    def losses(
        self, images: torch.Tensor, generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Masking]:
        """(loss, predicted pixels of every patch ``(b, n, p * p * c)``, the masks drawn from ``generator``)."""
        p = self.spec.patch_size
        grid = (images.shape[-2] // p, images.shape[-1] // p)
        masking = random_masking(len(images), grid[0] * grid[1], self.options.mask_ratio, generator, images.device)
        pred = self.decoder(self.encoder.forward_visible(images, masking.keep), masking.restore)
        return masked_patch_loss(pred, patchify(images, p), masking.mask, self.options.norm_pix_loss), pred, masking

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The masked-patch loss of a batch. Training draws the masks from the global generator (which a run's
        checkpoints restore); evaluation from one seeded anew for each batch, so every evaluation scores the
        same masks and leaves training's draws alone."""
        generator = None if self.training else torch.Generator(images.device).manual_seed(EVAL_SEED)
        return self.losses(images, generator)[0]

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The images with their masked patches replaced by the prediction (with ``norm_pix_loss``, scaled back by
        each true patch's mean and variance, as the paper shows them)."""
        _, pred, masking = self.losses(images, generator)
        target = patchify(images, self.spec.patch_size)
        if self.options.norm_pix_loss:
            pred = pred * (target.var(dim=-1, keepdim=True) + 1e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        patches = torch.where(rearrange(masking.mask, "b n -> b n 1"), pred.to(target.dtype), target)
        return unpatchify(patches, (images.shape[-2] // self.spec.patch_size, images.shape[-1] // self.spec.patch_size),
                          self.spec.patch_size)


class MaeObjective(Objective):
    """A :class:`MaskedAutoencoder`'s objective for :func:`vitzoo.train.loop.fit`: the model's output is its loss,
    labels play no part, and ``val_loss`` is the masked-patch loss on the held-out images (the same masks at
    every evaluation, see :meth:`MaskedAutoencoder.forward`). The MAE options are its settings, so a resume
    with others is refused."""

    classifies = False
    val_names = ("val_loss",)

    def __init__(self, options: MaeOptions) -> None:
        self.options = options

    @property
    def settings(self) -> dict[str, Any]:
        return asdict(self.options)

    def loss(self, output: Any, images: torch.Tensor, targets: torch.Tensor,
             label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return output, {}

    def val_sums(self, images: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return rearrange(output.double() * len(images), " -> 1").cpu()
