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


def save_llama70b_twin(folder: Path, tokenizer_folder: str, layers: int = 80) -> str:
    """Llama-3-70B's module graph at tiny width: 80 layers, 8 query heads per KV head, MLP 3.5x hidden, untied."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=1, vocab_size=49152, max_position_embeddings=1024,
                         tie_word_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="5MB")
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_folder) / name, folder / name)
    return str(folder)


def tiny_family(model_type: str, layers: int = 3, vocab: int = 49152, seed: int = 0):
    """A random causal LM of ``model_type`` ("gemma3_text" or "qwen2") whose layers mix sliding-window (8 tokens)
    and global attention, so that layer inputs differ by layer type; hidden 64, 4 heads / 2 KV heads, tied."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=1024, tie_word_embeddings=True,
                  sliding_window=8)
    if model_type == "gemma3_text":  # Gemma-3's pattern (global every 6th) at 3 layers: sliding, global, sliding
        extra = dict(head_dim=16, query_pre_attn_scalar=16,
                     layer_types=["full_attention" if i % 2 else "sliding_attention" for i in range(layers)])
    elif model_type == "qwen2":  # global first layer, sliding after it
        extra = dict(use_sliding_window=True, max_window_layers=1)
    else:
        raise ValueError(f"no tiny recipe for {model_type!r}")
    config = AutoConfig.for_model(model_type, **common, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def save_tiny_family(folder: Path, tokenizer_folder: str, model_type: str, layers: int = 3) -> str:
    """Save ``tiny_family(model_type, layers)`` plus a real tokenizer (copied from ``tokenizer_folder``)."""
    tiny_family(model_type, layers).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(tokenizer_folder) / name, folder / name)
    return str(folder)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_tiny_run(root: str, source: str, run_id: str = "r", ratio: float = 0.25) -> str:
    """Compress the model in folder ``source`` by plain SVD (no calibration, no Ray) and commit it as run
    ``run_id`` under ``root`` the way the job's reducer does: shards from the source and a stage, the Hugging Face
    files, nesta.json. Returns the run URI."""
    from nesta_ray.checkpoint.meta import RunMeta
    from nesta_ray.checkpoint.runs import RunWriter
    from nesta_ray.checkpoint.stage import LayerStage
    from nesta_ray.checkpoint.writer import write_meta, write_model_files, write_weights
    from nesta_ray.io.sources import ModelSource, load_model
    from nesta_ray.method.decompose import Method, decompose
    from nesta_ray.model.arch import arch_for
    from nesta_ray.model.layers import tied_aliases
    from nesta_ray.plan.linears import make_plan

    model, _ = load_model(source)
    spec, method = arch_for(model.config.model_type), Method("svd")
    plan = make_plan(model, spec, method=method, ratio=ratio, targets=TARGETS)
    stage = LayerStage(f"{root}-stage", run_id)
    for layer in plan.layers():
        stage.put(layer, {p.name: decompose(model.get_submodule(p.name).weight.detach(), method, p.rank)
                          for p in plan.modules if p.layer == layer})
    writer = RunWriter(root, run_id)
    records = write_weights(writer, ModelSource(source, source), plan, stage, spec, model.config.num_hidden_layers,
                            1 << 20)
    write_model_files(writer, source, {name: r.rank for name, r in records.items()}, "float32")
    write_meta(writer, RunMeta(run_id, "float32", method, ratio, records, tied_aliases(model)))
    return writer.commit()
