"""`mace-ray <command> --help` as an 80-column terminal shows it: nothing cut, erase's first
screen under 80 lines and every option one flag away (--help-all), usage in one convention,
flags as flags; --stages names the stages, --method picks the closed-form-only method; the
old --config keys get a one-line hint; --help and --version start without torch."""

from __future__ import annotations

import dataclasses
import enum
import re
import subprocess
import sys
import typing

import pytest
import typer
import yaml
from typer.testing import CliRunner

from mace_core.errors import SettingError
from mace_ray.cli.main import app
from mace_ray.erase.request import STAGE_NAMES, EraseRequest, Method

COMMANDS = ["erase", "status", "gc", "cache-prior", "apply", "pull", "eval", "audit"]
NARROW = {"COLUMNS": "80"}


def invoke(*args: str, env: dict[str, str] | None = None):
    return CliRunner().invoke(app, list(args), env=env, prog_name="mace-ray")


def command(name: str):
    return typer.main.get_command(app).get_command(None, name)


@pytest.mark.parametrize("name", COMMANDS)
def test_help_fits_80_columns_and_cuts_nothing(name):
    assert typer.main.get_command(app).list_commands(None) == COMMANDS  # each one is checked here
    cmd = command(name)
    flags = ["--help", *(["--help-all"] if any("--help-all" in p.opts for p in cmd.params) else [])]
    for flag in flags:
        r = invoke(name, flag, env=NARROW)
        assert r.exit_code == 0, r.output
        lines = r.stdout.splitlines()
        assert max(map(len, lines)) <= 80, max(lines, key=len)
        assert "\x1b[" not in r.stdout and "…" not in r.stdout and "<bool>" not in r.stdout
        # One usage convention: [OPTIONS], then the arguments in capitals ([X]: optional).
        assert re.fullmatch(rf"Usage: mace-ray {name} \[OPTIONS\]( \[?[A-Z_]+\]?)*", lines[0]), lines[0]
        for line in lines:  # a choice list is never broken across lines
            for m in re.finditer(r"\[[a-z0-9-]+\|", line):
                assert re.match(r"\[[a-z0-9-]+(\|[a-z0-9-]+)+\]", line[m.start() :]), line
    full = invoke(name, flags[-1], env=NARROW).stdout  # every option: --help-all where --help hides some
    for p in cmd.params:
        if p.param_type_name == "option":
            # The whole name at the start of its row; a flag with no value after it.
            after = r"(  |$)" if p.is_flag else r" \S"
            assert re.search(rf"^  {re.escape(p.opts[0])}{after}", full, re.M), p.opts[0]
            default = getattr(p.default, "value", p.default)
            if not p.is_flag and default not in (None, "", [], ()):  # a default whole, on one line
                assert f"[default: {default}]" in full, (p.opts[0], default)


def enums(cls: type) -> set[type]:
    """The choice types of a request's fields, nested settings included."""
    out = set()
    for f in dataclasses.fields(cls):
        t = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(t):
            out |= enums(t)
        elif isinstance(t, type) and issubclass(t, enum.Enum):
            out.add(t)
    return out


@pytest.mark.parametrize("name", ["erase", "eval", "audit"])
def test_every_choice_is_shown_whole(name):
    from mace_ray.audit.request import AuditRequest
    from mace_ray.eval.request import EvalRequest

    root = {"erase": EraseRequest, "eval": EvalRequest, "audit": AuditRequest}[name]
    full = invoke(name, "--help-all", env=NARROW).stdout
    choices = {f"[{'|'.join(m.value for m in t)}]" for t in enums(root)}
    assert len(choices) >= 3
    for shown in choices:
        assert shown in full, shown


def test_erase_help_is_a_first_screen_and_help_all_has_the_rest():
    short = invoke("erase", "--help", env=NARROW).stdout
    lines = short.splitlines()
    assert len(lines) <= 80, len(lines)
    for name in ("--model", "--output", "--type", "--retain", "--method", "--executor", "--address"):
        assert f"\n  {name} " in short, name
    assert "--masker" not in short and "--cfr-prior-weight" not in short
    assert re.search(r"\d+ more options: --help-all", short)
    full = invoke("erase", "--help-all", env=NARROW).stdout
    assert "--masker" in full and "--cfr-prior-weight" in full and len(full.splitlines()) > len(lines)


def test_stages_lists_the_stage_names():
    from mace_ray.erase.stages import ERASE_STAGES

    assert tuple(s.name for s in ERASE_STAGES) == STAGE_NAMES
    full = " ".join(invoke("erase", "--help-all", env=NARROW).stdout.split())
    assert ", ".join(STAGE_NAMES) in full


def test_method_is_its_own_switch(caplog):
    from mace_ray.erase.plan import plan_stages
    from mace_ray.erase.stages import CFR_STAGES, ERASE_STAGES

    assert plan_stages("all", Method.CFR) == ("cfr", CFR_STAGES)
    assert plan_stages("all") == ("mace", ERASE_STAGES)
    # A MACE run stopped after its cfr stage: a stage list that names cfr with another stage.
    method, stages = plan_stages("text_statistics,cfr")
    assert method == "mace" and [s.name for s in stages] == ["text_statistics", "workers_start", "cfr"]
    with pytest.raises(SettingError, match="--method cfr runs whole"):
        plan_stages("data", "cfr")
    # The old spelling still works, with a deprecation line.
    with caplog.at_level("WARNING", logger="mace_ray"):
        assert plan_stages(" CFR ") == ("cfr", CFR_STAGES)
    assert "--stages cfr is deprecated: use --method cfr" in caplog.text


def test_flags_take_no_value_and_old_config_keys_get_a_hint(tmp_path, monkeypatch):
    import mace_ray.erase.driver as driver

    seen = {}

    def fake_erase(req):
        seen["req"] = req
        return {"run_id": "x", "status": "complete", "output": {}}

    monkeypatch.setattr(driver, "run_erase", fake_erase)
    r = invoke("erase", "c.txt", "--quiet", "true")
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "true" in r.stderr, r.stderr
    for old, new in (("verbose", "quiet"), ("resume", "no_resume"), ("penalize_eot", "no_penalize_eot")):
        cfg = tmp_path / f"{old}.yaml"
        cfg.write_text(yaml.safe_dump({"concepts": "c.txt", old: False}))
        r = invoke("erase", "--config", str(cfg))
        lines = r.stderr.strip().splitlines()
        assert r.exit_code == 2 and len(lines) == 1, r.stderr
        assert f"key {old!r} is now {new!r} ({old}: false is {new}: true)" in lines[0]
    assert not seen
    cfg.write_text(yaml.safe_dump({"concepts": "c.txt", "quiet": True, "no_resume": True, "method": "cfr"}))
    assert invoke("erase", "--config", str(cfg)).exit_code == 0
    req = seen["req"]
    assert (req.progress, req.resume, req.method) == (False, False, Method.CFR)


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["--help"],
        ["erase", "--help"],
        ["eval", "--help"],
        ["audit", "--help"],
        ["status", "--help"],
    ],
)
def test_help_and_version_do_not_import_torch(args):
    """A fresh interpreter, as the `mace-ray` script starts one (audit's attack options come
    from the attacks' declarations, mace_core/audit/attacks/<name>/__init__.py)."""
    code = (
        "import sys\nfrom mace_ray.cli.main import main\n"
        f"sys.argv = ['mace-ray', *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "heavy = ('torch', 'ray', 'diffusers', 'transformers')\n"
        "print('LOADED', sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "LOADED []" in out.stdout, (out.stdout[-500:], out.stderr[-2000:])
