"""Layers spread by an accelerate device map, some offloaded to disk (weights are meta tensors
until their layer runs): the layer-wise loop gives the same patch as the model in memory."""

from __future__ import annotations

import torch

from transmute_cli.model import loading as models
from transmute_cli.engine.loop import EngineConfig, compute_patch

from tiny import tiny_model, tiny_tokenizer

INSTRUCTION = "Reverse the word:\nabc -> cba\nhat -> tah\n"
TEXTS = [f"{w} -> {w[::-1]}\n" for w in ("dog", "cat", "sun", "moon", "tree", "lamp")]


def test_disk_offloaded_layers_give_the_same_patch(tmp_path):
    for family in ("gemma3", "llama"):
        folder = tmp_path / family
        tiny_model(family).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        cfg = EngineConfig(rho=0.1, solver="joint", batches=2)
        ref_model, tok, _ = models.load(str(folder), device="cpu")
        ref = compute_patch(ref_model, tok, INSTRUCTION, TEXTS, cfg)
        dmap = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                "model.layers.1": "disk", "model.layers.2": "disk", "model.norm": "cpu", "lm_head": "cpu"}
        off_model, tok, _ = models.load(str(folder), device_map=dmap, offload_folder=str(tmp_path / f"off-{family}"))
        assert any(p.device.type == "meta" for p in off_model.parameters())  # really offloaded
        got = compute_patch(off_model, tok, INSTRUCTION, TEXTS, cfg)
        for a, b in ((ref.patch.matrices, got.patch.matrices), (ref.patch.vectors, got.patch.vectors),
                     (ref.patch.downs, got.patch.downs)):
            assert set(a) == set(b)
            for l in a:
                assert torch.allclose(a[l], b[l], rtol=1e-4, atol=1e-5), (family, l)
        assert abs(ref.fidelity.mean_kl - got.fidelity.mean_kl) < 1e-5
