"""`python -m ism_ext ops`: bad option values are reported by option name, before anything runs."""

from __future__ import annotations

import pytest
import torch

from ism_ext.cli import ops


@pytest.mark.parametrize("value", ["0", "-5", "3", "16", "many"])
def test_tokens_out_of_range_names_the_option(value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ops.main(["--tokens", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--tokens" in err and "turn" not in err


def test_repeats_zero_names_the_option(capsys):
    with pytest.raises(SystemExit):
        ops.main(["--repeats", "0"])
    assert "--repeats" in capsys.readouterr().err


def test_check_and_time_rejects_too_few_tokens():
    with pytest.raises(ValueError, match="tokens must be at least 17"):
        ops.check_and_time(16, 2, 1, 16, torch.float32, 1)


def test_check_and_time_smallest_dialogue_runs():
    result = ops.check_and_time(ops.MIN_TOKENS, 2, 1, 16, torch.float32, 1)
    assert result["max_err"] < 1e-5
