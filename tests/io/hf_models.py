"""Tiny random HF models written by `save_pretrained`, and how the io tests compare them: logits from
`LlamaForCausalLM` / `MistralForCausalLM` (torch, fp32), tensors read back with `safetensors.torch`."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from safetensors.torch import load_file as st_load

from longrope_jax.model import Llama, LlamaConfig

transformers.logging.set_verbosity_error()


TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
TOKENS = np.random.RandomState(0).randint(0, 97, size=(2, 13))


def make_hf(path: Path, arch: str = "llama", torch_dtype=torch.float32, seed: int = 0, **overrides) -> Path:
    """Save a tiny random HF model (norm scales random too, so a swapped norm shows up)."""
    cfg_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[arch]
    torch.manual_seed(seed)
    model = model_cls(cfg_cls(**{**TINY, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    model.to(torch_dtype).save_pretrained(path)
    return path


def hf_logits(path: Path, tokens=TOKENS) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def jax_logits(config: LlamaConfig, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(jax.jit(Llama(config).apply)({"params": params}, jnp.asarray(tokens)))


def assert_rel_close(got, want, rel=1e-4):
    err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
    assert err < rel, f"max error {err:.2e} relative to max |logit|; expected < {rel}"


def shapes(tree):
    return jax.tree.map(lambda x: (tuple(x.shape), jnp.dtype(x.dtype).name), tree)


def assert_same_tensors(dir_a: Path, dir_b: Path):
    """Every tensor of two HF directories bit-identical (read with the safetensors library)."""
    a, b = read_all(dir_a), read_all(dir_b)
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def read_all(d: Path) -> dict:
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(st_load(f))
    return out
