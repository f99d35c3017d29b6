"""Tiny random-weight models of the supported families, saved as real Hugging Face folders for tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiny_model(model_type: str = "llama", layers: int = 2, vocab: int = 49152, seed: int = 0):
    """A randomly initialised causal LM (hidden 64, intermediate 160, 4 heads / 2 KV heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def save_tiny(folder: Path, tokenizer_folder: str, model_type: str = "llama", layers: int = 2) -> str:
    """Save a tiny model plus a real tokenizer (copied from ``tokenizer_folder``) as an HF folder."""
    model = tiny_model(model_type, layers)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_folder) / name, folder / name)
    return str(folder)


def save_llama70b_twin(folder: Path, tokenizer_folder: str) -> str:
    """Llama-3-70B's module graph at tiny width: 80 layers, 8 query heads per KV head, MLP 3.5x hidden, untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=80, num_attention_heads=8,
                         num_key_value_heads=1, vocab_size=49152, max_position_embeddings=1024,
                         tie_word_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="5MB")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_folder) / name, folder / name)
    return str(folder)
