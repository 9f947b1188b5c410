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
    from transmute_cli.model.loading import resolve

    with pytest.raises(ModelError) as info:
        resolve("gemma-3-270M-it")
    assert str(info.value) == ("gemma-3-270M-it: unknown model alias (did you mean 'gemma-3-270m'? "
                               "known aliases: gemma-3-270m, smollm2-135m-instruct)")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and a hub endpoint nothing listens on."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    return tmp_path / "hub"


def test_a_hub_id_without_network_fails_fast_in_one_line(no_hub):
    from transmute_cli.errors import ModelError
    from transmute_cli.model.loading import resolve

    with pytest.raises(ModelError) as info:
        resolve("someone/some-model")
    assert str(info.value) == (
        "someone/some-model: not an alias (known aliases: gemma-3-270m, smollm2-135m-instruct), a local model folder or a .gguf file, "
        "and not in the Hugging Face cache; the hub cannot be reached from here to download it")


def test_a_hub_id_in_the_local_cache_loads_from_there(no_hub):
    from transmute_cli.model.loading import resolve

    snapshot = no_hub / "models--someone--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (no_hub / "models--someone--some-model" / "refs").mkdir()
    (no_hub / "models--someone--some-model" / "refs" / "main").write_text("abc123")
    source = resolve("someone/some-model")
    assert (source.kind, source.path) == ("hub", str(snapshot))


@pytest.mark.parametrize("every, shown", [(0.0, list(range(1, 19))), (3600.0, [1, 18])])
def test_progress_in_a_log_names_elapsed_time_and_shows_slow_layers(every, shown, capsys, monkeypatch):
    """Not on a TTY: a line per layer when layers take time (at most one per LOG_EVERY_S), first
    and last always, each saying the time is elapsed since the start."""
    from transmute_cli.report import terminal as report
    from transmute_cli.engine.loop import Progress

    monkeypatch.setattr(report.ProgressView, "LOG_EVERY_S", every)
    with report.ProgressView() as view:
        view.tty = False
        view(Progress("prepare", 0, 1, 0, 18))
        for layer in range(18):
            view(Progress("layer", 0, 1, layer, 18))
        view(Progress("fidelity", 0, 1, 17, 18))
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    layers = [int(line.split("layer ")[1].split("/")[0]) for line in lines if ": layer " in line]
    assert layers == shown
    assert lines[0].startswith("transmute: batch 1/1: prepare (elapsed ") and "fidelity" in lines[-1]
    assert all(line.endswith(" s)") and "(elapsed " in line for line in lines)


def test_demonstrations_are_rewritten_in_the_queried_template():
    from transmute_cli.recipe.datafiles import rerender

    instruction = "Translate English to French.\ncat -> chat\nwater -> eau\n"
    assert rerender(instruction, "{input} -> {output}", "Q: {input}\nA: {output}") == \
        "Translate English to French.\nQ: cat\nA: chat\nQ: water\nA: eau\n"
    assert rerender("Q: cat\nA: chat\n", "Q: {input}\nA: {output}", "{input} = {output}") == "cat = chat\n"
    # an instruction without demonstrations in that template: nothing to rewrite
    assert rerender("Answer in French.\n", "{input} -> {output}", "{input}: {output}") is None
