"""Progress inside a stage: plain lines when the output is not a terminal (each state once),
tqdm bars on one, nothing with --quiet; Ray's own driver lines in a job log; stage times
and throughput as the metrics get them."""

from __future__ import annotations

import io
import logging
import re
import sys

from mace_ray.engine.logs import RayDriverLines
from mace_ray.engine.progress import StageProgress
from mace_ray.engine.stages import Timer

LINE = re.compile(r"^\d\d:\d\d:\d\d \[mace-ray\] train\[dog\+0\]: train steps (\d)/3 \(\d+\.\ds\)$")


def test_lines_not_bars_when_the_output_is_not_a_terminal(capsys):
    shown = StageProgress("train[dog+0]", every_s=3600.0)  # capsys's stderr is no terminal
    for step in range(1, 4):
        shown.update("train steps", step, 3)
    shown.close()
    err = capsys.readouterr().err
    # One line, when the unit is done: no bar states, no carriage returns, no escape codes.
    lines = err.splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]) and LINE.match(lines[0]).group(1) == "3", err
    assert "\r" not in err and "\x1b" not in err and shown.bars == {}
    often = StageProgress("train[dog+0]", every_s=0.0)  # a line whenever one is due: each state once
    for step in range(1, 4):
        often.update("train steps", step, 3)
    lines = capsys.readouterr().err.splitlines()
    assert [LINE.match(x).group(1) for x in lines] == ["1", "2", "3"], lines


def test_bars_on_a_terminal_and_quiet_shows_nothing(capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    monkeypatch.setattr(sys, "stderr", tty)
    shown = StageProgress("data[dog+1]")
    shown.update("image steps", 2, 10)
    shown.update("image steps", 1, 5)  # another chunk size: another bar
    assert shown.bars["image steps"][1:] == (5, 1)
    shown.close()
    assert "data[dog+1] image steps" in tty.getvalue() and "\r" in tty.getvalue()  # a tqdm bar
    monkeypatch.undo()
    quiet = StageProgress("data[dog+1]", enabled=False, every_s=0.0)
    quiet.update("masks", 2, 2)
    assert capsys.readouterr().err == ""


def test_ray_driver_lines_lose_colour_codes_and_are_silent_with_quiet():
    def record(level: int, msg: str, *args: str) -> logging.LogRecord:
        return logging.LogRecord("ray._private.worker", level, __file__, 1, msg, args, None)

    dashboard = "Connected to Ray cluster. View the dashboard at %s%s%s %s%s"
    codes = ("\x1b[1m", "\x1b[32m", "http://127.0.0.1:8265", "\x1b[39m", "\x1b[22m")
    r = record(logging.INFO, dashboard, *codes)
    assert RayDriverLines(verbose=True).filter(r)
    assert r.getMessage() == "Connected to Ray cluster. View the dashboard at http://127.0.0.1:8265 "
    assert not RayDriverLines(verbose=False).filter(record(logging.INFO, dashboard, *codes))
    assert RayDriverLines(verbose=False).filter(record(logging.WARNING, "a warning"))


class Recorder:
    """The Metrics protocol, keeping what it was sent."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def stage_started(self, stage: str, run_id: str) -> None:
        self.events.append(("started", stage))

    def stage_seconds(self, stage: str, seconds: float, run_id: str) -> None:
        self.events.append(("seconds", stage))


def test_every_stage_reaches_the_metrics_and_the_report():
    timer, metrics = Timer(), Recorder()
    with timer.stage("prepare"):  # before the run has metrics
        pass
    timer.report_to(metrics, "run")
    with timer.stage("train"):
        pass
    with timer.stage("finish"):
        # What the last stage writes into report.json: every stage, itself included.
        in_report = timer.seconds
        assert "finish" not in timer.done and timer.running is not None
    assert list(in_report) == ["prepare", "train", "finish"]
    assert metrics.events == [
        ("seconds", "prepare"),
        ("started", "train"),
        ("seconds", "train"),
        ("started", "finish"),
        ("seconds", "finish"),
    ]
    assert list(timer.seconds) == list(in_report) and timer.running is None
