"""Fixtures shared across test modules (the expensive oracle is loaded once per run)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and with two a busy neighbour
    process makes each of their many small ops spin-wait (10x slower and more)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_reference():
    """transformers' own loading of the embedded SmolLM2 GGUF, float32: the oracle."""
    from transformers import AutoModelForCausalLM

    from mtpd.model.default_model import default_model_path

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
