"moebook.corpus: the committed manifest is reproducible, the cache is keyed by the recipe, batches are pure functions."
import dataclasses, json, platform, subprocess, sys

import numpy as np
import pytest
import tokenizers
import torch

from conftest import ROOT
from moebook.corpus import (DOMAINS, MANIFEST_PATH, SPLITS, Corpus, CorpusRecipe, collect_domain, compare_manifest, load_corpus,
                            unigram_cross_entropy)

SMALL = CorpusRecipe(max_bytes_per_domain=50_000, max_doc_bytes=4096, vocab_size=400, tokenizer_sample_bytes=20_000)


@pytest.fixture(scope="module")
def default_corpus(tmp_path_factory):
    "The default recipe, built from scratch (not from the user's cache)."
    return load_corpus(CorpusRecipe(), tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    return load_corpus(SMALL, tmp_path_factory.mktemp("small"))


def test_manifest_path_is_the_committed_one():
    assert MANIFEST_PATH == ROOT / "data" / "corpus_manifest.json" and MANIFEST_PATH.exists()


def test_committed_manifest_describes_the_default_recipe():
    committed = json.loads(MANIFEST_PATH.read_text())
    assert committed["recipe"] == dataclasses.asdict(CorpusRecipe()), "data/corpus_manifest.json is not the default recipe's: rewrite it with write_manifest(load_corpus())"
    assert committed["domain_order"] == list(DOMAINS)
    for d in DOMAINS:
        assert committed["domains"][d]["provenance"]
        tr, va = (committed["domains"][d]["splits"][s] for s in SPLITS)
        assert set(tr.get("source_ids", [])).isdisjoint(va.get("source_ids", [])), f"{d}: a source is in both splits"
        assert tr["tokens"] > 10 * 2048 and va["tokens"] > 2048


def locked_version(name: str) -> str:
    "The version of `name` that constraints.txt (the lock `make install` uses) pins."
    pins = dict(l.split("==", 1) for l in (ROOT / "constraints.txt").read_text().split() if "==" in l)
    return pins[name]


def test_committed_manifest_was_built_with_the_locked_tokenizers():
    "Upgrading tokenizers in the lock means rebuilding the manifest, so the locked environment always compares token checksums."
    committed = json.loads(MANIFEST_PATH.read_text())
    assert committed["tokenizers"] == locked_version("tokenizers"), (
        "constraints.txt and data/corpus_manifest.json disagree on tokenizers: rewrite the manifest with write_manifest(load_corpus())")


@pytest.mark.slow
def test_rebuild_reproduces_committed_manifest(request):
    "The default corpus, rebuilt from scratch, has the committed manifest's text and token checksums (versions checked first)."
    committed = json.loads(MANIFEST_PATH.read_text())
    if platform.python_version() != committed["python"]:  # the lock cannot pin Python's patch version
        pytest.skip(f"the committed manifest was built with Python {committed['python']}, this is Python "
                    f"{platform.python_version()}: the standard library (the corpus's text) differs between versions")
    assert tokenizers.__version__ == committed["tokenizers"], (
        f"tokenizers {tokenizers.__version__} is installed, the manifest (and constraints.txt) has {committed['tokenizers']}: "
        "install the locked versions (make install) to check the token checksums")
    built = request.getfixturevalue("default_corpus")  # the minutes-long build, once the versions are known to match
    assert compare_manifest(built.manifest, committed) == {"text": "equal", "tokens": "equal"}


def test_cache_is_reused_and_keyed_by_recipe(tmp_path):
    a = load_corpus(SMALL, tmp_path)
    mtime = (a.path / "manifest.json").stat().st_mtime_ns
    b = load_corpus(SMALL, tmp_path)
    assert b.path == a.path and (b.path / "manifest.json").stat().st_mtime_ns == mtime  # not rebuilt
    c = load_corpus(dataclasses.replace(SMALL, vocab_size=300), tmp_path)
    assert c.path != a.path and c.vocab_size == 300
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([a.path.name, c.path.name])  # no temporary leftovers


@pytest.mark.slow
def test_batches_are_pure_functions_across_processes(small_corpus):
    "A fresh process (as after a restart) draws exactly the same batches."
    code = (f"import torch; from moebook.corpus import Corpus; c = Corpus({str(small_corpus.path)!r}); "
            "ids, dom = c.global_batch(7, 4, 2, 32, seed=3); m, md = c.mixture_batch({'code': 0.6, 'english': 0.4}, 7, 1, 3, 32, seed=3); "
            "print(sum(ids.flatten().tolist()), dom.flatten().tolist(), sum(m.flatten().tolist()), md.tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    ids, dom = small_corpus.global_batch(7, 4, 2, 32, seed=3)
    m, md = small_corpus.mixture_batch({"code": 0.6, "english": 0.4}, 7, 1, 3, 32, seed=3)
    assert out == f"{sum(ids.flatten().tolist())} {dom.flatten().tolist()} {sum(m.flatten().tolist())} {md.tolist()}"


def test_global_batch_micro_batches_are_domain_homogeneous(small_corpus):
    c = small_corpus
    for step in range(20):
        ids, dom = c.global_batch(step, 6, 2, 24, seed=0)
        assert ids.shape == (6, 2, 24) and ids.dtype == torch.long
        counts = np.bincount(dom[:, 0].numpy(), minlength=4)
        assert counts.max() - counts.min() <= 1  # balanced within the step
        for m in range(6):
            d = c.domains[dom[m, 0]]
            assert (dom[m] == dom[m, 0]).all()
            stream = np.asarray(c.tokens(d, "train"), dtype=np.int64)
            for row in ids[m].numpy():  # every row is a window of its domain's stream
                starts = np.flatnonzero(stream[: len(stream) - 23] == row[0])
                assert any((stream[s:s + 24] == row).all() for s in starts)


def test_validation_batches_are_fixed_and_disjoint(small_corpus):
    c = small_corpus
    for d in DOMAINS:
        n = c.num_validation_batches(d, 2, 32)
        assert n >= 1
        batches = list(c.validation_batches(d, 2, 32))
        assert len(batches) == n
        flat = torch.cat([b.reshape(-1) for b in batches])
        assert torch.equal(flat, torch.from_numpy(np.asarray(c.tokens(d, "validation")[: n * 64], dtype=np.int64)))


def test_bad_input_is_refused_with_clear_errors(small_corpus):
    c = small_corpus
    with pytest.raises(KeyError, match="unknown domain 'math'"): c.domain_batch("math")
    with pytest.raises(ValueError, match="seq_len=1000000 is larger than"): c.global_batch(0, 4, 2, 10**6)
    with pytest.raises(ValueError, match="weights must sum to 1"): c.mixture_batch({"code": 0.5}, 0)
    with pytest.raises(ValueError, match="must be a finite number"): c.mixture_batch({"code": float("nan")}, 0)
    with pytest.raises(ValueError, match="n_micro must be >= 1"): c.global_batch(0, 0, 2, 16)
    with pytest.raises(ValueError, match="step must be >= 0"): c.domain_batch("code", step=-1)
    with pytest.raises(TypeError, match="recipe must be a CorpusRecipe"): load_corpus({"vocab_size": 10})
    with pytest.raises(FileNotFoundError, match="no corpus"): Corpus(ROOT / "nonexistent")


@pytest.mark.slow
def test_domains_differ(default_corpus):
    ce = unigram_cross_entropy(default_corpus)
    assert (ce.argmin(axis=0) == np.arange(len(DOMAINS))).all(), ce


def test_streams_are_the_encoded_documents(small_corpus):
    "The train stream starts with the first train document, encoded, then EOS; decoding gives the text back."
    tok = small_corpus.tokenizer
    for d in DOMAINS:
        text = collect_domain(d, SMALL).docs["train"][0][1]
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        stream = np.asarray(small_corpus.tokens(d, "train")[: len(ids) + 1], dtype=np.int64).tolist()
        assert stream == ids + [small_corpus.eos_id]
