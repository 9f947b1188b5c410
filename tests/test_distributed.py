"""The statistics are sums, so sharding examples over processes and all_reduce'ing them gives
the same patch as one process: 2 CPU processes on the gloo backend."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transmute_cli.engine.distributed import leave_distributed
from transmute_cli.engine.loop import EngineConfig, compute_patch

from tiny import tiny_model, tiny_tokenizer

INSTRUCTION = "Reverse the word:\nabc -> cba\nhat -> tah\n"
TEXTS = [f"{w} -> {w[::-1]}\n" for w in ("dog", "cat", "sun", "moon", "tree", "lamp", "fish", "bird", "road")]
CFG = dict(rho=0.1, batches=2, solver="joint", micro_batch=2, preserve_weight=0.5)
# preservation texts are sharded over the ranks as well (3 texts: uneven shares)
PRESERVE = ["Uppercase:\nab -> AB\n", "the quick brown fox\n", "one two three four five\n"]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    ok = False
    try:
        torch.set_num_threads(1)
        res = compute_patch(tiny_model("llama"), tiny_tokenizer(), INSTRUCTION, TEXTS, EngineConfig(distributed=True, **CFG),
                            preserve=PRESERVE)
        if rank == 0:
            torch.save({"m": res.patch.matrices, "v": res.patch.vectors, "d": res.patch.downs,
                        "kl": res.fidelity.mean_kl, "tokens": res.fidelity.tokens, "pkl": res.fidelity.preserve_mean_kl}, out)
        ok = True
    finally:
        leave_distributed(barrier=ok)  # a bare destroy_process_group can SIGABRT at exit (see its doc)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world", [2])
def test_two_gloo_processes_give_the_same_patch_as_one(tmp_path, world):
    out = tmp_path / "patch.pt"
    mp.spawn(_worker, args=(world, _free_port(), str(out)), nprocs=world, join=True)
    got = torch.load(out, weights_only=True)  # our own file from this test, tensors only
    one = compute_patch(tiny_model("llama"), tiny_tokenizer(), INSTRUCTION, TEXTS, EngineConfig(**CFG), preserve=PRESERVE)
    assert got["tokens"] == one.fidelity.tokens
    assert abs(got["kl"] - one.fidelity.mean_kl) < 1e-5
    assert abs(got["pkl"] - one.fidelity.preserve_mean_kl) < 1e-5
    for key, ref in (("m", one.patch.matrices), ("v", one.patch.vectors), ("d", one.patch.downs)):
        assert set(got[key]) == set(ref)
        for l in ref:
            assert torch.allclose(got[key][l], ref[l], rtol=1e-4, atol=1e-5), (key, l)


def test_compute_under_torchrun_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m transmute_cli compute` writes the same patch as one process."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    model = tiny_model("llama")
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    examples = "\n".join(f"  - [{t.split(' -> ')[0]}, {t.split(' -> ')[1].strip()}]" for t in TEXTS)
    (tmp_path / "r.yaml").write_text(f"model: {tmp_path / 'model'}\ninstruction: |\n  Reverse the word:\n  abc -> cba\n"
                                     f"examples:\n{examples}\nrho: 0.1\nbatches: 2\nsolver: joint\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = ["compute", str(tmp_path / "r.yaml"), "--device", "cpu", "--no-eval", "--no-checkpoint", "-q"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(_free_port()), "-m", "transmute_cli", *common, "-o", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "transmute_cli", *common, "-o", str(tmp_path / "one")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_file(tmp_path / "one" / "patch.safetensors"), load_file(tmp_path / "two" / "patch.safetensors")
    assert set(a) == set(b)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
