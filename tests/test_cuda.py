"""The same run on a CUDA GPU gives the CPU's numbers (skipped where there is no GPU)."""
import pytest
import torch

import stages
from stages import tokenize

from .runs import record_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_cuda_run_matches_cpu(embedded_path, embedded_model):
    on_gpu = stages.load_model(embedded_path, device="cuda")
    assert on_gpu.device.type == "cuda"
    ids = tokenize(embedded_model.tokenizer, "What is the capital of France?", chat=True)
    cpu_ids, cpu = record_run(embedded_model, ids, 8)
    gpu_ids, gpu = record_run(on_gpu, ids, 8)
    assert gpu_ids == cpu_ids
    for key in [(13, "scores (softmax)", 0, 0), (18, "out", 29, 0), (19, "logits", None, 3)]:
        torch.testing.assert_close(gpu[key], cpu[key], rtol=1e-3, atol=1e-3)
