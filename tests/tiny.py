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
