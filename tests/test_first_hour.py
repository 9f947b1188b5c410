"""What a new user meets in the first hour: version, help, pipes, a mistyped model, no network."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from transmute_cli import __version__
from transmute_cli.cli import app

runner = CliRunner()


def _transmute(*args: str, close_stdout: bool = False, env: dict | None = None) -> tuple[int, str]:
    """Run the console entry point in a child process; ``close_stdout`` is `| head` that has left."""
    cmd = [sys.executable, "-c", "from transmute_cli.cli import main; main()", *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, **(env or {})})
    if close_stdout:
        p.stdout.close()  # before the child prints anything: its first write meets a closed pipe
        err = p.stderr.read()
        return p.wait(), err
    out, err = p.communicate()
    return p.returncode, out + err


def test_version_option_and_command():
    for args in (["--version"], ["version"]):
        result = runner.invoke(app, args)
        assert result.exit_code == 0 and result.stdout.strip() == __version__


@pytest.mark.parametrize("args", [["--help"], ["compute", "--help"], ["version"]])
def test_a_reader_that_leaves_early_is_no_failure(args):
    """`transmute --help | head -3` under `set -o pipefail`: exit 0, nothing on stderr."""
    code, err = _transmute(*args, close_stdout=True)
    assert (code, err) == (0, "")


@pytest.mark.parametrize("command", ["compute", "apply", "eval", "diff"])
def test_help_shows_flags_as_flags_and_says_what_each_does(command):
    result = runner.invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "<bool>" not in result.stdout
    lines = {line.split()[0].rstrip(","): line for line in result.stdout.splitlines() if line.strip().startswith("-")}
    json_line = next(line for line in result.stdout.splitlines() if "--json" in line)
    assert "JSON" in json_line, json_line
    if command != "diff":
        quiet_line = next(line for line in result.stdout.splitlines() if "--quiet" in line)
        assert "progress" in quiet_line, quiet_line
    assert lines  # options were listed


def test_a_mistyped_alias_fails_at_once_naming_the_known_ones():
    from transmute_cli.errors import ModelError
    from transmute_cli.models import resolve

    with pytest.raises(ModelError) as info:
        resolve("gemma-3-270M-it")
    assert str(info.value) == ("gemma-3-270M-it: unknown model alias (did you mean 'gemma-3-270m'? "
                               "known aliases: gemma-3-270m)")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a hub endpoint nothing listens on."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hub"


def test_a_hub_id_without_network_fails_fast_in_one_line(no_hub):
    from transmute_cli.errors import ModelError
    from transmute_cli.models import resolve

    with pytest.raises(ModelError) as info:
        resolve("someone/some-model")
    assert str(info.value) == (
        "someone/some-model: not an alias (known aliases: gemma-3-270m), a local model folder or a .gguf file, "
        "and not in the Hugging Face cache; the hub cannot be reached from here to download it")


def test_a_hub_id_in_the_local_cache_loads_from_there(no_hub):
    from transmute_cli.models import resolve

    snapshot = no_hub / "models--someone--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (no_hub / "models--someone--some-model" / "refs").mkdir()
    (no_hub / "models--someone--some-model" / "refs" / "main").write_text("abc123")
    source = resolve("someone/some-model")
    assert (source.kind, source.path) == ("hub", str(snapshot))
