"""Tiny random HF checkpoints (built by transformers inside the test run) and helpers to compare.

Nothing is downloaded: each checkpoint is a random-initialised transformers model saved to a
temporary directory. Norm weights and biases are perturbed away from their 1 / 0 defaults so
that every parameter of the mapping is exercised.
"""

from __future__ import annotations

import numpy as np
import torch

VOCAB = 97


def hf_config(family: str, *, tie: bool | None = None):
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, initializer_range=0.08, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2)
    if family == "llama":
        return transformers.LlamaConfig(
            **common, tie_word_embeddings=bool(tie),
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 64})
    if family == "qwen2":
        return transformers.Qwen2Config(**common, tie_word_embeddings=True if tie is None else tie,
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "qwen3":
        # head_dim independent of hidden_size / num_heads, as in Qwen3.
        return transformers.Qwen3Config(**common, head_dim=24, tie_word_embeddings=bool(tie),
                                        rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    raise ValueError(family)


def make_hf_model(family: str, seed: int = 0, **kw):
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(family, **kw)
    cfg._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
    return model.float().eval()


def save_hf_model(model, path: str, **kw) -> str:
    model.save_pretrained(path, safe_serialization=True, **kw)
    return path


def left_padded_batch(lengths, total: int, seed: int = 0, vocab: int = VOCAB):
    """tokens [B, total] left-padded with 0, mask [B, total], positions [B, total] (0 on padding)."""
    rng = np.random.default_rng(seed)
    b = len(lengths)
    tokens = np.zeros((b, total), np.int32)
    mask = np.zeros((b, total), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, total - n:] = rng.integers(3, vocab, size=n)
        mask[i, total - n:] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return tokens, mask, positions


def hf_logits(model, tokens, mask, positions) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    position_ids=torch.tensor(positions, dtype=torch.long))
    return out.logits.float().numpy()
