"""The io tests' shared HF directories: one tiny random LLaMA and one word-level tokenizer."""

from pathlib import Path

import pytest
import transformers

from tests.io.hf_models import make_hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return make_hf(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(97)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(d)
    transformers.GenerationConfig(bos_token_id=1, eos_token_id=2, max_new_tokens=7).save_pretrained(d)
    return d
