"""The tiny models the tests share: the repository's paths, a random byte-vocabulary LLaMA and the
`configs/tiny_cpu.py` training config shrunk to test size."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from longrope_jax.model import LlamaConfig

REPO = Path(__file__).resolve().parents[1]
TINY_CPU = REPO / "configs" / "tiny_cpu.py"

# The byte tokenizer's vocabulary (256 bytes + BOS 256, EOS 257, PAD and spares).
BYTE_VOCAB, BYTE_BOS, BYTE_EOS = 264, 256, 257

# The model section of every tiny training run (train tests, multi-process train tests): two layers x
# 64 wide, 4 heads of 16 (2 KV heads), context 64; as small as the 8-device mesh splits allow.
TRAIN_MODEL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=64)


def random_byte_llama(*, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
                      max_position_embeddings: int, **kw) -> LlamaConfig:
    """A LLaMA over the byte tokenizer's vocabulary with a large init (initializer_range 0.3), so a
    random model's perplexity depends visibly on the rotary frequencies. The sizes differ per test
    module (evaluation runs many windows, the search a few longer ones) and are always spelled out."""
    return LlamaConfig(**{**dict(vocab_size=BYTE_VOCAB, hidden_size=hidden_size, intermediate_size=intermediate_size,
                                 num_hidden_layers=num_hidden_layers, num_attention_heads=4,
                                 max_position_embeddings=max_position_embeddings, bos_token_id=BYTE_BOS,
                                 eos_token_id=BYTE_EOS, initializer_range=0.3), **kw})


def tiny_train_config(data_dir: str, **sections) -> ml_collections.ConfigDict:
    """tiny_cpu shrunk to test size on 8 devices (fsdp 8); `sections` are dotted overrides like train__steps=4."""
    from longrope_jax.train.trainer import parse_train_args

    c, _ = parse_train_args(["--config", str(TINY_CPU), "--workdir", "unused"])
    c.model.update(**TRAIN_MODEL)
    c.train.update(steps=6, batch_size=8, seq_len=64)
    c.mesh.update(fsdp=8)
    c.checkpoint.update(every_steps=2, keep=5)
    c.eval.update(every_steps=3, batches=1, batch_size=8)
    c.logging.update(every_steps=1, progress=False)
    c.data.update(data_dir=str(data_dir))
    for key, value in sections.items():
        section, name = key.split("__")
        c[section][name] = value
    return c
