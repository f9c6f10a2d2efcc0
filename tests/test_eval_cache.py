"""Generation cache: what the key covers, and correctness with concurrent threads and processes."""

from __future__ import annotations

import multiprocessing as mp
import threading

from decodetune import DecodingConfig
from decodetune.cache import GenerationCache, cache_key, model_fingerprint
from decodetune.models.handle import LoadedModel

GREEDY = DecodingConfig(strategy="greedy")
SAMPLE = DecodingConfig(strategy="sample", temperature=0.8)


def test_key_covers_what_changes_tokens_and_nothing_else():
    k = cache_key("m", [1, 2, 3], GREEDY, 5)
    assert k == cache_key("m", [1, 2, 3], GREEDY.replace(temperature=0.2, top_p=0.5), 99)  # greedy: no sampler
    assert k != cache_key("m2", [1, 2, 3], GREEDY, 5)
    assert k != cache_key("m", [1, 2, 4], GREEDY, 5)
    assert k != cache_key("m", [1, 2, 3], GREEDY.replace(max_new_tokens=5), 5)
    assert k != cache_key("m", [1, 2, 3], GREEDY.replace(stop=["\n"]), 5)
    assert k != cache_key("m", [1, 2, 3], GREEDY.replace(repetition_penalty=1.2), 5)
    s = cache_key("m", [1], SAMPLE, 1)
    assert s != cache_key("m", [1], SAMPLE, 2)  # sampling: the seed matters
    assert s != cache_key("m", [1], SAMPLE.replace(top_k=5), 1)
    assert s != cache_key("m", [1], SAMPLE.replace(sampler_order=["top_k", "temperature"]), 1)
    beam = DecodingConfig(strategy="beam", num_beams=3)
    assert cache_key("m", [1], beam, 1) == cache_key("m", [1], beam, 2)  # deterministic: seed ignored


def test_same_name_different_weights_do_not_collide(tiny_tokenizer):
    from conftest import build_tiny_model

    a = LoadedModel(build_tiny_model(len(tiny_tokenizer), seed=0), tiny_tokenizer, name="custom")
    b = LoadedModel(build_tiny_model(len(tiny_tokenizer), seed=1), tiny_tokenizer, name="custom")
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(a) == model_fingerprint(a) and model_fingerprint(a).startswith("custom:")


def test_roundtrip_and_first_writer_wins(tmp_path):
    with GenerationCache(tmp_path / "c.sqlite") as c:
        c.put_many({"k1": [{"text": "héllo ✓", "token_ids": [1, 2]}]})
        c.put_many({"k1": [{"text": "other"}], "k2": [{"text": "x"}]})
        assert c.get("k1") == [{"text": "héllo ✓", "token_ids": [1, 2]}]
        assert c.get_many(["k1", "k2", "k3"]).keys() == {"k1", "k2"}
        assert (c.hits, c.misses) == (3, 1) and len(c) == 2


def _worker(path: str, worker: int, n_keys: int, errors) -> None:
    try:
        cache = GenerationCache(path, timeout_s=60)
        for i in range(n_keys):
            # overlapping keys between workers; each write is its own transaction
            key = f"key-{(i + worker * 7) % n_keys}"
            cache.put_many({key: [{"text": key, "token_ids": [i]}]})
            got = cache.get_many([key, f"key-{i}"])
            assert got[key][0]["text"] == key
        cache.close()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"{worker}: {type(e).__name__}: {e}")


def test_concurrent_processes_share_one_file(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(path, w, 60, errors)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert all(p.exitcode == 0 for p in procs)
    assert errors.empty(), errors.get()
    cache = GenerationCache(path)
    assert len(cache) == 60
    assert all(v[0]["text"] == k for k, v in cache.get_many([f"key-{i}" for i in range(60)]).items())


def test_concurrent_threads_share_one_object(tmp_path):
    cache = GenerationCache(tmp_path / "t.sqlite")
    import queue

    errors: queue.Queue = queue.Queue()
    threads = [threading.Thread(target=_worker, args=(str(cache.path), w, 40, errors)) for w in range(4)]
    shared = [threading.Thread(target=lambda: [cache.put_many({f"s{i}": [{"text": str(i)}]}) for i in range(30)])
              for _ in range(3)]
    for t in threads + shared:
        t.start()
    for t in threads + shared:
        t.join(120)
    assert errors.empty(), errors.get()
    assert len(cache) == 40 + 30


def test_cache_object_pickles_for_process_pools(tmp_path):
    import pickle

    cache = GenerationCache(tmp_path / "p.sqlite")
    cache.put_many({"a": [{"text": "1"}]})
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.get("a") == [{"text": "1"}]
