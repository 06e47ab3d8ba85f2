"""The commands' options are their config dataclasses' fields: the same defaults, the same refusals."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from typing import Literal

import pytest

from vitzoo import bench
from vitzoo.ablate import AblationConfig
from vitzoo.ablate import _config_from_args as ablation_from_args
from vitzoo.ablate import add_arguments as add_ablation_arguments
from vitzoo.arguments import add_options, best_device
from vitzoo.bench import BenchConfig
from vitzoo.export import ExportConfig
from vitzoo.export import _config_from_args as export_from_args
from vitzoo.export import add_arguments as add_export_arguments
from vitzoo.fields import FieldTypeError, described
from vitzoo.train import finetune
from vitzoo.train.finetune import FinetuneConfig
from vitzoo.train.loop import TrainConfig

MODEL = "vit_pico_patch4_32"
# Each command: its argparse builder, the config it makes of a command line, a minimal command line, and
# the config Python gets from the dataclass defaults (a command trains on this machine's best device).
COMMANDS = {
    "finetune": (finetune.add_arguments, finetune._config_from_args, [MODEL],
                 lambda: FinetuneConfig(model=MODEL, train=TrainConfig(device=best_device()))),
    "ablate": (add_ablation_arguments, ablation_from_args, ["--model", MODEL],
               lambda: AblationConfig(model=MODEL, grid={}, device=best_device())),
    "bench": (bench.add_arguments, bench._config_from_args, [], BenchConfig),
    "export": (add_export_arguments, export_from_args, [MODEL], lambda: ExportConfig(model=MODEL)),
}


def _parser(add: Callable[[argparse.ArgumentParser], None]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="test")
    add(parser)
    return parser


@pytest.mark.parametrize("command", COMMANDS)
def test_a_command_without_options_runs_on_the_dataclass_defaults(command):
    add, config_from_args, argv, defaults = COMMANDS[command]
    assert config_from_args(_parser(add).parse_args(argv)) == defaults()


@pytest.mark.parametrize("command", COMMANDS)
def test_each_option_default_is_its_field_default(command):
    """Option by option, so a drift names the option. Not compared: ``--device`` (the machine's best device
    by design), ``--pretrained`` (alone it means the hub's weights) and the fields built of other options
    (``--grid``, ``--seeds N``: the list of seeds 0..N-1)."""
    add, _, _, _ = COMMANDS[command]
    config = {"finetune": FinetuneConfig, "ablate": AblationConfig, "bench": BenchConfig,
              "export": ExportConfig}[command]
    declared = {f.name: f for cls in (TrainConfig, config) for f in fields(cls)}  # the command's own win
    compared = [action for action in _parser(add)._actions if action.dest in declared and action.option_strings
                and declared[action.dest].default is not MISSING and action.dest not in ("device", "pretrained")]
    assert len(compared) >= 5
    for action in compared:
        assert action.default == declared[action.dest].default, action.option_strings


@pytest.mark.parametrize(("command", "argv", "make"), [
    ("finetune", ["--batch-size", "0"], lambda: TrainConfig(batch_size=0)),
    ("finetune", ["--lr", "-0.001"], lambda: TrainConfig(lr=-0.001)),
    ("finetune", ["--label-smoothing", "1"], lambda: TrainConfig(label_smoothing=1)),
    ("finetune", ["--steps", "2.5"], lambda: TrainConfig(steps="2.5")),
    ("finetune", ["--val-fraction", "1"], lambda: FinetuneConfig(model=MODEL, val_fraction=1)),
    ("finetune", ["--num-classes", "0"], lambda: FinetuneConfig(model=MODEL, num_classes=0)),
    ("ablate", ["--weight-decay", "-0.1"], lambda: AblationConfig(model=MODEL, grid={}, weight_decay=-0.1)),
    ("ablate", ["--warmup-steps", "-1"], lambda: AblationConfig(model=MODEL, grid={}, warmup_steps=-1)),
    ("bench", ["--rounds", "0"], lambda: BenchConfig(rounds=0)),
    ("bench", ["--steps", "infer,backward"], lambda: BenchConfig(steps=("infer", "backward"))),
    ("export", ["--tolerance", "0"], lambda: ExportConfig(model=MODEL, tolerance=0)),
])
def test_the_command_line_refuses_what_the_dataclass_refuses_with_its_message(command, argv, make, capsys):
    add, _, minimal, _ = COMMANDS[command]
    with pytest.raises(ValueError) as refused:
        make()
    with pytest.raises(SystemExit) as stopped:
        _parser(add).parse_args([*minimal, *argv])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"test: error: argument {argv[0]}: {refused.value}"


@dataclass
class Config:
    name: str = described(help="what")
    tiles: tuple[int, ...] = described((1, 2), "sizes, 100% of them")
    mode: Literal["a", "b"] = described("a", "one of two")
    limit: float | None = described(None, "an upper bound (None: none)")
    fast: bool = described(False, "go")
    color: bool = described(True, "colour the output")


def test_options_of_any_dataclass():
    """A bool is a flag (``--no-...`` where it is on by default), a Literal a choice, a required field
    positional; None is typed as ``none``."""
    parser = argparse.ArgumentParser()
    add_options(parser, Config, [f.name for f in fields(Config)])
    assert vars(parser.parse_args(["x"])) == {"name": "x", "tiles": (1, 2), "mode": "a", "limit": None, "fast": False,
                                              "color": True}
    given = parser.parse_args(["x", "--tiles", "3", "--mode", "b", "--limit", "none", "--fast", "--no-color"])
    assert vars(given) == {"name": "x", "tiles": (3,), "mode": "b", "limit": None, "fast": True, "color": False}
    assert parser.parse_args(["x", "--tiles", "3,4", "--limit", "2.5"]).tiles == (3, 4)
    assert "sizes, 100% of them (default: 1,2)" in " ".join(parser.format_help().split())


def test_ablation_takes_the_shared_settings_from_training():
    train, ablation = ({f.name: f for f in fields(cls)} for cls in (TrainConfig, AblationConfig))
    for name in ("batch_size", "lr", "weight_decay", "device"):
        assert ablation[name].default == train[name].default and ablation[name].metadata == train[name].metadata
    assert ablation["steps"].default == 200 and ablation["steps"].metadata == train["steps"].metadata


def test_literal_fields_refuse_other_values():
    with pytest.raises(FieldTypeError, match=r"TrainConfig.optimizer: expected 'adamw' or 'adam', got 'sgd'"):
        TrainConfig(optimizer="sgd")
    with pytest.raises(FieldTypeError, match=r"AblationConfig.seeds: expected a list of an int, got \(0, 1\)"):
        AblationConfig(model=MODEL, grid={}, seeds=(0, 1))
