"""``python -m tests.faults.run`` refuses options that would make a meaningless run."""

from __future__ import annotations

import pytest

from .run import parse_args


@pytest.mark.parametrize(
    ("argv", "refusal"),
    [
        (["--rate", "nan"], "argument --rate: 'nan' is not a number of orders per second above 0"),
        (["--rate", "0"], "argument --rate: '0' is not a number of orders per second"),
        (["--orders", "0"], "argument --orders: '0' is not a whole number from 1"),
        (["--faults", "-1"], "argument --faults: '-1' is not a whole number from 0"),
        (["--deadline", "inf"], "argument --deadline: 'inf' is not a number of seconds above 0"),
        (["--broker-pause", "3", "-1"], "argument --broker-pause: '-1' is not a number of seconds"),
        (["--fault-interval", "0"], "argument --fault-interval: '0' is not a number of seconds"),
        (["--heal-bound", "-5"], "argument --heal-bound: '-5' is not a number of seconds"),
        (["--broker-pause", "30", "3"], "argument --broker-pause: MIN (30) is above MAX (3)"),
    ],
)
def test_a_meaningless_option_is_refused_with_its_name(
    argv: list[str], refusal: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2
    assert refusal in capsys.readouterr().err


def test_durations_of_zero_turn_a_fault_off() -> None:
    """0 is a duration where it means "none": no long transaction, pauses of no length."""
    args = parse_args(
        ["--long-transaction", "0", "--broker-pause", "0", "2", "--authorization-delay", "0"]
    )
    assert (args.long_transaction, args.broker_pause, args.authorization_delay) == (0, [0, 2], 0)
