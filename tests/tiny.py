"""Tiny random models of each supported family, built from configs (nothing is downloaded),
and a character-level tokenizer that behaves like a real one (BOS, pad, decode, save)."""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

CHARS = string.ascii_letters + string.digits + " \n->.,:;!?'\"()[]{}=+*/_"


def tiny_tokenizer(bos: bool = True) -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for ch in CHARS:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.decoder = decoders.Fuse()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )


VOCAB = 128


def tiny_config(family: str, **over):
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config, MistralConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )
    common.update(over)
    if family == "gemma3":
        return Gemma3TextConfig(head_dim=8, sliding_window=16, query_pre_attn_scalar=8, **common)
    if family == "llama":
        return LlamaConfig(head_dim=8, **common)
    if family == "llama_bias":
        return LlamaConfig(head_dim=8, mlp_bias=True, **common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=8, **common)
    if family == "mistral":
        return MistralConfig(head_dim=8, **common)
    raise KeyError(family)


def tiny_model(family: str, seed: int = 0, **over):
    torch.manual_seed(seed)
    cfg = tiny_config(family, **over)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # random init gives tiny weights; make norms and projections non-trivial so errors show
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(4.0)
    model.eval()
    return model


def assert_same_patch(a, b, atol: float = 1e-5, rtol: float = 1e-4) -> None:
    """Two ThoughtPatches hold the same layers and, layer by layer, the same tensors."""
    for kind in ("matrices", "vectors", "downs"):
        x, y = getattr(a, kind), getattr(b, kind)
        assert set(x) == set(y), kind
        for l in x:
            assert torch.allclose(x[l], y[l], atol=atol, rtol=rtol), (kind, l)
