import llama_trace  # noqa: F401  (makes `import trace` reach this project's package)
import pytest
import torch

import stages
from stages.embedded import embedded_model_path

from trace.verify import load_hf_gguf, tiny_pair

torch.manual_seed(0)


@pytest.fixture(scope="session")
def embedded_path():
    return embedded_model_path(announce=lambda msg: print(msg))


@pytest.fixture(scope="session")
def embedded_model(embedded_path):
    return stages.load_model(embedded_path, device="cpu")


@pytest.fixture(scope="session")
def hf_embedded(embedded_path):
    """transformers' own LlamaForCausalLM and tokenizer on the same GGUF file."""
    return load_hf_gguf(embedded_path)


@pytest.fixture(scope="session", params=[(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
def tiny(request, tmp_path_factory):
    """(our Model, HF LlamaForCausalLM) with the same random weights, via a real GGUF file."""
    n_heads, n_kv_heads = request.param
    return tiny_pair(tmp_path_factory.mktemp("tiny") / "tiny.gguf", n_heads, n_kv_heads)
