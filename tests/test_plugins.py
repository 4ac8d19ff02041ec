"""The integrator's kit: the model reference in docs/plugins.md is the model's, and a scaffolded channel plug-in
passes its own test and is found by the engine through its entry point."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT
from traboule import model
from traboule.app import cli as cli_mod
from traboule.app import model_reference, runtime
from traboule.app.scaffold import ScaffoldError, new_channel
from traboule.testing import use_entry_points

PLUGINS_DOC = ROOT / "docs" / "plugins.md"


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "traboule.app.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env or dict(os.environ), timeout=120)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRABOULE_") and k != "PYTHONPATH"}
    return {**env, **extra}


# -- the model reference ----------------------------------------------------------------------------------------


def test_plugins_doc_carries_the_current_model_reference() -> None:
    assert model_reference.section(PLUGINS_DOC) == model_reference.markdown(), (
        "docs/plugins.md is behind traboule/model.py: run `traboule model --update docs/plugins.md`"
    )


def test_reference_lists_every_field_of_the_envelope_and_payloads() -> None:
    text = model_reference.markdown()
    documented = model_reference.classes()
    assert {model.Envelope, *model.PAYLOAD_TYPES.values(), model.Identifier, model.ScheduledStep} <= set(documented)
    for cls in documented:
        part = text.split(f"#### {cls.__name__}\n", 1)[1].split("\n#### ", 1)[0]
        for f in dataclasses.fields(cls):
            assert re.search(rf"^\| `{f.name}` \|", part, re.M), f"{cls.__name__}.{f.name} missing"


def test_notes_name_fields_that_exist() -> None:
    for cls_name, name in model_reference.NOTES:
        cls = next(c for c in model_reference.classes() if c.__name__ == cls_name)
        assert name in {f.name for f in dataclasses.fields(cls)} or isinstance(getattr(cls, name, None), property)


def test_model_command_prints_and_updates(tmp_path: Path) -> None:
    out = cli("model", "--markdown", env=clean_env())
    assert out.returncode == 0 and out.stdout == model_reference.markdown()
    plain = cli("model", env=clean_env()).stdout
    assert plain.startswith("Envelope: ") and "\n  accession_number " in plain
    stale = tmp_path / "plugins.md"
    stale.write_text(PLUGINS_DOC.read_text().replace("| `accession_number` |", "| `accession_nr` |"))
    assert cli("model", "--update", str(stale), env=clean_env()).stdout.endswith("updated\n")
    assert model_reference.section(stale) == model_reference.markdown()
    assert stale.read_text().replace(model_reference.markdown(), "") == PLUGINS_DOC.read_text().replace(
        model_reference.section(PLUGINS_DOC), ""
    )  # the hand-written parts are left as they were


# -- the scaffold --------------------------------------------------------------------------------------------------


@pytest.fixture
def scaffolded(tmp_path: Path) -> Path:
    out = cli("new", "channel", "audit-log", "--dir", str(tmp_path), env=clean_env())
    assert out.returncode == 0, out.stderr
    return tmp_path / "traboule-audit-log"


def test_scaffolded_package_declares_its_kind(scaffolded: Path) -> None:
    with (scaffolded / "pyproject.toml").open("rb") as fh:
        project = tomllib.load(fh)["project"]
    assert project["name"] == "traboule-audit-log"
    assert project["entry-points"]["traboule.channels"] == {"audit-log": "traboule_audit_log.channel:AuditLogChannel"}
    for path in ("README.md", "traboule_audit_log/channel.py", "tests/test_channel.py", "tests/conftest.py"):
        assert (scaffolded / path).is_file(), path


def test_scaffolded_test_passes_against_the_engine(scaffolded: Path) -> None:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    env = clean_env(PYTHONPATH=str(scaffolded))
    out = subprocess.run(command, capture_output=True, text=True, cwd=scaffolded, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed" in out.stdout


def test_scaffolded_test_fails_when_the_channel_loses_its_idempotency(scaffolded: Path) -> None:
    """The generated test checks something: a channel recording a redelivered event twice fails it."""
    channel = scaffolded / "traboule_audit_log" / "channel.py"
    channel.write_text(channel.read_text().replace("event_id TEXT PRIMARY KEY", "event_id TEXT"))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    env = clean_env(PYTHONPATH=str(scaffolded))
    out = subprocess.run(command, capture_output=True, text=True, cwd=scaffolded, env=env, timeout=120)
    assert out.returncode == 1 and "1 failed, 1 passed" in out.stdout


def test_engine_loads_the_scaffolded_kind_through_its_entry_point(scaffolded: Path, tmp_path: Path) -> None:
    # What `pip install` writes for the package's entry points (the metadata the engine reads), without a build.
    site = tmp_path / "site"
    info = site / "traboule_audit_log-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: traboule-audit-log\nVersion: 0.1.0\n")
    with (scaffolded / "pyproject.toml").open("rb") as fh:
        declared = tomllib.load(fh)["project"]["entry-points"]["traboule.channels"]
    lines = ["[traboule.channels]", *(f"{name} = {target}" for name, target in declared.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    config = tmp_path / "traboule.toml"
    config.write_text(
        f"""
[engine]
data_dir = "{tmp_path / "var"}"

[[channels]]
name = "audit"
kind = "audit-log"
topics = ["order.#", "document.#"]
process = "worker"
"""
    )
    env = clean_env(PYTHONPATH=os.pathsep.join([str(scaffolded), str(site)]))
    listing = cli("--config", str(config), "channels", env=env)
    assert re.search(r"^  audit-log +traboule_audit_log\.channel:AuditLogChannel$", listing.stdout, re.M)
    checked = cli("--config", str(config), "check", env=env)
    assert checked.returncode == 0, checked.stderr
    assert "ok  audit (audit-log, process worker)" in checked.stdout
    not_installed = cli("--config", str(config), "check", env=clean_env())
    assert not_installed.returncode == 2 and "channel kind 'audit-log' is not installed" in not_installed.stderr


def test_scaffold_refuses_taken_kinds_bad_names_and_existing_folders(tmp_path: Path) -> None:
    with pytest.raises(ScaffoldError, match="already installed"):
        new_channel("worklist", tmp_path)
    with pytest.raises(ScaffoldError, match="lower-case words"):
        new_channel("Audit_Log", tmp_path)
    new_channel("tap", tmp_path)
    with pytest.raises(ScaffoldError, match="already exists"):
        new_channel("tap", tmp_path)
    assert cli("new", "channel", "tap", "--dir", str(tmp_path), env=clean_env()).returncode == 2


def test_use_entry_points_checks_targets_and_restores_the_kinds(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project.entry-points."traboule.channels"]\naudit = "json:JSONDecoder"\n')
    before = dict(runtime.BUILTIN_CHANNELS)
    with use_entry_points(pyproject):
        assert runtime.installed("traboule.channels")["audit"] == "json:JSONDecoder"
    assert before == runtime.BUILTIN_CHANNELS
    pyproject.write_text('[project.entry-points."traboule.channels"]\naudit = "json:NoSuchClass"\n')
    with pytest.raises(AttributeError), use_entry_points(pyproject):
        pass
    assert before == runtime.BUILTIN_CHANNELS


# -- the commands the docs give ----------------------------------------------------------------------------------

PLACEHOLDERS = {"ID": "1", "IDS": "1", "DAYS": "1", "FILE": "f", "PATH": "p", "MESSAGE_ID": "m", "NAME": "x"}


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every ``traboule ...`` command line in a code span or a shell block of the docs and the README."""
    found = []
    for path in [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        spans = re.findall(r"`([^`\n]+)`", text)
        blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", text, re.S)
        lines = [line.split(" #")[0] for block in blocks for line in block.splitlines()]
        for chunk in spans + lines:
            for match in re.finditer(r"(?:^|[\s/(])traboule((?: +\S+)+)", chunk):
                words = [PLACEHOLDERS.get(w.strip("[]"), w.strip("[]")) for w in match.group(1).split()]
                if words[0].startswith("-") or words[0] in cli_mod.COMMANDS:
                    found.append((path.name, words))
    return found


def test_documented_commands_match_the_command_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A command the docs show must parse: a wrong order or a removed option is an argparse error. A bare mention
    (`traboule journal prune` in a sentence) may leave out a required argument."""
    for name in list(cli_mod.COMMANDS):
        monkeypatch.setitem(cli_mod.COMMANDS, name, lambda cfg, args: 0)
    commands = documented_commands()
    assert any(words[:2] == ["dlq", "replay"] for _, words in commands)
    wrong = []
    for doc, words in commands:
        try:
            cli_mod.main(words)
        except SystemExit:
            error = capsys.readouterr().err
            if "the following arguments are required" not in error:
                wrong.append(f"{doc}: traboule {' '.join(words)}: {error.strip().splitlines()[-1]}")
    assert wrong == []
