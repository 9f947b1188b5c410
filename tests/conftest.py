"""Shared fixtures.

``tiny_model_dir``: saved tiny random models (tests/tiny.py) as local Hugging Face folders, the
kind of model spec a recipe's ``model:`` or ``--model`` accepts.  Nothing is downloaded.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Factory ``tiny_model_dir(family="llama", seed=0, **config_overrides) -> Path``: a folder
    with the tiny model (``model.save_pretrained``) and the char-level tokenizer, built once per
    distinct (family, seed, overrides) for the whole session."""
    from tiny import tiny_model, tiny_tokenizer

    cache: dict = {}

    def make(family: str = "llama", seed: int = 0, **over):
        key = (family, seed, tuple(sorted(over.items())))
        if key not in cache:
            suffix = "".join(f"-{k}{v}" for k, v in sorted(over.items()))
            folder = tmp_path_factory.mktemp(f"tiny-{family}-seed{seed}{suffix}")
            tiny_model(family, seed=seed, **over).save_pretrained(folder)
            tiny_tokenizer().save_pretrained(folder)
            cache[key] = folder
        return cache[key]

    return make


@pytest.fixture
def single_thread():
    """Tiny models on a shared 2-core machine: one torch thread is ~10x faster than contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
