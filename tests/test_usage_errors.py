"""Every bids_cl command: a usage error is exit 64 with one line on stderr (BIDS-Apps), never argparse's 2."""

from __future__ import annotations

import importlib

import pytest

from bids_cl.errors import EXIT_USAGE

COMMANDS = [
    ("bids_cl.cli.run", ["--no-such-option"]),
    ("bids_cl.cli.slurm", ["--no-such-option"]),
    ("bids_cl.cli.demo", ["--no-such-option"]),
    ("bids_cl.engine.cli", ["install"]),                  # missing the model name
    ("bids_cl.engine.cli", ["no-such-command"]),
    ("bids_cl.train.cli", ["--no-such-option"]),
    ("bids_cl.evaluation.cli", ["--no-such-option"]),
    ("bids_cl.synth.cli", ["--no-such-option"]),
    ("bids_cl.preproc.templates", ["--resolution", "one"]),
]


@pytest.mark.parametrize(("module", "argv"), COMMANDS)
def test_usage_error_is_64_and_one_line(module: str, argv: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    code = importlib.import_module(module).main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_USAGE, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "--help" in lines[0], err


@pytest.mark.parametrize("module", sorted({m for m, _ in COMMANDS}))
def test_help_exits_0(module: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert importlib.import_module(module).main(["--help"]) == 0
    assert "usage:" in capsys.readouterr().out
