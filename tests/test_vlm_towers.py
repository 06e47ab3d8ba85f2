"""Vision towers of VLMs (timm's Qwen3Vit* and DeepseekVit*): keys at full size, outputs at small size, the new
entries in another model, from_timm."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
from timm.layers import RmsNorm

import vitzoo
from vitzoo.registry import list_models
from vitzoo.timm_compat import from_timm
from vitzoo.validate import _shapes, _structure_problem
from vitzoo.weights import write_state_dict

NAMES = [n for n in list_models() if n.startswith(("qwen3_vit_", "deepseek_vit_"))]

# one small model per kind: (name, vitzoo overrides, timm keywords), the same architecture on both sides
TABLE = {"pos_embed": {"table_grid": (4, 4)}}  # Qwen's learned table: 4 x 4 for these small models (timm's 48 x 48)
SMALL = {
    "qwen3_vit_88m": ({"img_size": 64, **TABLE}, {"pos_embed_grid_size": 4}),
    "qwen3_vit_88m_merge": ({"img_size": 64, "pool": {"out_features": 32}, **TABLE},
                            {"pos_embed_grid_size": 4, "out_features": 32}),
    "qwen3_vit_88m_enc": ({"img_size": 64, "pool": {"out_features": 32}, **TABLE},
                          {"pos_embed_grid_size": 4, "out_features": 32}),
    "deepseek_vit_412m": ({"img_size": 56}, {}),
    "deepseek_vit_412m_align": ({"img_size": 70, "pool": {"out_features": 32}}, {"out_features": 32}),  # 5x5: padded
    "deepseek_vit_412m_enc": ({"img_size": 84, "pool": {"out_features": 32}}, {"out_features": 32}),
}
TINY = {"depth": 2, "embed_dim": 64, "num_heads": 2}


def test_family_names() -> None:
    assert len(NAMES) == 12


@pytest.mark.parametrize("size", [{}, {"img_size": 448}])
@pytest.mark.parametrize("name", NAMES)
def test_keys_and_shapes_match_timm(name: str, size: dict) -> None:
    """At the default size and another one: Qwen's learned table keeps its 48 x 48 grid whatever the image size."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = timm.create_model(name, **size), vitzoo.create_model(name, **size)
        problem = _structure_problem(_shapes(theirs), _shapes(ours))
    assert not problem


def test_qwen_table_is_resized_in_forward_at_another_img_size() -> None:
    """Built for 32 px images (a 2 x 2 grid), the 4 x 4 table loads as timm's, unresized, and forward resizes it
    as timm's does (bilinear, align_corners), rather than once at load (bicubic)."""
    torch.manual_seed(0)
    reference = timm.create_model("qwen3_vit_88m_enc", img_size=32, pos_embed_grid_size=4, out_features=32,
                                  **TINY).eval()
    model = vitzoo.create_model("qwen3_vit_88m_enc", img_size=32, pool={"out_features": 32}, **TABLE, **TINY).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4


def _twins(name: str, **both: object) -> tuple[torch.nn.Module, vitzoo.VisionTransformer, torch.Tensor]:
    """timm's small model of ``name`` (:data:`SMALL`), vitzoo's holding its weights, and a batch of two images;
    ``both``: timm keywords given to both."""
    ours_kw, theirs_kw = SMALL[name]
    torch.manual_seed(0)
    size = ours_kw["img_size"]
    reference = timm.create_model(name, img_size=size, **TINY, **theirs_kw, **both).eval()
    model = vitzoo.create_model(name, **TINY, **ours_kw, **both).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return reference, model, torch.randn(2, 3, size, size)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_outputs_match_timm(name: str) -> None:
    reference, model, x = _twins(name)
    assert (model.num_features, model.head_hidden_size) == (reference.num_features, reference.head_hidden_size)
    # timm's NLC (projected tokens) is left undeclared: timm's own test of default configs refuses it
    assert getattr(model, "output_fmt", "NLC") == reference.output_fmt
    with torch.no_grad():
        ours, theirs = model(x), reference(x)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() <= 1e-4
        # timm's layout: the patch grid (b, h, w, dim), or a classifier's projected tokens (_merge, _align)
        feats, ref_feats = model.forward_features(x), reference.forward_features(x)
        assert feats.shape == ref_feats.shape and (feats - ref_feats).abs().max() <= 1e-4
        final, _ = model.forward_intermediates(x, indices=1)
        assert torch.equal(final, feats)
        p = model.spec.patch_size * (2 if "qwen" in name else 1)  # Qwen's merger reads whole 2x2 cells
        size = x.shape[-1]
        for shape in [(1, 3, size + p, size + p), (1, 3, size, size + p)]:  # the grid readouts and Qwen's table follow
            other = torch.randn(shape)
            assert (model(other) - reference(other)).abs().max() <= 1e-4


def test_entries_in_another_model() -> None:
    x, small = torch.randn(1, 3, 128, 128), {"depth": 2, "img_size": 128}
    rope = vitzoo.create_model("vit_tiny_patch16_224", rope="axial_half", pool="avg_norm", num_classes=10, **small)
    assert rope(x).shape == (1, 10) and not any("attn_pool" in k for k in rope.state_dict())
    merged = vitzoo.create_model("vit_tiny_patch16_224", class_token=False, num_classes=10, **small,
                                 pool={"name": "merger", "out_features": 48, "readout": "avg_norm"})
    assert merged.head.in_features == 48 and merged(x).shape == (1, 10)
    assert "merger.fc2.weight" in merged.state_dict()
    aligned = vitzoo.create_model("vit_tiny_patch16_224", class_token=False, num_classes=0, **small,
                                  pool={"name": "aligner", "cell": 3, "out_features": 32, "readout": "none"})
    assert aligned(x).shape == (1, 9, 32)  # 8 x 8 patches padded to 3 x 3 cells of 3 x 3
    with pytest.raises(ValueError, match="class_token=False"):
        vitzoo.create_model("vit_tiny_patch16_224", pool="merger", **small)
    with pytest.raises(ValueError, match="divisible by the cell"):
        vitzoo.create_model("vit_tiny_patch16_224", class_token=False, pool="merger", depth=1, img_size=112)
    with pytest.raises(ValueError, match=r"pool='merger' reads 2x2 cells, but the patch grid \(4, 3\)"):  # at 64x48
        vitzoo.create_model("vit_tiny_patch16_224", class_token=False, num_classes=10, dynamic_img_size=True, **small,
                            pool={"name": "merger", "out_features": 48})(torch.randn(1, 3, 64, 48))


def test_timm_classifier_file_loads(tmp_path) -> None:
    """timm's own checkpoint of a classifier name (the tower under ``encoder.``) is read as timm's layout."""
    torch.manual_seed(0)
    reference = timm.create_model("qwen3_vit_88m", img_size=64, pos_embed_grid_size=4, **TINY).eval()
    write_state_dict(reference.state_dict(), tmp_path / "model.safetensors")
    model = vitzoo.create_model("qwen3_vit_88m", pretrained=tmp_path / "model.safetensors", img_size=64, **TABLE,
                                **TINY)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model.eval()(x) - reference(x)).abs().max() <= 1e-4


def test_checkpoint_prefix_round_trip() -> None:
    model = vitzoo.create_model("deepseek_vit_412m", **TINY, img_size=56)
    keys = list(model.state_dict())
    assert all(k.startswith("encoder.") for k in keys)
    twin = vitzoo.create_model("deepseek_vit_412m", **TINY, img_size=56)
    twin.load_state_dict(model.state_dict(), strict=True)
    assert model.pretrained_cfg["first_conv"] == "encoder.patch_embed.proj"


@pytest.mark.parametrize("name,kwargs", [
    ("qwen3_vit_88m_merge", {"img_size": 64, "pos_embed_grid_size": 4, "num_classes": 5, "out_features": 24,
                             "mlp_ratio": 3.0, "rope_temperature": 100.0}),
    ("deepseek_vit_412m_enc", {"img_size": 56, "out_features": 0, "global_pool": "avg", "norm_eps": 1e-5}),
    ("qwen3_vit_88m", {"img_size": 64, "pos_embed_grid_size": 4, "final_norm": False, "num_classes": 3}),
    ("qwen3_vit_88m", {"img_size": 32, "pos_embed_grid_size": 4, "num_classes": 3}),  # the table resized in forward
    ("qwen3_vit_88m_merge", {"img_size": 64, "pos_embed_grid_size": 4, "out_features": 24, "global_pool": ""}),
    ("deepseek_vit_412m", {"img_size": 56, "global_pool": "", "num_classes": 3}),
])
def test_from_timm_round_trip(name: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(name, **TINY, **kwargs).eval()
    model = from_timm(reference).eval()
    x = torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4
    rebuilt = vitzoo.VisionTransformer(vitzoo.ViTSpec.from_dict(model.spec.to_dict()))
    rebuilt.load_state_dict(reference.state_dict(), strict=True)


def test_from_timm_refuses_what_it_cannot_express() -> None:
    reference = timm.create_model("qwen3_vit_88m", **TINY, img_size=64, pos_embed_grid_size=4)
    reference.encoder.blocks[1].norm1 = RmsNorm(TINY["embed_dim"])
    with pytest.raises(ValueError, match="blocks.1.norm1"):
        from_timm(reference)


@pytest.mark.parametrize("name", ["qwen3_vit_88m", "qwen3_vit_88m_merge", "deepseek_vit_412m_align"])
def test_reset_classifier_is_timms(name: str) -> None:
    """timm's global_pool on these classifiers: '' norms each token, 'avg' their mean; the projector and its
    weights stay, forward_features keeps its layout, and the spec rebuilds the model."""
    reference, model, x = _twins(name)
    projector = set(model.attn_pool.parameters())
    for global_pool, classes in [("", 0), ("", 3), ("avg", 5)]:
        reference.reset_classifier(classes, global_pool)
        model.reset_classifier(classes, global_pool)
        model.head.load_state_dict(reference.head.state_dict())
        with torch.no_grad():
            ours, theirs = model(x), reference(x)
            assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1e-4
            assert model.forward_features(x).shape == reference.forward_features(x).shape
    assert set(model.attn_pool.parameters()) == projector  # the same tensors: an optimizer's hold on them stays
    rebuilt = vitzoo.VisionTransformer(vitzoo.ViTSpec.from_dict(model.spec.to_dict()))
    rebuilt.load_state_dict(reference.state_dict(), strict=True)


@pytest.mark.parametrize("global_pool", ["", "avg"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_global_pool_keyword_is_timms(name: str, global_pool: str, tmp_path) -> None:
    """create_model(global_pool=...) builds what timm's does: on a classifier '' norms each token and 'avg' their
    mean, the projector staying; an encoder tower goes without its projector, giving its (b, h, w, dim) grid or
    the grid's plain mean. from_timm reads timm's model back, and a save_pretrained folder of the tower built as
    registered takes the keyword too: the same outputs."""
    reference, model, x = _twins(name, global_pool=global_pool)
    assert model.global_pool == reference.global_pool == global_pool
    ours_kw, _ = SMALL[name]
    vitzoo.save_pretrained(vitzoo.create_model(name, **TINY, **ours_kw), tmp_path)
    saved = vitzoo.create_model(str(tmp_path), global_pool=global_pool).eval()
    saved.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        theirs = reference(x)
        for ours in (model(x), from_timm(reference)(x), saved(x)):
            assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1e-4
        assert model.forward_features(x).shape == reference.forward_features(x).shape


@pytest.mark.parametrize("name", sorted(SMALL))
def test_pruned_head_is_timms(name: str) -> None:
    """prune_intermediate_layers(prune_head=True) as timm's towers do it: the projector goes, a classifier keeps its
    mean and norm over the patch grid, an encoder tower gives the grid (b, h, w, dim)."""
    reference, model, x = _twins(name)
    kept = reference.prune_intermediate_layers(1, prune_head=True)
    assert model.prune_intermediate_layers(1, prune_head=True) == kept
    assert (model.global_pool, model.num_features) == (reference.global_pool, reference.num_features)
    with torch.no_grad():
        feats, ref_feats = model.forward_features(x), reference.forward_features(x)
        assert feats.shape == ref_feats.shape and (feats - ref_feats).abs().max() <= 1e-4
        ours, theirs = model(x), reference(x)
        assert ours.shape == theirs.shape and (ours - theirs).abs().max() <= 1e-4
    rebuilt = vitzoo.VisionTransformer(vitzoo.ViTSpec.from_dict(model.spec.to_dict()))
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_qwen_vl_release_layout_loads_like_timm(tmp_path) -> None:
    """The vision tower of a transformers Qwen3-VL checkpoint (``model.visual.*``: Conv3d patch embedding over 2
    frames, ``pos_embed.weight``, ``linear_fc1/2``, DeepStack projectors, the language model beside it): timm's
    own loader reads it back to timm's model, and vitzoo converts it and gives timm's tokens."""
    from timm.models.qwen3_vit import checkpoint_filter_fn_encoder

    from vitzoo.weights import load_pretrained, write_state_dict

    torch.manual_seed(0)
    reference = timm.create_model("qwen3_vit_88m_enc", **TINY, img_size=64, pos_embed_grid_size=4,
                                  out_features=32).eval()
    upstream = {"model.language_model.embed_tokens.weight": torch.randn(10, 8),
                "model.visual.deepstack_merger_list.0.norm.weight": torch.randn(256)}
    for key, tensor in reference.state_dict().items():
        if key == "patch_embed.proj.weight":  # two temporal slices that sum to the 2-D kernel
            tensor = torch.stack([tensor * 0.25, tensor * 0.75], dim=2)
        elif key == "pos_embed":
            key, tensor = "pos_embed.weight", tensor[0]
        key = key.replace("mlp.fc", "mlp.linear_fc").replace("merger.fc", "merger.linear_fc")
        upstream[f"model.visual.{key}"] = tensor
    timm_read = checkpoint_filter_fn_encoder(upstream, reference)
    assert timm_read.keys() == reference.state_dict().keys()
    write_state_dict(upstream, tmp_path / "qwen3_vl.safetensors")

    model = vitzoo.create_model("qwen3_vit_88m_enc", **TINY, **TABLE, img_size=64, pool={"out_features": 32}).eval()
    report = load_pretrained(model, str(tmp_path / "qwen3_vl.safetensors")).adapted
    assert "Qwen3-VL" in report[0] and "deepstack_merger_list" in report[0]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4


@pytest.mark.parametrize("name", ["deepseek_vit_412m_enc", "deepseek_vit_412m"])
def test_deepseek_release_layout_loads_like_timm(tmp_path, name: str) -> None:
    """DeepSeek-V4's release: the tower under ``vision.`` (a linear patch embedding over flattened ``(c p p)``
    patches, ``wqkv``/``wo``, ``w1``/``w2``), ``aligner.w1/w2``, and the language model at the top level, whose
    ``norm``/``head`` collide with timm's names. timm's loader reads it to timm's model; ``create_model(pretrained=
    FILE)`` converts it and gives timm's outputs, for the classifier name (without the aligner) too."""
    from einops import rearrange
    from timm.models.deepseek_vit import checkpoint_filter_fn_classifier, checkpoint_filter_fn_encoder

    from vitzoo.weights import write_state_dict

    torch.manual_seed(0)
    source = timm.create_model("deepseek_vit_412m_enc", **TINY, img_size=84, out_features=32)
    upstream = {"embed.weight": torch.randn(10, 8), "norm.weight": torch.randn(8), "head.weight": torch.randn(10, 8)}
    for key, tensor in source.state_dict().items():
        if key == "patch_embed.proj.weight":
            tensor = rearrange(tensor, "d c p1 p2 -> d (c p1 p2)")
        for theirs, ours in (("attn.qkv.", "attn.wqkv."), ("attn.proj.", "attn.wo."), ("mlp.fc", "mlp.w"),
                             ("aligner.fc", "aligner.w")):
            key = key.replace(theirs, ours)
        upstream[key if key.startswith("aligner.") else f"vision.{key}"] = tensor.normal_(std=0.1)
    write_state_dict(upstream, tmp_path / "deepseek_v4.safetensors")

    ours, theirs = SMALL[name]
    ours, theirs = {**ours, "img_size": 84}, {**theirs, "img_size": 84}
    reference = timm.create_model(name, **TINY, **theirs).eval()
    read = (checkpoint_filter_fn_encoder if name.endswith("_enc") else checkpoint_filter_fn_classifier)(
        upstream, reference)
    reference.load_state_dict(read, strict=True)
    model = vitzoo.create_model(name, pretrained=str(tmp_path / "deepseek_v4.safetensors"), **TINY, **ours).eval()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        assert (model(x) - reference(x)).abs().max() <= 1e-4
