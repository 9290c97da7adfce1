"""The step dicts and durations ms-swift prints (step_dicts), as captured from real 4.6.0 and 3.5.3 runs."""

from __future__ import annotations

import pytest

from application.services.step_dicts import parse_duration, parse_step_dict


def test_step_dict_4x_strings() -> None:
    line = (
        "{'loss': '8.264', 'grad_norm': '0.6385', 'learning_rate': '9.938e-05', 'token_acc': '0', "
        "'epoch': '0.025', 'global_step/max_steps': '1/20', 'elapsed_time': '0s', 'remaining_time': '2s', "
        "'train_speed(s/it)': '0.1074'}"
    )
    d = parse_step_dict(line)
    assert d == {
        "loss": 8.264,
        "grad_norm": 0.6385,
        "learning_rate": 9.938e-05,
        "token_acc": 0.0,
        "epoch": 0.025,
        "global_step/max_steps": "1/20",
        "current_step": 1,
        "max_steps": 20,
        "elapsed_time": "0s",
        "remaining_time": "2s",
        "train_speed(s/it)": 0.1074,
    }


def test_step_dict_3x_numbers() -> None:
    line = (
        "{'loss': 8.27054501, 'token_acc': 0.0, 'grad_norm': 0.74902087, 'learning_rate': 9.938e-05, "
        "'memory(GiB)': 0.0, 'train_speed(iter/s)': 2.075509, 'epoch': 0.03, 'global_step/max_steps': '1/20', "
        "'percentage': '5.00%', 'elapsed_time': '0s', 'remaining_time': '3s'}"
    )
    d = parse_step_dict(line)
    assert d is not None
    assert d["loss"] == 8.27054501
    assert d["memory(GiB)"] == 0.0
    assert d["train_speed(iter/s)"] == 2.075509
    assert d["percentage"] == 5.0
    assert (d["current_step"], d["max_steps"]) == (1, 20)
    assert d["remaining_time"] == "3s"


def test_step_dict_after_tqdm_text_and_rejects() -> None:
    d = parse_step_dict("Train:   5%|5 | 1/20 [00:00<00:01]{'loss': '1.5', 'global_step/max_steps': '1/2'}  ")
    assert d is not None and d["loss"] == 1.5 and d["current_step"] == 1
    assert parse_step_dict("[INFO:swift] model_kwargs: {'device_map': 'cpu'}") is None
    assert parse_step_dict("{'device_map': 'cpu'}") is None  # a dict, but not a step
    assert parse_step_dict("{'loss': '1.5',") is None  # cut off
    assert parse_step_dict("{'loss': __import__('os')}") is None
    assert parse_step_dict("not a dict") is None
    assert parse_step_dict("") is None


def test_step_dict_nan_loss() -> None:
    # A diverged run's step is still a step; its nan/inf figures are no values (nor JSON: the job page and every
    # list page holding it could not be parsed).
    d3 = parse_step_dict("{'loss': nan, 'grad_norm': inf, 'global_step/max_steps': '3/20', 'percentage': '15.00%'}")
    assert d3 is not None and d3["loss"] is None and d3["grad_norm"] is None
    d4 = parse_step_dict("{'loss': 'nan', 'grad_norm': '-inf', 'global_step/max_steps': '3/20'}")
    assert d4 is not None and d4["loss"] is None and d4["grad_norm"] is None
    assert parse_step_dict("{'loss': nanx, 'global_step/max_steps': '3/20'}") is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0s", 0.0),
        ("2s", 2.0),
        ("1m 3s", 63.0),
        ("1h 2m 3s", 3723.0),
        ("1d 0h 0m 5s", 86405.0),
        ("0:01:02", 62.0),
        ("01:02", 62.0),
        ("00:38", 38.0),
        ("1 day, 0:00:05", 86405.0),
        ("12.5", 12.5),
        ("", None),
        ("?", None),
        ("soon", None),
        (None, None),
    ],
)
def test_parse_duration(text: str | None, seconds: float | None) -> None:
    assert parse_duration(text) == seconds
