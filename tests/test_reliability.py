"""Interrupts: a real SIGINT to a `transmute compute` subprocess, at several moments, never
leaves a partial output and never damages the previous output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import tiny_model, tiny_tokenizer

WORDS = ["dog", "cat", "hat", "sun", "moon", "tree", "lamp", "door", "fish", "bird", "road", "milk"]


@pytest.fixture(scope="module")
def slow_setup(tmp_path_factory):
    """A tiny-but-not-instant model and a recipe with many examples, so compute takes seconds."""
    root = tmp_path_factory.mktemp("interrupt")
    model = tiny_model("llama", hidden_size=96, intermediate_size=384, num_hidden_layers=6)
    model.save_pretrained(root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    pairs = [f"  - [{w}{i}, {w[::-1]}{i}]" for i in range(40) for w in WORDS]
    (root / "r.yaml").write_text(
        f"model: {root / 'model'}\ninstruction: |\n  Reverse:\n  abc -> cba\n"
        "examples:\n" + "\n".join(pairs) + "\neval:\n  - [pot, top]\nmax_new_tokens: 3\nbatches: 4\nsolver: joint\n"
    )
    return root


def _default_sigint() -> None:
    """A shell that starts the suite in the background (`cmd &`) ignores SIGINT, and its children
    inherit that: Python then installs no KeyboardInterrupt handler and every run "finishes".  The
    child gets the default disposition back, as a user's terminal would give it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "transmute_cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=_default_sigint, **kw)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_sigint_leaves_no_partial_output_and_keeps_the_previous_one(slow_setup):
    root = slow_setup
    out = root / "run"
    done = subprocess.run([sys.executable, "-m", "transmute_cli", "compute", str(root / "r.yaml"), "-o", str(out), "-q",
                           "--no-eval"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    before = _snapshot(out)
    survived = 0
    for delay in (0.2, 1.0, 2.5, 5.0):
        p = _run(["compute", str(root / "r.yaml"), "-o", str(out), "--overwrite", "--no-eval"])
        # wait until the work has really started, then interrupt after `delay`
        line = p.stderr.readline()
        assert "transmute:" in line
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=120)
        assert "Traceback" not in err
        now = _snapshot(out)
        if p.returncode == 0 or (p.returncode == -signal.SIGINT and now != before):
            # finished before the signal landed (at the latest while the interpreter was shutting
            # down, which ends the process by the signal itself): a complete new output
            assert {"patch.safetensors", "report.json", "report.md", "checkpoint/config.json"} <= set(now)
            before = now
            continue
        # interrupted while working: exit 130 (a shell sees 130 for death by SIGINT too)
        assert p.returncode in (130, -signal.SIGINT), err
        if p.returncode == 130:
            assert err.strip().splitlines()[-1] == "error: interrupted; no partial output was left behind"
        assert now == before  # the previous output is intact
        assert not [q for q in root.iterdir() if ".tmp-" in q.name or ".old-" in q.name]
        survived += 1
    assert survived >= 2
