"""Progress inside a stage: bars and periodic lines, silenced by --quiet."""

from __future__ import annotations

import logging

from mace_ray.engine.progress import StageProgress


def test_bars_and_lines_follow_the_units_done(capsys, caplog):
    shown = StageProgress("train[dog+0]", every_s=0.0)
    with caplog.at_level(logging.INFO, logger="mace_ray"):
        for step in range(1, 4):
            shown.update("train steps", step, 3)
    shown.close()
    err = capsys.readouterr().err
    assert "train[dog+0] train steps" in err and "3/3" in err  # a tqdm bar on stderr
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"train[dog+0]: train steps {i}/3" for i in range(1, 4)]
    assert shown.bars == {}  # a finished bar is closed


def test_a_new_total_starts_a_new_bar_and_quiet_shows_nothing(capsys, caplog):
    shown = StageProgress("data[dog+1]")
    shown.update("image steps", 2, 10)
    shown.update("image steps", 1, 5)  # another chunk size: another bar
    assert shown.bars["image steps"][1:] == (5, 1)
    shown.close()
    capsys.readouterr()
    quiet = StageProgress("data[dog+1]", enabled=False, every_s=0.0)
    with caplog.at_level(logging.INFO, logger="mace_ray"):
        quiet.update("masks", 1, 2)
    assert capsys.readouterr().err == "" and not caplog.records
