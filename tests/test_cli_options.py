"""The command line is generated from the jobs' config dataclasses: every option documented, every
default the library's own, robuq's errors one line, bugs a traceback."""

from __future__ import annotations

import argparse

import pytest

from robuq.cli import build_parser, main
from robuq.cli.flags import config_from_args
from robuq.core.errors import RobuqError


def _subparsers(parser: argparse.ArgumentParser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, prefix + (name,))
    if prefix:
        yield prefix, parser


def test_every_option_of_every_command_has_a_help_text():
    undocumented = []
    for path, parser in _subparsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            text = (action.help or "").replace("(default: %(default)s)", "").strip()
            if not text:
                undocumented.append(f"robuq {' '.join(path)} {'/'.join(action.option_strings) or action.dest}")
    assert not undocumented, undocumented


def test_no_help_ends_in_a_default_of_none():
    """An option whose default is None says in its help what happens without it, not "(default: None)"."""
    for path, parser in _subparsers(build_parser()):
        assert "(default: None)" not in parser.format_help(), f"robuq {' '.join(path)} --help"


def test_only_rank_0_says_what_a_job_wrote(tmp_path, capsys, monkeypatch):
    args = ["quantize", "--act-bits", "4", "--out", str(tmp_path / "q.safetensors")]
    monkeypatch.setenv("RANK", "1")
    assert main(args) == 0 and "wrote" not in capsys.readouterr().out
    monkeypatch.setenv("RANK", "0")
    assert main(args) == 0 and "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "command, cls",
    [
        (["train"], "robuq.train.trainer:TrainConfig"),
        (["qat"], "robuq.train.qat:QATConfig"),
        (["ampn", "run"], "robuq.ampn.pipeline:AMPNConfig"),
        (["run"], "robuq.cli.quickstart:QuickstartConfig"),
        (["sample"], "robuq.sample.to_files:SampleConfig"),
        (["export"], "robuq.io.model_files:ExportConfig"),
    ],
)
def test_defaults_on_the_command_line_are_the_dataclass_defaults(command, cls):
    import importlib

    module, name = cls.split(":")
    config_class = getattr(importlib.import_module(module), name)
    args = build_parser().parse_args(command)
    assert config_from_args(args, config_class) == config_class()


def test_nested_options_reach_the_nested_config():
    from robuq.ampn.pipeline import AMPNConfig

    args = build_parser().parse_args(
        ["ampn", "run", "--budget", "2", "--lr", "5e-4", "--no-ema-warmup", "--loss", "distill"]
    )
    config = config_from_args(args, AMPNConfig)
    assert (
        config.budget == 2.0
        and config.qat.lr == 5e-4
        and config.qat.ema_warmup is False
        and config.qat.loss == "distill"
    )
    assert config.qat.out_dir == AMPNConfig().qat.out_dir == "runs/ampn"
    with pytest.raises(SystemExit):  # set by AMPN itself, so not an option of `ampn run`
        build_parser().parse_args(["ampn", "run", "--plan", "p.json"])


def test_choices_are_checked_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["qat", "--loss", "bogus"])
    assert "invalid choice" in capsys.readouterr().err


def test_robuqs_own_errors_are_one_line_and_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    assert main(["sample", "--ckpt", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="does not exist"):  # --debug: the traceback of every error
        main(["--debug", "sample", "--ckpt", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)])

    import robuq.sample.to_files as to_files

    def broken(*args, **kwargs):
        raise RuntimeError("shape mismatch deep inside")  # what a bug or an out-of-memory error looks like

    monkeypatch.setattr(to_files, "load_any", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["sample", "--out", str(tmp_path)])

    def numpy_value_error(*args, **kwargs):
        import numpy as np

        np.zeros(3).reshape(2, 2)  # a ValueError raised inside NumPy, not by robuq: a bug, not bad input

    monkeypatch.setattr(to_files, "load_any", numpy_value_error)
    with pytest.raises(ValueError):
        main(["sample", "--out", str(tmp_path)])

    def robuq_check(*args, **kwargs):
        raise ValueError("an internal check failed")  # robuq's own code, but not a RobuqError: a bug

    monkeypatch.setattr(to_files, "load_any", robuq_check)
    with pytest.raises(ValueError, match="internal check"):
        main(["sample", "--out", str(tmp_path)])

    def user_error(*args, **kwargs):
        raise RobuqError("give the model file: --ckpt FILE")  # decided by its type, wherever it is raised

    monkeypatch.setattr(to_files, "load_any", user_error)
    assert main(["sample", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "robuq sample: error: give the model file: --ckpt FILE"


def test_a_registered_preset_is_a_policy_like_the_built_in_ones():
    from robuq.quant.linear import LinearQuantConfig
    from robuq.precision import BLOCK_ROLES, PRESETS, preset, register_preset

    @register_preset("test-a8w8")
    def _(options):
        return {role: LinearQuantConfig(weight="int8", act_bits=8) for role in BLOCK_ROLES}

    try:
        config = preset("test-a8w8")
        assert {r.linear.weight for r in config.rules if r.role in BLOCK_ROLES} == {"int8"}
        assert config.attention_bits == 8 and any(r.role == "adaln" for r in config.rules)
    finally:
        del PRESETS["test-a8w8"]
