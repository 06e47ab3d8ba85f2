"""``vitzoo validate``: prove that a registry model is its timm namesake, or locate where it is not.

For one name: state_dict keys and shapes at full size (on the ``meta`` device, so free), then fp32
numerics with timm's random weights loaded strictly: logits, ``forward_features`` and the hidden
state after every block, so a mismatch points at the first block that differs. Models too big for
a quick CPU run are compared at reduced depth (the same ``depth=`` on both sides). ``--all`` does
this for every name of each timm class vitzoo follows (:data:`SWEEPS`: ``VisionTransformer``, ``Eva``,
``NaFlexVit``, ``Beit``, ...) and writes a Markdown coverage report with the total per class; ``--classes``
reruns some classes and keeps the others' results. NaFlexVit names are also compared on patch sequences
(:mod:`vitzoo.packing`): images of three sizes one per row as timm takes them, and the same images packed into
one row.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from vitzoo.choice import PER_LAYER_SLOTS
from vitzoo.errors import did_you_mean
from vitzoo.packing import output_order, pack_images
from vitzoo.registry import create_model, list_models, model_spec
from vitzoo.spec import ViTSpec
from vitzoo.timm_compat import can_read, from_timm

TOL = 1e-4
FULL_DEPTH_MAX_PARAMS = 100_000_000  # above this, numerics run at AUTO_DEPTH blocks
AUTO_DEPTH = 2
SEQUENCE_GRIDS = ((7, 5), (12, 20), (3, 3))  # patch grids of the images a NaFlexVit is compared on
SUITE_HEADING = "## timm's own model tests"  # the section of docs/parity.md that tests/upstream writes
# per-layer spec options: timm's keyword for each, and how the per-layer values become its argument
PER_LAYER_TIMM_KWARGS: dict[str, tuple[str, Any]] = {
    "attn.kv_heads": ("num_kv_heads", tuple),
    "attn.window": ("global_attn_indexes", lambda windows: tuple(i for i, s in enumerate(windows) if s == 0)),
}
# timm classes whose model functions fix the number of blocks themselves (MlpMixer's pass num_blocks=..., so no
# keyword can change it): compared at reduced depth, they are built whole and cut with prune_intermediate_layers
TIMM_FIXED_DEPTH: tuple[type, ...] = (timm.models.mlp_mixer.MlpMixer,)


@dataclass
class Validation:
    """The outcome for one name: ``ok`` when keys, shapes and every compared output agree."""

    name: str
    ok: bool = False
    reason: str = ""
    depth: int | None = None  # blocks compared numerically (None: not compared)
    full_depth: int = 0
    diffs: dict[str, float] = field(default_factory=dict)  # output -> max |vitzoo - timm|
    block_diffs: list[float] = field(default_factory=list)  # per block hidden state

    @property
    def worst(self) -> float | None:
        values = list(self.diffs.values()) + self.block_diffs
        return max(values) if values else None


@dataclass(frozen=True)
class Sweep:
    """The timm names ``--all`` compares for one timm model class: the section of the report that gives its total."""

    title: str  # the timm class, as the report's section heading names it
    modules: tuple[str, ...]  # the timm.models modules whose names are listed
    classes: tuple[str, ...]  # the names kept are those built as one of these classes (or a subclass)
    about: str  # what these models are, for the summary line


SWEEPS = (
    Sweep("VisionTransformer", ("vision_transformer", "deit", "vision_transformer_hybrid", "vitamin"),
          ("VisionTransformer",), "DeiT's distilled subclass included"),
    Sweep("Eva", ("eva",), ("Eva",),
          "EVA-02, DINOv3, ROPE-ViT, Perception Encoder, ...: 2-D RoPE, SwiGLU, EVA attention"),
    Sweep("NaFlexVit", ("naflexvit",), ("NaFlexVit",),
          "images at their own size and aspect ratio; also compared on patch sequences"),
    Sweep("Beit", ("beit",), ("Beit",), "BEiT and BEiT v2: a relative position bias table in every attention"),
    Sweep("VisionTransformerRelPos", ("vision_transformer_relpos",), ("VisionTransformerRelPos",),
          "relative position bias or relative-position MLP in attention"),
    Sweep("Cait", ("cait",), ("Cait",), "talking-heads attention, LayerScale, class-attention blocks"),
    Sweep("ConVit", ("convit",), ("ConVit",), "gated positional self-attention in the first blocks"),
    Sweep("VisionTransformerSAM", ("vision_transformer_sam",), ("VisionTransformerSAM",),
          "Segment Anything's image encoder: windowed attention, decomposed relative positions, a conv neck"),
    Sweep("Xcit", ("xcit",), ("Xcit",), "cross-covariance attention, local patch interaction, class attention"),
    Sweep("MlpMixer", ("mlp_mixer",), ("MlpMixer",),
          "MLP-Mixer, gMixer, ResMLP, gMLP: token-mixing MLPs in place of attention"),
    Sweep("Qwen3Vit", ("qwen3_vit",), ("Qwen3VitClassifier", "Qwen3VitEncoder"), "Qwen3-VL's vision tower"),
    Sweep("Gemma4Vit", ("gemma4_vit",), ("Gemma4VitClassifier", "Gemma4VitEncoder"), "Gemma 4's vision tower"),
    Sweep("DeepseekVit", ("deepseek_vit",), ("DeepseekVitClassifier", "DeepseekVitEncoder"), "DeepSeek's vision tower"),
)


def sweep_names(sweep: Sweep) -> list[str]:
    """Every timm model name of ``sweep``'s modules whose model is one of its classes."""
    names = sorted({n for module in sweep.modules for n in timm.list_models(module=module)})
    out = []
    for name in names:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if any(cls.__name__ in sweep.classes for cls in type(timm.create_model(name)).__mro__):
                out.append(name)
    return out


def sequence_diffs(model: nn.Module, reference: nn.Module) -> dict[str, float]:
    """max |vitzoo - timm| of the logits of images of three sizes as patch sequences: one image per row (timm's
    batch), and the three packed into one row (vitzoo's, against timm's outputs of the images one per row)."""
    p = model.spec.patch_size
    torch.manual_seed(2)
    images = [torch.randn(model.spec.in_chans, h * p, w * p) for h, w in SEQUENCE_GRIDS]
    rows, _ = pack_images(images, p)
    packed, placements = pack_images(images, p, seq_len=sum(h * w for h, w in SEQUENCE_GRIDS))
    with torch.no_grad():
        theirs = reference(rows)
        return {"sequence": (model(rows) - theirs).abs().max().item(),
                "packed": (model(packed) - theirs[output_order(placements)]).abs().max().item()}


def eva_gap(model: nn.Module) -> str:
    """The first part of a timm ``Eva`` that vitzoo has no block for (what keeps a name out of the registry)."""
    block = model.blocks[0]
    attn, rope = block.attn, model.rope
    if type(block).__name__ != "EvaBlock":
        return f"blocks.0 is {type(block).__name__}"
    if getattr(attn, "gate", None) is not None:
        return "blocks.0.attn has an output gate"
    if rope is not None and type(rope).__name__ not in ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3"):
        return f"rope is {type(rope).__name__} (learned per-layer frequencies)"
    return "a combination of known blocks not yet registered"


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _structure_problem(theirs: dict, ours: dict) -> str:
    missing, extra = sorted(set(theirs) - set(ours)), sorted(set(ours) - set(theirs))
    shapes = sorted(k for k in set(theirs) & set(ours) if theirs[k] != ours[k])
    parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
             for label, keys in (("missing", missing), ("unexpected", extra), ("shape differs", shapes)) if keys]
    return "; ".join(parts)


def _blocks(model: nn.Module) -> nn.Module:
    """The encoder blocks, also of a timm class that wraps its tower as ``encoder`` (the VLM-tower classifiers)."""
    if hasattr(model, "blocks"):
        return model.blocks
    return getattr(getattr(model, "encoder", None), "blocks", ())


def _block_outputs(model: nn.Module) -> tuple[list[torch.Tensor], list]:
    outputs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in _blocks(model)]
    return outputs, hooks


def _head(model: nn.Module, feats: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``forward_head(feats)``, or ``forward(x)`` for a timm encoder without a head (its ``forward_head`` raises)."""
    try:
        return model.forward_head(feats)
    except NotImplementedError:
        return model(x)


def reduced_depth(spec: ViTSpec, depth: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(vitzoo overrides, timm keywords) that cut a model to ``depth`` blocks. Per-layer settings (entry names
    included; timm has no keyword for those) keep the first layer of each distinct setting before any other, so
    the cut model still has every kind of block (Sapiens2 at 2 blocks: one full-head and one grouped-query block)."""
    per_layer = {f: spec.get(f) for f in PER_LAYER_TIMM_KWARGS if isinstance(spec.get(f), tuple)}
    names = {slot: getattr(spec, slot).name for slot in PER_LAYER_SLOTS if isinstance(getattr(spec, slot).name, tuple)}
    rows = list(zip(*per_layer.values(), *names.values(), strict=True)) if per_layer or names else [()] * spec.depth
    firsts = sorted({row: i for i, row in reversed(list(enumerate(rows)))}.values())
    keep = sorted((firsts + [i for i in range(spec.depth) if i not in firsts])[:depth])
    ours = {"depth": depth, **{f: tuple(values[i] for i in keep) for f, values in per_layer.items()}}
    for slot, values in names.items():  # the entry names per layer, with the options set on them
        ours[slot] = {**getattr(spec, slot).to_data(), "name": tuple(values[i] for i in keep)}
    theirs = {keyword: convert(ours[f]) for f, (keyword, convert) in PER_LAYER_TIMM_KWARGS.items() if f in per_layer}
    return ours, {"depth": depth, **theirs}


def timm_reference(name: str, keywords: dict[str, Any]) -> nn.Module:
    """timm's model ``name`` with random weights and ``keywords`` (from :func:`reduced_depth`); a class of
    :data:`TIMM_FIXED_DEPTH` is built whole and cut to ``depth`` blocks by timm's own ``prune_intermediate_layers``."""
    depth = keywords.get("depth")
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = isinstance(timm.create_model(name), TIMM_FIXED_DEPTH)
    if depth is None or not fixed:
        return timm.create_model(name, pretrained=False, **keywords)
    reference = timm.create_model(name, pretrained=False, **{k: v for k, v in keywords.items() if k != "depth"})
    reference.prune_intermediate_layers([depth - 1], prune_norm=False, prune_head=False)
    return reference


def _compare(name: str, depth: int | None, result: Validation) -> None:
    ours, theirs = reduced_depth(model_spec(name), depth) if depth else ({}, {})
    torch.manual_seed(0)
    reference = timm_reference(name, theirs).eval()
    model = create_model(name, **ours).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    torch.manual_seed(1)
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    ours_b, hooks_o = _block_outputs(model)
    theirs_b, hooks_t = _block_outputs(reference)
    with torch.no_grad():
        feats, feats_ref = model.forward_features(x), reference.forward_features(x)
        for hook in hooks_o + hooks_t:
            hook.remove()
        logits, logits_ref = model.forward_head(feats), _head(reference, feats_ref, x)
    result.depth = len(model.blocks)
    same = feats.shape == feats_ref.shape
    if not same:
        result.reason = f"forward_features gives {tuple(feats.shape)}, timm's {tuple(feats_ref.shape)}"
    result.diffs = {**({"features": (feats - feats_ref).abs().max().item()} if same else {}),
                    "logits": (logits - logits_ref).abs().max().item()}
    # timm blocks that keep the grid (SAM's: (b, h, w, dim)) are compared as vitzoo's tokens (b, h * w, dim)
    result.block_diffs = [(o - t.flatten(1, -2)).abs().max().item() if t.ndim == 4 else (o - t).abs().max().item()
                          for o, t in zip(ours_b, theirs_b, strict=True)]
    if isinstance(reference, timm.models.naflexvit.NaFlexVit):
        result.diffs.update(sequence_diffs(model, reference))


def validate(name: str, depth: int | None = None) -> Validation:
    """Compare the vitzoo model ``name`` with timm's (structure at full size, numerics at ``depth``)."""
    if not timm.is_model(name):
        raise ValueError(f"timm has no model {name!r}, so there is nothing to compare with; "
                         f"{did_you_mean(name, timm.list_models(), listed='timm.list_models()')}")
    result = Validation(name)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = timm.create_model(name)
        result.full_depth = len(_blocks(reference))
        if name not in list_models():
            if isinstance(reference, timm.models.eva.Eva):
                result.reason = f"{eva_gap(reference)} (not expressible)"
                return result
            if not can_read(reference):
                result.reason = f"vitzoo has no blocks for timm's {type(reference).__name__} yet"
                return result
            try:
                from_timm(reference)
                result.reason = "not in the vitzoo registry (from_timm can build it)"
            except ValueError as err:
                result.reason = str(err).removeprefix("from_timm: ").split(", which")[0] + " (not expressible)"
            return result
        problem = _structure_problem(_shapes(reference), _shapes(create_model(name)))
        params = sum(p.numel() for p in reference.parameters())
    if problem:
        result.reason = f"state_dict differs: {problem}"
        return result
    if depth is None and params > FULL_DEPTH_MAX_PARAMS:
        depth = min(AUTO_DEPTH, result.full_depth)
    _compare(name, depth, result)
    bad = [i for i, d in enumerate(result.block_diffs) if not d <= TOL]
    if not result.reason:  # a difference of the outputs' shapes, found by _compare, says more than the values
        if bad:
            result.reason = f"first differing block: {bad[0]} (max |diff| {result.block_diffs[bad[0]]:.2e})"
        elif not result.worst <= TOL:  # also catches NaN
            result.reason = f"outputs differ after the blocks (max |diff| {result.worst:.2e})"
    result.ok = not result.reason
    return result


def format_table(result: Validation) -> str:
    lines = [f"{result.name}: {'OK' if result.ok else 'MISMATCH: ' + result.reason}"]
    if result.depth is not None:
        lines.append(f"  compared at depth {result.depth} of {result.full_depth}, fp32, tolerance {TOL:g}")
        lines.append(f"  {'output':<12} max |vitzoo - timm|")
        lines += [f"  {k:<12} {v:.3e}" for k, v in result.diffs.items()]
        lines += [f"  block {i:<6} {v:.3e}" for i, v in enumerate(result.block_diffs)]
    return "\n".join(lines)


def _report_table(results: list[Validation]) -> list[str]:
    lines = ["| model | | depth | worst diff | note |", "| --- | --- | --- | --- | --- |"]
    for r in results:
        depth = f"{r.depth}/{r.full_depth}" if r.depth is not None else f"-/{r.full_depth}"
        worst = f"{r.worst:.1e}" if r.worst is not None else "-"
        lines.append(f"| `{r.name}` | {'✓' if r.ok else '✗'} | {depth} | {worst} | {r.reason} |")
    return lines


def coverage_report(sections: dict[str, dict[str, Any]], command: str) -> str:
    """Markdown: the total per timm class, then every name with its verdict, worst difference and reason.
    ``sections`` maps each :class:`Sweep` title to ``{"seconds": ..., "results": [Validation, ...]}``."""
    by_title = {sweep.title: sweep for sweep in SWEEPS}
    done = [title for title in by_title if title in sections]
    totals = {t: (sum(r.ok for r in sections[t]["results"]), len(sections[t]["results"])) for t in done}
    lines = [
        "# timm coverage", "",
        f"**{sum(ok for ok, _ in totals.values())} / {sum(n for _, n in totals.values())}** timm {timm.__version__} "
        f"names of the classes below are vitzoo registry models with timm's exact state_dict (strict load) and "
        f"outputs within {TOL:g} in fp32 (logits, `forward_features`, every block):", "",
        *(f"- **{t}: {totals[t][0]} / {totals[t][1]}** ({by_title[t].about})" for t in done), "",
        f"NaFlexVit names are also compared on patch sequences: images of "
        f"{', '.join(f'{h}x{w}' for h, w in SEQUENCE_GRIDS)} patches one per row as timm takes them, and the same "
        f"three packed into one row (vitzoo's packing) against timm's outputs one per row.", "",
        f"Generated on CPU (torch {torch.__version__}) by the command below; `--classes TITLE,...` reruns the "
        f"sections of those classes and keeps the others (each name's result is kept in the `.json` beside this "
        f"file):", "", f"```bash\n{command}\n```", "",
        f"Keys and shapes are compared at full size on the `meta` device; numerics run at full depth up "
        f"to {FULL_DEPTH_MAX_PARAMS // 1_000_000}M parameters and at {AUTO_DEPTH} blocks above "
        f"(column *depth*: compared / full).",
    ]
    for t in done:
        lines += ["", f"## {t}", "", f"{totals[t][0]} / {totals[t][1]} in {sections[t]['seconds'] / 60:.1f} min.",
                  "", *_report_table(sections[t]["results"])]
    return "\n".join(lines) + "\n"


def load_sections(path: Path) -> dict[str, dict[str, Any]]:
    """The per-class results an earlier ``--all`` kept beside its report (none when there is no such file)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {t: {"seconds": v["seconds"], "results": [Validation(**r) for r in v["results"]]} for t, v in data.items()}


def save_sections(path: Path, sections: dict[str, dict[str, Any]]) -> None:
    """Write the per-class results atomically, so an interrupted run leaves the previous file whole."""
    data = {t: {"seconds": v["seconds"], "results": [asdict(r) for r in v["results"]]} for t, v in sections.items()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def split_suite_section(text: str) -> tuple[str, str]:
    """``text`` before the section of timm's own model tests, and that section ('' when absent).

    The section closes docs/parity.md; tests/upstream/run_timm_suite.py writes it and ``--all`` keeps it
    when it rewrites the rest, so each of the two reports can be regenerated without the other.
    """
    head, heading, section = text.partition(SUITE_HEADING)
    return head, heading + section


def _sweep(names: list[str], depth: int | None) -> list[Validation]:
    results = []
    for name in names:
        try:
            results.append(validate(name, depth))
        except Exception as err:  # one broken name must not hide the other results of the sweep
            results.append(Validation(name, reason=f"{type(err).__name__}: {err}"[:200]))
        r = results[-1]
        print(f"{'✓' if r.ok else '✗'} {name} {r.reason}", file=sys.stderr, flush=True)  # progress; results go to --out
    return results


def _cmd_validate(args: argparse.Namespace) -> int:
    if args.all == bool(args.name):
        print("vitzoo validate: give one NAME or --all", file=sys.stderr)
        return 2
    if args.name:
        result = validate(args.name, args.depth)
        print(format_table(result))
        return 0 if result.ok else 1
    titles = [sweep.title for sweep in SWEEPS]
    chosen = args.classes.split(",") if args.classes else titles
    for title in chosen:
        if title not in titles:
            raise ValueError(f"--classes: no timm class {title!r} is swept; {did_you_mean(title, titles)}")
    out = Path(args.out)
    kept_json = out.with_suffix(".json")
    sections = load_sections(kept_json) if args.classes else {}
    for sweep in SWEEPS:
        if sweep.title in chosen:
            start = time.perf_counter()
            results = _sweep(sweep_names(sweep), args.depth)
            sections[sweep.title] = {"seconds": time.perf_counter() - start, "results": results}
            print(f"{sweep.title}: {sum(r.ok for r in results)} / {len(results)} covered", file=sys.stderr)
    save_sections(kept_json, sections)
    command = "vitzoo validate --all" + (f" --depth {args.depth}" if args.depth else "") + f" --out {args.out}"
    kept = split_suite_section(out.read_text())[1] if out.exists() else ""
    out.write_text("\n".join(filter(None, [coverage_report(sections, command), kept])))
    print(f"report written to {args.out}")
    return 0


def add_validate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="compare vitzoo models with timm: keys, shapes, outputs per block")
    p.add_argument("name", nargs="?", help="a model name that both timm and vitzoo know")
    p.add_argument("--all", action="store_true",
                   help="every timm name of the classes vitzoo follows (VisionTransformer, Eva, ...); writes a report")
    p.add_argument("--classes", help="with --all: rerun only these timm classes (comma-separated section titles), "
                                     "keeping the other sections of the report")
    p.add_argument("--depth", type=int, help="compare numerics at this many blocks (default: automatic)")
    p.add_argument("--out", default="docs/parity.md", help="where --all writes its Markdown report")
    p.set_defaults(func=_cmd_validate)
