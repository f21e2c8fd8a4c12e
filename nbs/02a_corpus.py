# %% [markdown]
# # A multi-domain corpus for tiny MoE language models
#
# > Four real, offline, deterministic text domains (English prose, Python code, arithmetic, Unicode names), a byte-level BPE tokenizer, cached token streams, and domain-homogeneous batch samplers.

# %% [markdown]
# Two paper notebooks need data with *domains*:
#
# - **"Demons in the Detail"** (Qiu et al., 2025) argues that computing the load-balancing loss inside each
#   micro-batch hurts expert specialisation, because in real pre-training a micro-batch holds a few long
#   sequences that usually come from one domain. Reproducing that needs micro-batches that are
#   domain-homogeneous while the global batch mixes domains, plus a *shuffled* control with the same data.
# - **"Continual pre-training of MoEs"** (Thérien et al., 2025) trains on one distribution, then continues on a
#   shifted one (English web text → code), optionally replaying a fraction of the old data.
#
# Nothing can be downloaded here, so the text comes from what every CPython install ships: the language
# reference and library topics of `pydoc_data.topics` plus the docstrings of standard-library modules
# (English prose), the standard library's own `.py` sources (Python code), deterministically generated
# arithmetic, and the Unicode character database of `unicodedata` (a table-like register with many scripts).
# Everything is a pure function of a small *recipe* and the Python version, so it is identical on every
# machine with the same CPython build; a manifest with checksums is committed in `data/corpus_manifest.json`.

# %%
#| default_exp corpus

# %%
#| export
from __future__ import annotations
import ast, dataclasses, hashlib, json, math, os, platform, random, shutil, sysconfig, tempfile, time
import unicodedata, warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from moebook.core import atomic_write_text, check_float, check_int

# %%
from fastcore.test import test_eq, test_ne, test_fail, test_close
from moebook.core import record_metrics, progress as progress_bar

# %% tags=["parameters"]
seed: int = 0  # seed of the batch samplers in the examples
progress: bool = True  # show progress bars
max_bytes_per_domain: int = 1_500_000  # text budget per domain for the experiment's corpus (the default recipe)
vocab_size: int = 4096  # BPE vocabulary size of the experiment's corpus
seq_len: int = 256  # sequence length of the batching examples
batch_size: int = 4  # sequences per micro-batch in the batching examples
n_micro: int = 8  # micro-batches per optimizer step in the batching examples
check_rebuild: bool = True  # claim check: rebuild the corpus from scratch in a fresh directory and compare checksums

# %% [markdown]
# ## The recipe
#
# A `CorpusRecipe` fixes everything that determines the corpus. Its hash, together with the Python and
# `tokenizers` versions and a format version of this module, names the cache directory, so changing any
# of them builds a new corpus instead of silently reusing a stale one.

# %%
#| export
DOMAINS = ("english", "code", "arithmetic", "unicode")  # the real domains of the default corpus
SYNTHETIC_DOMAINS = ("wordchain",)  # generated languages other corpora (moebook.cpt) may use
SPLITS = ("train", "validation")
EOS = "<|endoftext|>"
FORMAT_VERSION = 1  # bump when the way text or tokens are produced changes
# the committed manifest: relative to the package when imported, to `nbs/` when this notebook runs
MANIFEST_PATH = (Path(__file__).resolve().parents[1] if "__file__" in globals() else Path("..")) / "data" / "corpus_manifest.json"

@dataclass(frozen=True)
class CorpusRecipe:
    "Everything that determines the corpus (with the Python version)."
    max_bytes_per_domain: int = 1_500_000  # UTF-8 text budget per domain; validation gets `val_fraction` of it
    max_doc_bytes: int = 16_384  # longer sources are cut at line boundaries into documents of at most this size
    val_fraction: float = 0.1  # fraction of *sources* (files, topics, blocks) held out for validation
    vocab_size: int = 4096  # BPE vocabulary, including the 256 byte tokens and EOS
    tokenizer_sample_bytes: int = 300_000  # training-split bytes per domain the tokenizer is trained on
    arithmetic_seed: int = 0  # seed of the arithmetic generator

    def __post_init__(self):
        for name in ("max_bytes_per_domain", "max_doc_bytes", "vocab_size", "tokenizer_sample_bytes"): check_int(f"CorpusRecipe.{name}", getattr(self, name), 1)
        check_int("CorpusRecipe.arithmetic_seed", self.arithmetic_seed)
        if not (isinstance(self.val_fraction, float) and 0 < self.val_fraction < 0.5):
            raise ValueError(f"CorpusRecipe.val_fraction must be a float in (0, 0.5), got {self.val_fraction!r}")
        if not 258 <= self.vocab_size <= 65_535:
            raise ValueError(f"CorpusRecipe.vocab_size must be in [258, 65535] (byte alphabet + EOS, uint16 storage), got {self.vocab_size}")
        if self.max_doc_bytes < 256:
            raise ValueError(f"CorpusRecipe.max_doc_bytes must be >= 256, got {self.max_doc_bytes}")

    def key(self) -> str:
        "Cache key: hash of the recipe, Python version, tokenizers version and this module's format version."
        import tokenizers
        blob = json.dumps({"recipe": dataclasses.asdict(self), "python": platform.python_version(),
                           "tokenizers": tokenizers.__version__, "format": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# %%
test_eq(CorpusRecipe().key(), CorpusRecipe().key())
test_ne(CorpusRecipe().key(), CorpusRecipe(vocab_size=2048).key())
test_fail(lambda: CorpusRecipe(max_bytes_per_domain=0), contains="max_bytes_per_domain must be >= 1")
test_fail(lambda: CorpusRecipe(val_fraction=0.7), contains="val_fraction")
test_fail(lambda: CorpusRecipe(vocab_size=100), contains="vocab_size")


# %% [markdown]
# ## Deterministic hashing
#
# All randomness in this module goes through `stable_hash`, a BLAKE2b digest of the printed arguments. Unlike
# Python's `hash` (salted per process) or library RNGs (whose streams may change between versions), it is
# the same on every machine and version, and it makes every batch a pure function of its indices.

# %%
#| export
def stable_hash(*parts) -> int:
    "A 64-bit integer that depends only on the printed `parts` (stable across processes, machines, versions)."
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")

def stable_uniform(*parts) -> float:
    "A number in [0, 1) that depends only on `parts`."
    return stable_hash(*parts) / 2**64


# %%
test_eq(stable_hash("a", 1), stable_hash("a", 1))
test_ne(stable_hash("a", 1), stable_hash("a1"))
u = [stable_uniform("u", i) for i in range(2000)]
assert 0 <= min(u) and max(u) < 1 and abs(np.mean(u) - 0.5) < 0.03

# %% [markdown]
# ## The four domains
#
# Each domain is a list of *sources* (a file, a topic, a generated block); a source yields one or more
# documents. The train/validation split is decided per source by `stable_hash`, so no text of a validation
# source (e.g. one chunk of a long file) can leak into training. Sources are taken in a hash order (not
# alphabetically, which would give only modules starting with `a`–`c`) until the byte budget is reached.
#
# What varies between machines, and how it is pinned:
# - *file order* of `os.walk`: file lists are sorted, then ordered by a stable hash of the relative path;
# - *installed packages*: only the standard library is read (never `site-packages`);
# - *distribution patches and build files*: `_sysconfigdata_*` (build paths), `site.py`, `sysconfig.py`,
#   `distutils/` and `ensurepip/` (patched by some Linux distributions) and every `test`/`tests` directory
#   (removed by some distributions) are excluded;
# - *the Python version*: recorded in the manifest and part of the cache key (the standard library changes
#   between versions, and so does `unicodedata.unidata_version`).

# %%
#| export
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test", "lib-dynload",
                  "distutils", "ensurepip", "pydoc_data"}
_EXCLUDED_FILES = {"site.py", "sysconfig.py"}

def stdlib_root() -> Path:
    "Directory of the running interpreter's pure-Python standard library."
    return Path(sysconfig.get_paths()["stdlib"])

def stdlib_files(root: Path | None = None) -> list[str]:
    "Sorted relative paths of the standard library's `.py` files that every install of this version shares."
    root = Path(root or stdlib_root())
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("config-"))
        out += [(rel / f).as_posix() for f in filenames
                if f.endswith(".py") and f not in _EXCLUDED_FILES and not f.startswith("_sysconfigdata")]
    return sorted(out)


# %%
files = stdlib_files()
assert "json/decoder.py" in files and "os.py" in files
assert not any(f.startswith(("test/", "distutils/")) or "/tests/" in f or "sysconfigdata" in f for f in files)
test_eq(files, sorted(files))


# %% [markdown]
# Long sources are cut into documents at line boundaries, so that one 200 kB module cannot dominate a domain
# and the split can still hold out whole sources.

# %%
#| export
def split_lines(text: str, max_bytes: int) -> list[str]:
    "Cut `text` at line ends into pieces of at most `max_bytes` UTF-8 bytes (a longer single line is cut bytewise)."
    pieces, cur, size = [], [], 0
    for line in text.splitlines(keepends=True):
        b = len(line.encode("utf-8", "surrogatepass"))
        if size + b > max_bytes and cur: pieces.append("".join(cur)); cur, size = [], 0
        while b > max_bytes:  # a pathological single line
            head = line.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")
            pieces.append(head); line = line[len(head):]; b = len(line.encode("utf-8", "surrogatepass"))
        cur.append(line); size += b
    if cur: pieces.append("".join(cur))
    return pieces


# %%
test_eq(split_lines("ab\ncd\nef\n", 6), ["ab\ncd\n", "ef\n"])
test_eq("".join(split_lines("x" * 10 + "\ny\n", 4)), "x" * 10 + "\ny\n")
assert all(len(p) <= 4 for p in split_lines("x" * 10 + "\ny\n", 4))


# %% [markdown]
# The source generators. Each yields `(source_id, text)` pairs in a fixed order.
#
# - **english**: every topic of `pydoc_data.topics` (the language reference and library documentation
#   topics that `help()` shows), then, per standard-library module, its docstrings (module, classes,
#   functions) read with `ast` without importing anything;
# - **code**: the source of the standard-library modules (`pydoc_data` excluded: it *is* English prose);
# - **arithmetic**: blocks of 32 problems (`+ - *` on 1–4 digit numbers, exact answers) from a seeded
#   generator of Python's `random` module (Mersenne Twister, whose integer stream is stable across versions);
# - **unicode**: the Unicode character database, one line per named character
#   (`U+00E9\té\tLATIN SMALL LETTER E WITH ACUTE\tLl`), one source per block of 256 code points; algorithmic
#   names such as `CJK UNIFIED IDEOGRAPH-4E00` are skipped.
#
# One *synthetic* domain is not part of the default corpus (`SYNTHETIC_DOMAINS`): **wordchain**, sentences of
# 6–16 pseudo-words drawn from a sparse random Markov chain (64 words of 2–7 letters, 4 successors each with
# random weights, the first word uniform). Its entropy is known and a small model learns it to that floor
# within a few thousand steps, which real text never allows at this scale: `moebook.cpt` uses it where an
# experiment needs a *plateaued* pre-training.

# %%
#| export
def _hash_order(ids: list[str], domain: str) -> list[str]:
    return sorted(ids, key=lambda s: (stable_hash("order", domain, s), s))

def _docstrings(source: str) -> str:
    with warnings.catch_warnings():  # old modules have invalid escape sequences
        warnings.simplefilter("ignore")
        try: tree = ast.parse(source)
        except SyntaxError: return ""
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = [ast.get_docstring(n, clean=True) for n in ast.walk(tree) if isinstance(n, kinds)]
    return "\n\n".join(d.strip() for d in docs if d and d.strip()) + "\n"

def _read_source(root: Path, rel: str) -> str | None:
    try: return (root / rel).read_text(encoding="utf-8")
    except UnicodeDecodeError: return None

def english_sources(root: Path | None = None) -> Iterator[tuple[str, str]]:
    "pydoc topics (in hash order), then standard-library docstrings per module (in hash order)."
    from pydoc_data.topics import topics
    for name in _hash_order(sorted(topics), "english-topics"): yield f"pydoc_data.topics:{name}", topics[name].strip() + "\n"
    root = Path(root or stdlib_root())
    for rel in _hash_order(stdlib_files(root), "english-modules"):
        src = _read_source(root, rel)
        if src and len(text := _docstrings(src)) >= 200: yield f"docstrings:{rel}", text

def code_sources(root: Path | None = None) -> Iterator[tuple[str, str]]:
    "The standard library's `.py` files (in hash order)."
    root = Path(root or stdlib_root())
    for rel in _hash_order(stdlib_files(root), "code"):
        src = _read_source(root, rel)
        if src and src.strip(): yield f"stdlib:{rel}", src

def arithmetic_sources(seed: int = 0, problems_per_block: int = 32) -> Iterator[tuple[str, str]]:
    "Endless blocks of exact integer arithmetic, a pure function of `seed`."
    for block in range(10**9):
        rng = random.Random(stable_hash("arithmetic", seed, block))
        lines = []
        for _ in range(problems_per_block):
            op = "+-*"[rng.getrandbits(16) % 3]
            a, b = (rng.getrandbits(32) % 10 ** (1 + rng.getrandbits(8) % 4) for _ in range(2))
            lines.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}\n")
        yield f"arithmetic:{seed}:{block}", "".join(lines)

def wordchain_sources(seed: int = 0, n_words: int = 64, branching: int = 4, sentences_per_block: int = 32) -> Iterator[tuple[str, str]]:
    "Endless blocks of sentences of a synthetic language: a sparse random Markov chain over `n_words` pseudo-words."
    rng = random.Random(stable_hash("wordchain", seed))
    words: set[str] = set()
    while len(words) < n_words: words.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 7))))
    vocab = sorted(words)
    chain = {w: (rng.sample(vocab, branching), [rng.random() + 0.2 for _ in range(branching)]) for w in vocab}
    for block in range(10**9):
        r = random.Random(stable_hash("wordchain", seed, block))
        lines = []
        for _ in range(sentences_per_block):
            w = r.choice(vocab); sentence = [w]
            for _ in range(r.randint(5, 15)): w = r.choices(*chain[w])[0]; sentence.append(w)
            lines.append(" ".join(sentence) + ".\n")
        yield f"wordchain:{seed}:{block}", "".join(lines)

def unicode_sources() -> Iterator[tuple[str, str]]:
    "The Unicode character database, one source per block of 256 code points (in hash order)."
    blocks = {}
    for cp in range(0x110000):
        ch = chr(cp); name = unicodedata.name(ch, "")
        if not name or name.endswith((f"-{cp:04X}", f"-{cp:05X}")): continue
        blocks.setdefault(cp >> 8, []).append(f"U+{cp:04X}\t{ch}\t{name}\t{unicodedata.category(ch)}\n")
    ids = {f"unicode:U+{b << 8:04X}-U+{(b << 8) + 255:04X}": b for b in blocks}
    for sid in _hash_order(sorted(ids), "unicode"): yield sid, "".join(blocks[ids[sid]])

def domain_sources(domain: str, recipe: CorpusRecipe) -> Iterator[tuple[str, str]]:
    "The `(source_id, text)` stream of `domain`."
    if domain == "english": return english_sources()
    if domain == "code": return code_sources()
    if domain == "arithmetic": return arithmetic_sources(recipe.arithmetic_seed)
    if domain == "unicode": return unicode_sources()
    if domain == "wordchain": return wordchain_sources(recipe.arithmetic_seed)
    raise KeyError(f"unknown domain {domain!r}; the domains are {DOMAINS + SYNTHETIC_DOMAINS}")


# %%
src = dict(zip(range(3), arithmetic_sources(0)))
for sid, text in src.values():
    for line in text.splitlines():
        lhs, rhs = line.split(" = "); test_eq(eval(lhs), int(rhs))  # every answer is exact
test_eq(next(arithmetic_sources(0)), next(arithmetic_sources(0)))
test_ne(next(arithmetic_sources(0))[1], next(arithmetic_sources(1))[1])
sid, text = next(english_sources()); assert sid.startswith("pydoc_data.topics:") and len(text) > 100
assert "def " in next(code_sources())[1] or "import" in next(code_sources())[1]
assert "LATIN" in "".join(t for _, t in unicode_sources())
test_fail(lambda: domain_sources("german", CorpusRecipe()), contains="unknown domain 'german'")
wc = [t for _, (_, t) in zip(range(20), wordchain_sources(0))]
wc_words = {w for t in wc for w in t.replace(".", "").split()}
test_eq(len(wc_words), 64)  # the language's whole vocabulary occurs
nexts = {}
for t in wc:
    for line in t.splitlines():
        ws = line.rstrip(".").split(); [nexts.setdefault(a, set()).add(b) for a, b in zip(ws, ws[1:])]
assert max(len(v) for v in nexts.values()) <= 4  # each word has at most `branching` successors
test_eq(next(wordchain_sources(0)), next(wordchain_sources(0))); test_ne(next(wordchain_sources(0))[1], next(wordchain_sources(1))[1])


# %% [markdown]
# `collect_domain` assigns each *source* to train or validation by a hash of its id (so adding or removing
# other sources never moves a source between splits), cuts it into documents, and takes sources in order until
# each split holds its share of the byte budget (`val_fraction` of it for validation); sources of a split
# that is already full are skipped. Each domain's text checksum covers every document id and text.

# %%
#| export
@dataclass
class DomainText:
    "The documents of one domain, split by source."
    domain: str
    docs: dict[str, list[tuple[str, str]]]  # split -> [(doc_id, text)]
    n_sources: dict[str, int]  # split -> number of sources

    def sha256(self) -> str:
        "Checksum of every document id and text, in order, of both splits."
        h = hashlib.sha256()
        for split in SPLITS:
            for doc_id, text in self.docs[split]: h.update(f"{split}\x1f{doc_id}\x1f".encode() + text.encode("utf-8", "surrogatepass") + b"\x1e")
        return h.hexdigest()

    def n_bytes(self, split: str) -> int: return sum(len(t.encode("utf-8", "surrogatepass")) for _, t in self.docs[split])

def is_validation_source(domain: str, source_id: str, val_fraction: float) -> bool:
    "Whether `source_id` of `domain` belongs to the validation split (a pure function of its id)."
    return stable_uniform("split", domain, source_id) < val_fraction

def collect_domain(domain: str, recipe: CorpusRecipe) -> DomainText:
    "Documents of `domain`: sources in order, each split filled to its share of `recipe.max_bytes_per_domain`."
    docs, n_sources, n_bytes = {s: [] for s in SPLITS}, {s: 0 for s in SPLITS}, {s: 0 for s in SPLITS}
    budget = {"train": (1 - recipe.val_fraction) * recipe.max_bytes_per_domain,
              "validation": recipe.val_fraction * recipe.max_bytes_per_domain}
    for source_id, text in domain_sources(domain, recipe):
        split = "validation" if is_validation_source(domain, source_id, recipe.val_fraction) else "train"
        if n_bytes[split] >= budget[split]: continue  # this split is full; keep looking for the other one
        docs[split] += [(f"{source_id}#{i}", p) for i, p in enumerate(split_lines(text, recipe.max_doc_bytes))]
        n_sources[split] += 1
        n_bytes[split] += len(text.encode("utf-8", "surrogatepass"))
        if all(n_bytes[s] >= budget[s] for s in SPLITS): break
    if not docs["validation"] or not docs["train"]:
        raise ValueError(f"domain {domain!r}: recipe {recipe} leaves a split empty; raise max_bytes_per_domain or val_fraction")
    return DomainText(domain, docs, n_sources)


# %%
small = CorpusRecipe(max_bytes_per_domain=60_000, max_doc_bytes=4096, vocab_size=512, tokenizer_sample_bytes=30_000)
dt = collect_domain("code", small)
assert 54_000 <= dt.n_bytes("train") and 6_000 <= dt.n_bytes("validation")  # each split filled to its share
assert dt.n_bytes("train") + dt.n_bytes("validation") < 60_000 + 2 * 300_000  # overshoot: at most one source per split
sources = {split: {d.rsplit("#", 1)[0] for d, _ in dt.docs[split]} for split in SPLITS}
test_eq(sources["train"] & sources["validation"], set())  # no source in both splits
assert all(len(t.encode()) <= 4096 for s in SPLITS for _, t in dt.docs[s])
test_eq(dt.sha256(), collect_domain("code", small).sha256())
test_ne(dt.sha256(), collect_domain("code", dataclasses.replace(small, val_fraction=0.2)).sha256())


# %% [markdown]
# ## Tokenizer
#
# A byte-level BPE (the GPT-2 scheme: bytes mapped to printable characters, the GPT-2 pre-tokenizer regex,
# merges learned by `tokenizers`) trained on the first `tokenizer_sample_bytes` of each domain's *training*
# documents, so every domain shapes the vocabulary and validation text is never seen. `<|endoftext|>` ends
# every document. `hf_tokenizer` wraps it as a `transformers.PreTrainedTokenizerFast`, which models'
# `generate` outputs can be decoded with.

# %%
#| export
def train_tokenizer(texts: dict[str, DomainText], recipe: CorpusRecipe):
    "Train the byte-level BPE `tokenizers.Tokenizer` of `recipe` on a fixed sample of each domain's training text."
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    sample = []
    for domain in texts:  # in the given order (the default corpus: DOMAINS)
        budget = recipe.tokenizer_sample_bytes
        for _, text in texts[domain].docs["train"]:
            if budget <= 0: break
            sample.append(text); budget -= len(text.encode("utf-8", "surrogatepass"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=recipe.vocab_size, min_frequency=2, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(sample, trainer=trainer)
    return tok

def hf_tokenizer(path: str | Path):
    "Load the tokenizer saved at `path` (`tokenizer.json` or its directory) as a `PreTrainedTokenizerFast`."
    from transformers import PreTrainedTokenizerFast
    path = Path(path); path = path / "tokenizer.json" if path.is_dir() else path
    if not path.exists(): raise FileNotFoundError(f"no tokenizer file at {path}")
    return PreTrainedTokenizerFast(tokenizer_file=str(path), bos_token=EOS, eos_token=EOS, pad_token=EOS)


# %% [markdown]
# ## Building and caching
#
# `build_corpus` collects the domains, trains the tokenizer, encodes every document (followed by EOS) and
# concatenates each domain's documents per split into one `uint16` token stream. Everything is written into a
# temporary directory that is renamed into place at the end, so a crash or a concurrent build never leaves a
# half-written cache. `load_corpus` returns the cached corpus when its key exists, and builds it otherwise.

# %%
#| export
def default_cache_dir() -> Path:
    "`$MOEBOOK_CACHE/corpus` if set, else `~/.cache/moebook/corpus`."
    return Path(os.environ.get("MOEBOOK_CACHE", Path.home() / ".cache" / "moebook")) / "corpus"

def _sha256_file(path: Path) -> str: return hashlib.sha256(Path(path).read_bytes()).hexdigest()

DOMAIN_PROVENANCE = {
    "english": "CPython standard library: every topic of pydoc_data.topics (language reference and library topics "
               "shown by help()), then the docstrings (module, classes, functions; read with ast, cleaned by "
               "ast.get_docstring) of standard-library modules with >= 200 characters of docstrings; in stable-hash order",
    "code": "CPython standard library .py sources (sorted walk of sysconfig stdlib dir; excluded: test/tests/idle_test "
            "dirs, site-packages, distutils, ensurepip, pydoc_data, site.py, sysconfig.py, _sysconfigdata*); in stable-hash order",
    "arithmetic": "generated: blocks of 32 problems 'a op b = c' (op in + - *, operands with 1-4 digits) from "
                  "random.Random(stable_hash('arithmetic', arithmetic_seed, block)); exact answers",
    "unicode": "CPython unicodedata: one line 'U+XXXX<TAB>char<TAB>NAME<TAB>category' per named code point "
               "(algorithmic names such as CJK UNIFIED IDEOGRAPH-XXXX skipped), one source per 256 code points; in stable-hash order",
}

def build_corpus(recipe: CorpusRecipe, out_dir: str | Path) -> dict:
    "Build the corpus of `recipe` into the new directory `out_dir`; returns its manifest."
    import tokenizers
    t0, out_dir = time.time(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    texts = {d: collect_domain(d, recipe) for d in DOMAINS}
    tok = train_tokenizer(texts, recipe)
    tok.save(str(out_dir / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS)
    domains = {}
    for d, dt in texts.items():
        entry = {"provenance": DOMAIN_PROVENANCE[d], "text_sha256": dt.sha256(), "splits": {}}
        for split in SPLITS:
            enc = tok.encode_batch([t for _, t in dt.docs[split]], add_special_tokens=False)
            ids = np.fromiter((i for e in enc for i in (*e.ids, eos_id)), dtype=np.uint16)
            np.save(out_dir / f"{d}.{split}.npy", ids)
            entry["splits"][split] = {
                "sources": dt.n_sources[split], "documents": len(dt.docs[split]), "bytes": dt.n_bytes(split),
                "tokens": int(ids.size), "tokens_sha256": hashlib.sha256(ids.astype("<u2").tobytes()).hexdigest(),
                **({} if d == "arithmetic" else  # generated blocks: the provenance rule names them
                   {"source_ids": sorted({doc_id.rsplit("#", 1)[0] for doc_id, _ in dt.docs[split]})})}
        domains[d] = entry
    manifest = {"format": FORMAT_VERSION, "recipe": dataclasses.asdict(recipe), "key": recipe.key(),
                "python": platform.python_version(), "python_implementation": platform.python_implementation(),
                "unicodedata": unicodedata.unidata_version, "tokenizers": tokenizers.__version__,
                "tokenizer_sha256": _sha256_file(out_dir / "tokenizer.json"), "eos_id": eos_id,
                "vocab_size": tok.get_vocab_size(), "domain_order": list(DOMAINS), "domains": domains}
    atomic_write_text(out_dir / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True))
    manifest["build_seconds"] = round(time.time() - t0, 2)  # not in the file: it varies between builds
    return manifest



# %% [markdown]
# ## The `Corpus`
#
# A loaded corpus memory-maps its token streams (loading is instant) and offers the samplers. A *sequence*
# is a window of `seq_len` consecutive tokens of one domain's stream, starting at any position, so it may
# span document boundaries marked by EOS, as in packed pre-training.
#
# Training samplers draw window starts with `stable_hash(seed, domain, split, step, micro, row)`: every batch
# is a pure function of its indices (a resumed run sees exactly the batches it would have seen), sampling
# is with replacement, and different `(step, micro)` give independent batches.
#
# | method | returns | use |
# |---|---|---|
# | `domain_batch(domain, split, step, micro, batch_size, seq_len, seed)` | `(B, T)` | one domain-homogeneous micro-batch |
# | `global_batch(step, n_micro, batch_size, seq_len, seed)` | `(M, B, T)`, domains `(M, B)` | one optimizer step: each micro-batch one domain, domains balanced over the step |
# | `shuffled_global_batch(...)` | `(M, B, T)`, `(M, B)` | the same sequences as `global_batch`, rows shuffled across micro-batches |
# | `mixture_batch(weights, step, micro, batch_size, seq_len, seed)` | `(B, T)`, `(B,)` | per-sequence domain mixture (continual pre-training with replay) |
# | `validation_batch(domain, index, batch_size, seq_len)` | `(B, T)` | fixed, non-overlapping validation windows |

# %%
#| export
class Corpus:
    "A built corpus: token streams per domain and split, its tokenizer, and batch samplers."
    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "manifest.json").exists(): raise FileNotFoundError(f"no corpus (manifest.json) in {self.path}")
        self.manifest = json.loads((self.path / "manifest.json").read_text())
        self.domains: tuple[str, ...] = tuple(self.manifest["domain_order"])  # domain index = position here
        self.eos_id: int = self.manifest["eos_id"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self._streams = {(d, s): np.load(self.path / f"{d}.{s}.npy", mmap_mode="r") for d in self.domains for s in SPLITS}

    def __repr__(self):
        sizes = ", ".join(f"{d}: {len(self.tokens(d, 'train')):,}/{len(self.tokens(d, 'validation')):,}" for d in self.domains)
        return f"Corpus({self.path.name}; train/validation tokens {sizes})"

    @cached_property
    def tokenizer(self):
        "The `transformers.PreTrainedTokenizerFast` of this corpus (loaded on first use)."
        return hf_tokenizer(self.path / "tokenizer.json")

    # -- checks that name the problem
    def _check_domain(self, domain: str) -> int:
        if domain not in self.domains: raise KeyError(f"unknown domain {domain!r}; the domains are {self.domains}")
        return self.domains.index(domain)

    def _check_split(self, split: str):
        if split not in SPLITS: raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")

    def _check_sizes(self, **sizes):
        for name, v in sizes.items(): check_int(name, v, int(name in ("batch_size", "seq_len", "n_micro")))

    def tokens(self, domain: str, split: str = "train") -> np.ndarray:
        "The whole token stream of `domain`/`split`: (N,) uint16, memory-mapped, documents separated by EOS."
        self._check_domain(domain); self._check_split(split)
        return self._streams[domain, split]

    def _max_start(self, domain: str, split: str, seq_len: int) -> int:
        n = len(self.tokens(domain, split))
        if seq_len > n: raise ValueError(f"seq_len={seq_len} is larger than the {n} tokens of domain {domain!r} split {split!r}")
        return n - seq_len

    def _windows(self, domain: str, split: str, starts: list[int], seq_len: int) -> torch.Tensor:
        "(len(starts), seq_len) int64 windows of the stream."
        stream = self.tokens(domain, split)
        return torch.from_numpy(np.stack([np.asarray(stream[s:s + seq_len], dtype=np.int64) for s in starts]))

    def _random_window(self, domain: str, split: str, seq_len: int, *key) -> torch.Tensor:
        "(seq_len,) window whose start is a stable hash of `key`."
        start = stable_hash("window", domain, split, *key) % (self._max_start(domain, split, seq_len) + 1)
        return self._windows(domain, split, [start], seq_len)[0]

    def domain_batch(self, domain: str, # one of `self.domains`
                     split: str = "train", # "train" or "validation"
                     step: int = 0, # optimizer step
                     micro: int = 0, # micro-batch index within the step
                     batch_size: int = 4, # sequences B
                     seq_len: int = 256, # tokens per sequence T
                     seed: int = 0, # sampler seed
                    ) -> torch.Tensor: # input_ids (B, T) int64
        "B random windows of `domain`'s stream: a pure function of all arguments."
        self._check_domain(domain); self._check_split(split)
        self._check_sizes(step=step, micro=micro, batch_size=batch_size, seq_len=seq_len, seed=seed)
        self._max_start(domain, split, seq_len)
        return torch.stack([self._random_window(domain, split, seq_len, seed, step, micro, r) for r in range(batch_size)])

    def step_domains(self, step: int, n_micro: int, seed: int = 0, domains: tuple[str, ...] | None = None) -> list[str]:
        "Domain of each micro-batch of `step`: a seeded permutation of `domains` repeated, so each step is balanced."
        domains = tuple(domains or self.domains)
        for d in domains: self._check_domain(d)
        self._check_sizes(step=step, n_micro=n_micro, seed=seed)
        order = sorted(domains, key=lambda d: stable_hash("step-domains", seed, step, d))
        reps = sorted(range(math.ceil(n_micro / len(domains))), key=lambda r: stable_hash("step-reps", seed, step, r))
        return [order[(m + reps[m // len(domains)]) % len(domains)] for m in range(n_micro)]

    def global_batch(self, step: int, # optimizer step
                     n_micro: int, # micro-batches M per step (gradient accumulation steps x data-parallel ranks)
                     batch_size: int, # sequences B per micro-batch
                     seq_len: int, # tokens T per sequence
                     seed: int = 0, # sampler seed
                     split: str = "train", # "train" or "validation"
                     domains: tuple[str, ...] | None = None, # restrict to these domains (default: all)
                    ) -> tuple[torch.Tensor, torch.Tensor]: # input_ids (M, B, T) int64, domain index (M, B) int64
        "One optimizer step of domain-homogeneous micro-batches; micro-batch m is `domain_batch(step_domains[m], ..., step, m)`."
        names = self.step_domains(step, n_micro, seed, domains)
        ids = torch.stack([self.domain_batch(d, split, step, m, batch_size, seq_len, seed) for m, d in enumerate(names)])
        dom = torch.tensor([[self.domains.index(d)] * batch_size for d in names], dtype=torch.long)
        return ids, dom

    def shuffled_global_batch(self, step: int, n_micro: int, batch_size: int, seq_len: int, seed: int = 0,
                              split: str = "train", domains: tuple[str, ...] | None = None,
                             ) -> tuple[torch.Tensor, torch.Tensor]: # input_ids (M, B, T), domain index (M, B)
        "The sequences of `global_batch` with the same arguments, randomly re-grouped across micro-batches (shuffle control)."
        ids, dom = self.global_batch(step, n_micro, batch_size, seq_len, seed, split, domains)
        M, B, T = ids.shape
        perm = torch.tensor(sorted(range(M * B), key=lambda i: stable_hash("shuffle", seed, step, i)))
        return ids.reshape(M * B, T)[perm].reshape(M, B, T), dom.reshape(-1)[perm].reshape(M, B)

    def check_weights(self, weights: dict[str, float]) -> dict[str, float]:
        "Validate mixture `weights` (known domains, finite, non-negative, summing to 1)."
        if not isinstance(weights, dict) or not weights: raise ValueError(f"weights must be a non-empty dict domain -> weight, got {weights!r}")
        for d, w in weights.items():
            self._check_domain(d)
            check_float(f"weight of domain {d!r}", w)
        if abs(sum(weights.values()) - 1) > 1e-6: raise ValueError(f"weights must sum to 1, got {sum(weights.values())} for {weights}")
        return {d: float(w) for d, w in weights.items()}

    def mixture_domains(self, weights: dict[str, float], step: int, micro: int, batch_size: int, seed: int = 0) -> list[str]:
        "Domain of each row: drawn independently per sequence with probabilities `weights`."
        weights = self.check_weights(weights)
        names, cum = list(weights), np.cumsum(list(weights.values()))
        pick = lambda u: names[min(int(np.searchsorted(cum, u * cum[-1], side="right")), len(names) - 1)]
        return [pick(stable_uniform("mixture", seed, step, micro, r)) for r in range(batch_size)]

    def mixture_batch(self, weights: dict[str, float], # domain -> probability, summing to 1 (replay fraction = old domain's weight)
                      step: int, # optimizer step
                      micro: int = 0, # micro-batch index within the step
                      batch_size: int = 4, # sequences B
                      seq_len: int = 256, # tokens T per sequence
                      seed: int = 0, # sampler seed
                      split: str = "train", # "train" or "validation"
                     ) -> tuple[torch.Tensor, torch.Tensor]: # input_ids (B, T) int64, domain index (B,) int64
        "B sequences, each from a domain drawn with probabilities `weights`; a pure function of the arguments."
        self._check_split(split); self._check_sizes(step=step, micro=micro, batch_size=batch_size, seq_len=seq_len, seed=seed)
        names = self.mixture_domains(weights, step, micro, batch_size, seed)
        for d in set(names): self._max_start(d, split, seq_len)
        rows = [self._random_window(d, split, seq_len, "mixture", seed, step, micro, r) for r, d in enumerate(names)]
        return torch.stack(rows), torch.tensor([self.domains.index(d) for d in names], dtype=torch.long)

    def num_validation_batches(self, domain: str, batch_size: int, seq_len: int) -> int:
        "How many distinct `validation_batch`es `domain` has (non-overlapping windows)."
        self._check_sizes(batch_size=batch_size, seq_len=seq_len)
        return len(self.tokens(domain, "validation")) // (seq_len * batch_size)

    def validation_batch(self, domain: str, # one of `self.domains`
                         index: int, # batch number, 0 <= index < num_validation_batches
                         batch_size: int, # sequences B
                         seq_len: int, # tokens T per sequence
                        ) -> torch.Tensor: # input_ids (B, T) int64
        "The `index`-th block of B consecutive non-overlapping validation windows of `domain` (fixed, no randomness)."
        self._check_domain(domain); self._check_sizes(index=index, batch_size=batch_size, seq_len=seq_len)
        n = self.num_validation_batches(domain, batch_size, seq_len)
        if n == 0: raise ValueError(f"domain {domain!r} has {len(self.tokens(domain, 'validation'))} validation tokens, "
                                    f"fewer than batch_size * seq_len = {batch_size * seq_len}")
        if index >= n: raise IndexError(f"validation batch {index} of domain {domain!r} does not exist: there are {n} of (B={batch_size}, T={seq_len})")
        return self._windows(domain, "validation", [(index * batch_size + r) * seq_len for r in range(batch_size)], seq_len)

    def validation_batches(self, domain: str, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[torch.Tensor]:
        "The first `max_batches` (default: all) `validation_batch`es of `domain`, each (B, T)."
        n = self.num_validation_batches(domain, batch_size, seq_len)
        for i in range(n if max_batches is None else min(n, max_batches)): yield self.validation_batch(domain, i, batch_size, seq_len)

def load_corpus(recipe: CorpusRecipe | None = None, # what to build (default: `CorpusRecipe()`)
                cache_dir: str | Path | None = None, # parent of the cache (default: `default_cache_dir()`)
                rebuild: bool = False, # build even if cached (into the same key, replacing it)
               ) -> Corpus:
    "The corpus of `recipe`, built on first use into `cache_dir/<recipe key>` and memory-mapped afterwards."
    recipe = recipe or CorpusRecipe()
    if not isinstance(recipe, CorpusRecipe): raise TypeError(f"recipe must be a CorpusRecipe, got {type(recipe).__name__}")
    final = Path(cache_dir or default_cache_dir()) / recipe.key()
    if rebuild and final.exists(): shutil.rmtree(final)
    return build_once(final, lambda out: build_corpus(recipe, out))

def build_once(final: Path, # the corpus folder; a corpus is there once its manifest.json exists
               build: Callable[[Path], None], # writes a corpus into the folder it is given
              ) -> Corpus:
    "The corpus at `final`, built first (in a temporary sibling, then moved in atomically) if it is not there yet."
    if not (final / "manifest.json").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
        try:
            build(tmp / "corpus")
            try: os.replace(tmp / "corpus", final)
            except OSError:  # a concurrent build won the race; its result is identical
                if not (final / "manifest.json").exists(): raise
        finally: shutil.rmtree(tmp, ignore_errors=True)
    return Corpus(final)


# %% [markdown]
# A small recipe keeps the tests fast. Build it in a fresh directory, twice, and check determinism, the
# split, the shapes and that bad input is refused with a message naming the problem.

# %%
tmp_cache = Path(tempfile.mkdtemp())
t0 = time.time(); c = load_corpus(small, tmp_cache); build_s = time.time() - t0
t0 = time.time(); c_again = load_corpus(small, tmp_cache); load_s = time.time() - t0
assert load_s < 1, load_s
test_eq(c.domains, DOMAINS)
for d in DOMAINS:
    for s in SPLITS: assert len(c.tokens(d, s)) > 0 and int(c.tokens(d, s)[-1]) == c.eos_id
text = next(english_sources())[1][:300]
test_eq(c.tokenizer.decode(c.tokenizer.encode(text)), text)  # byte-level BPE is lossless
test_eq(c.tokenizer.eos_token_id, c.eos_id)
print(c, f"built in {build_s:.1f}s, loaded in {load_s * 1000:.0f} ms")

# %%
x = c.domain_batch("code", "train", step=3, micro=1, batch_size=2, seq_len=16, seed=0)
test_eq(x.shape, (2, 16)); test_eq(x.dtype, torch.long)
test_eq(x, c.domain_batch("code", "train", 3, 1, 2, 16, 0))  # pure function: resuming reproduces it
test_ne(x, c.domain_batch("code", "train", 3, 2, 2, 16, 0))
stream = torch.from_numpy(c.tokens("code", "train").astype(np.int64))
assert all(any(torch.equal(row, stream[s:s + 16]) for s in range(len(stream) - 15) if stream[s] == row[0]) for row in x)
test_fail(lambda: c.domain_batch("german", "train", 0, 0, 2, 16), contains="unknown domain 'german'")
test_fail(lambda: c.domain_batch("code", "test", 0, 0, 2, 16), contains="unknown split 'test'")
test_fail(lambda: c.domain_batch("code", "validation", 0, 0, 2, 10**7), contains="seq_len=10000000 is larger than")
test_fail(lambda: c.domain_batch("code", "train", 0, 0, 0, 16), contains="batch_size must be >= 1")
test_fail(lambda: c.domain_batch("code", "train", 1.0, 0, 2, 16), contains="step must be an int, got float")
test_eq(c.domain_batch("code", "train", np.int64(3), 1, 2, 16), x)  # NumPy integers index the same batch

# %% [markdown]
# A global batch: each micro-batch is one domain, the step covers all domains evenly; the shuffled variant
# holds the same multiset of sequences, re-grouped.

# %%
ids, dom = c.global_batch(step=5, n_micro=8, batch_size=3, seq_len=16, seed=1)
test_eq(ids.shape, (8, 3, 16)); test_eq(dom.shape, (8, 3))
assert all(len(set(row.tolist())) == 1 for row in dom)  # micro-batches are domain-homogeneous
test_eq(sorted(dom[:, 0].tolist()), sorted(list(range(4)) * 2))  # every domain twice in 8 micro-batches
for m in range(8): test_eq(ids[m], c.domain_batch(c.domains[dom[m, 0]], "train", 5, m, 3, 16, 1))
sids, sdom = c.shuffled_global_batch(step=5, n_micro=8, batch_size=3, seq_len=16, seed=1)
test_eq(sorted(map(tuple, sids.reshape(-1, 16).tolist())), sorted(map(tuple, ids.reshape(-1, 16).tolist())))
assert sum(len(set(r.tolist())) > 1 for r in sdom) >= 4  # most shuffled micro-batches mix domains
test_ne(c.step_domains(0, 4, seed=0), c.step_domains(1, 4, seed=0))  # the order changes between steps
test_eq(set(c.step_domains(0, 2, domains=("code", "english"))), {"code", "english"})

# %% [markdown]
# The mixture sampler draws each sequence's domain independently, so over many batches the fraction of
# replayed old-domain sequences approaches its weight.

# %%
mix, mdom = c.mixture_batch({"code": 0.7, "english": 0.3}, step=0, micro=0, batch_size=5, seq_len=16, seed=0)
test_eq(mix.shape, (5, 16)); test_eq(mdom.shape, (5,))
test_eq(mix, c.mixture_batch({"code": 0.7, "english": 0.3}, 0, 0, 5, 16, 0)[0])
frac = np.mean([d == "english" for s in range(400) for d in c.mixture_domains({"code": 0.7, "english": 0.3}, s, 0, 8)])
assert abs(frac - 0.3) < 0.03, frac
test_eq(set(c.mixture_domains({"code": 1.0, "english": 0.0}, 0, 0, 64)), {"code"})
test_fail(lambda: c.mixture_batch({"code": 0.7, "english": 0.2}, 0), contains="weights must sum to 1")
test_fail(lambda: c.mixture_batch({"code": 1.2, "english": -0.2}, 0), contains="weight of domain 'english' must be a finite number >= 0")
test_fail(lambda: c.mixture_batch({"klingon": 1.0}, 0), contains="unknown domain 'klingon'")
test_fail(lambda: c.mixture_batch({}, 0), contains="non-empty dict")

# %% [markdown]
# Validation batches are fixed: consecutive non-overlapping windows from the start of each domain's
# validation stream.

# %%
n_val = c.num_validation_batches("english", 2, 32)
assert n_val > 0
v0 = c.validation_batch("english", 0, 2, 32)
test_eq(v0.reshape(-1), torch.from_numpy(c.tokens("english", "validation")[:64].astype(np.int64)))
test_eq(len(list(c.validation_batches("english", 2, 32, max_batches=3))), min(3, n_val))
test_fail(lambda: c.validation_batch("english", n_val, 2, 32), contains="does not exist")
test_fail(lambda: c.validation_batch("english", 0, 1, 10**7), contains="fewer than batch_size * seq_len")


# %% [markdown]
# ## The manifest
#
# `write_manifest` stores a corpus's manifest (provenance, sizes, checksums, versions) as the committed
# `data/corpus_manifest.json`; `compare_manifest` checks a rebuilt corpus against it. Text checksums depend
# only on the Python version (the standard library); token checksums also depend on the `tokenizers`
# version, so each comparison says which version mismatch makes it inapplicable instead of failing.

# %%
#| export
def write_manifest(corpus: Corpus, path: str | Path = MANIFEST_PATH) -> Path:
    "Write `corpus`'s manifest to `path` (default: the repository's `data/corpus_manifest.json`)."
    return atomic_write_text(path, json.dumps(corpus.manifest, indent=1, sort_keys=True) + "\n")

def _checked_fields(manifest: dict, fields: tuple[str, ...]) -> dict[str, object]:
    "Flatten the per-domain (`text_sha256`) and per-split fields of a manifest into `{'domain/split/field': value}`."
    out = {}
    for d, entry in manifest["domains"].items():
        if "text_sha256" in fields: out[f"{d}/text_sha256"] = entry["text_sha256"]
        out.update({f"{d}/{s}/{f}": entry["splits"][s][f] for s in SPLITS for f in fields if f != "text_sha256"})
    return out

def compare_manifest(built: dict, # manifest of a (re)built corpus
                     reference: dict, # manifest to check against (e.g. the committed one)
                    ) -> dict: # {'text': ..., 'tokens': ...}, each 'equal', a list of differences, or why it does not apply
    "Compare the sizes and checksums of two manifests of the same recipe."
    if built["recipe"] != reference["recipe"]: raise ValueError("the manifests come from different recipes; compare like with like")
    def diff(fields):
        a, b = _checked_fields(built, fields), _checked_fields(reference, fields)
        out = [f"{k}: {a.get(k)} != {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return out or "equal"
    if built["python"] != reference["python"]:
        why = f"not comparable: Python {built['python']} here, the reference was built with Python {reference['python']} (its standard library differs)"
        return {"text": why, "tokens": why}
    res = {"text": diff(("text_sha256", "bytes", "documents", "sources"))}
    if built["tokenizers"] != reference["tokenizers"]:
        res["tokens"] = f"not comparable: tokenizers {built['tokenizers']} here, the reference used {reference['tokenizers']}"
    elif built["tokenizer_sha256"] != reference["tokenizer_sha256"]: res["tokens"] = ["tokenizer.json differs"]
    else: res["tokens"] = diff(("tokens", "tokens_sha256"))
    return res


# %%
c2 = load_corpus(small, Path(tempfile.mkdtemp()))  # a second build from scratch, in another directory
test_eq(compare_manifest(c2.manifest, c.manifest), {"text": "equal", "tokens": "equal"})
bad = json.loads(json.dumps(c.manifest)); bad["domains"]["code"]["text_sha256"] = "0" * 64
test_eq(compare_manifest(bad, c.manifest)["text"], [f"code/text_sha256: {'0' * 64} != {c.manifest['domains']['code']['text_sha256']}"])
test_eq(compare_manifest(c.manifest, c.manifest), {"text": "equal", "tokens": "equal"})
old = {**c.manifest, "python": "3.9.0"}
assert "Python 3.9.0 here" in compare_manifest(old, c.manifest)["text"]
write_manifest(c, tmp_cache / "m.json"); test_eq(json.loads((tmp_cache / "m.json").read_text()), c.manifest)


# %% [markdown]
# ## Unigram statistics
#
# To show that the domains really differ we compare their token distributions: the cross-entropy of a
# unigram model fitted on domain *a*'s training tokens, evaluated on domain *b*'s validation tokens
# (add-one smoothing over the vocabulary), and the KL divergence between the smoothed unigram distributions.

# %%
#| export
def token_counts(corpus: Corpus, domain: str, split: str = "train") -> np.ndarray:
    "Occurrences of each token id in `domain`/`split`: (V,) int64."
    return np.bincount(np.asarray(corpus.tokens(domain, split)), minlength=corpus.vocab_size).astype(np.int64)

def unigram_cross_entropy(corpus: Corpus, smoothing: float = 1.0) -> np.ndarray:
    "(D, D) matrix: nats/token of the add-`smoothing` unigram model of train domain i on validation domain j."
    probs = [(c := token_counts(corpus, d, "train") + smoothing) / c.sum() for d in corpus.domains]
    vals = [token_counts(corpus, d, "validation") for d in corpus.domains]
    return np.array([[-(v * np.log(p)).sum() / v.sum() for v in vals] for p in probs])

def unigram_kl(corpus: Corpus, smoothing: float = 1.0) -> np.ndarray:
    "(D, D) matrix: KL(p_i || p_j) in nats between the smoothed unigram distributions of the training splits."
    probs = [(c := token_counts(corpus, d, "train") + smoothing) / c.sum() for d in corpus.domains]
    return np.array([[(p * np.log(p / q)).sum() for q in probs] for p in probs])


# %%
ce, kl = unigram_cross_entropy(c), unigram_kl(c)
test_eq(ce.shape, (4, 4)); test_close(np.diag(kl), np.zeros(4), eps=1e-9)
assert (ce.argmin(axis=0) == np.arange(4)).all()  # each domain is best predicted by its own unigram model
assert (kl + np.eye(4) > 0.1).all()

# %% [markdown]
# ## Experiment
#
# Build (or load from the cache) the corpus of the parameters' recipe and report what it contains. With the
# default parameters this is the default `CorpusRecipe()`, whose manifest is committed.

# %%
#| slow
recipe = CorpusRecipe(max_bytes_per_domain=max_bytes_per_domain, vocab_size=vocab_size,
                      tokenizer_sample_bytes=min(CorpusRecipe().tokenizer_sample_bytes, max_bytes_per_domain // 2))
was_cached = (default_cache_dir() / recipe.key() / "manifest.json").exists()
t0 = time.time(); corpus = load_corpus(recipe); first_load_s = time.time() - t0
t0 = time.time(); corpus = load_corpus(recipe); cached_load_s = time.time() - t0
print(corpus); print(f"{'loaded from the cache' if was_cached else 'built from scratch'} in {first_load_s:.1f} s; "
                     f"loading it again took {cached_load_s * 1000:.0f} ms")

# %% [markdown]
# ### Statistics per domain

# %%
import matplotlib.pyplot as plt

# %%
#| slow
man = corpus.manifest["domains"]
rows = []
for d in corpus.domains:
    sp = man[d]["splits"]; n_bytes = sum(sp[s]["bytes"] for s in SPLITS); n_tok = sum(sp[s]["tokens"] for s in SPLITS)
    counts = token_counts(corpus, d)
    top = [repr(corpus.tokenizer.decode([int(i)])) for i in np.argsort(-counts, kind="stable")[:6]]
    rows.append((d, sp["train"]["sources"], sp["validation"]["sources"], sp["train"]["documents"], sp["validation"]["documents"],
                 n_bytes, n_tok, n_tok / n_bytes, int((counts > 0).sum()), " ".join(top)))
print(f"{'domain':<11}{'src tr/val':>11}{'docs tr/val':>13}{'bytes':>11}{'tokens':>10}{'tok/byte':>9}{'types':>7}  top tokens")
for d, st, sv, dtr, dv, b, t, r, types, top in rows:
    print(f"{d:<11}{f'{st}/{sv}':>11}{f'{dtr}/{dv}':>13}{b:>11,}{t:>10,}{r:>9.3f}{types:>7}  {top}")

# %%
#| slow
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
x = np.arange(len(corpus.domains))
for k, split in enumerate(SPLITS):
    axes[0].bar(x + 0.4 * k - 0.2, [man[d]["splits"][split]["tokens"] / 1e3 for d in corpus.domains], 0.4, label=split)
axes[0].set_xticks(x, corpus.domains); axes[0].set_ylabel("thousand tokens"); axes[0].legend(); axes[0].set_title("Domain sizes")
ce = unigram_cross_entropy(corpus)
im = axes[1].imshow(ce, cmap="viridis")
for i in range(len(x)):
    for j in range(len(x)): axes[1].text(j, i, f"{ce[i, j]:.2f}", ha="center", va="center", color="w" if ce[i, j] < ce.mean() else "k")
axes[1].set_xticks(x, corpus.domains, rotation=30); axes[1].set_yticks(x, corpus.domains)
axes[1].set_xlabel("evaluated on (validation)"); axes[1].set_ylabel("unigram model of (train)")
axes[1].set_title("Unigram cross-entropy, nats/token"); fig.colorbar(im, ax=axes[1]); fig.tight_layout(); plt.show()

# %% [markdown]
# Which tokens make the domains different: the tokens with the largest share of each domain's probability
# mass relative to the average of the other domains (log-ratio of smoothed unigram probabilities, weighted by
# the domain's own probability: the terms of the KL divergence).

# %%
#| slow
kl = unigram_kl(corpus)
probs = {d: (cnt := token_counts(corpus, d) + 1.0) / cnt.sum() for d in corpus.domains}
fig, axes = plt.subplots(1, len(corpus.domains), figsize=(14, 3.4))
for ax, d in zip(axes, corpus.domains):
    rest = np.mean([probs[o] for o in corpus.domains if o != d], axis=0)
    contrib = probs[d] * np.log(probs[d] / rest)
    top = np.argsort(-contrib, kind="stable")[:10][::-1]
    ax.barh(range(10), contrib[top]); ax.set_yticks(range(10), [repr(corpus.tokenizer.decode([int(i)]))[:14] for i in top], fontsize=8)
    ax.set_title(f"{d}: KL vs rest {contrib.sum():.2f}"); ax.set_xlabel("p log(p/q), nats")
fig.tight_layout(); plt.show()
print("unigram KL(row || column), nats:")
print(f"{'':<11}" + "".join(f"{d:>11}" for d in corpus.domains))
for d, r in zip(corpus.domains, kl): print(f"{d:<11}" + "".join(f"{v:>11.3f}" for v in r))

# %% [markdown]
# ### The samplers on this corpus
#
# Over many optimizer steps: how many domains each micro-batch holds under `global_batch` and under
# `shuffled_global_batch`, and the realised replay fraction of `mixture_batch`.

# %%
#| slow
n_steps = 50
distinct_global, distinct_shuffled = [], []
for step in progress_bar(range(n_steps), enabled=progress, desc="global batches"):
    _, dom = corpus.global_batch(step, n_micro, batch_size, seq_len, seed)
    _, sdom = corpus.shuffled_global_batch(step, n_micro, batch_size, seq_len, seed)
    distinct_global += [len(set(r.tolist())) for r in dom]; distinct_shuffled += [len(set(r.tolist())) for r in sdom]
replay_weight = 0.3
replay = np.mean([corpus.mixture_batch({"code": 1 - replay_weight, "english": replay_weight}, s, 0, batch_size, seq_len, seed)[1].eq(
                  corpus.domains.index("english")).float().mean().item() for s in range(n_steps * 4)])
print(f"micro-batches: {len(distinct_global)}; mean distinct domains per micro-batch: global {np.mean(distinct_global):.2f}, "
      f"shuffled {np.mean(distinct_shuffled):.2f}; replay fraction {replay:.3f} for weight {replay_weight}")

# %% [markdown]
# ## Claim check
#
# What this data module guarantees to the paper notebooks, measured on the corpus built above.
#
# - *Determinism*: a second build from scratch in a fresh directory gives identical text and token
#   checksums, and (for the default recipe) so does the committed manifest.
# - *Domain-homogeneous micro-batches*: every micro-batch of `global_batch` holds one domain; the shuffled
#   control holds the same sequences but mixes domains.
# - *Domains differ measurably*: each domain's validation tokens are predicted best by its own unigram
#   model, by a margin, and the unigram distributions are far apart (KL).
# - *No leakage*: no source is in both splits; *mixture*: the realised replay fraction matches its weight.

# %%
#| slow
#| output: asis
if check_rebuild:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.time(); rebuilt = load_corpus(recipe, d); rebuild_s = time.time() - t0
        rebuild_cmp = compare_manifest(rebuilt.manifest, corpus.manifest)
else: rebuild_cmp, rebuild_s = {"text": "not run (check_rebuild=False)", "tokens": "not run (check_rebuild=False)"}, float("nan")
committed = json.loads(MANIFEST_PATH.read_text()) if MANIFEST_PATH.exists() else None
if committed is None or committed["recipe"] != dataclasses.asdict(recipe): committed_cmp = {"text": "not applicable (recipe is not the committed default)", "tokens": "not applicable"}
else: committed_cmp = compare_manifest(corpus.manifest, committed)
leaks = {d: len(set(man[d]["splits"]["train"].get("source_ids", [])) & set(man[d]["splits"]["validation"].get("source_ids", []))) for d in corpus.domains}
own = np.diag(ce); other_best = np.array([np.min(np.delete(ce[:, j], j)) for j in range(len(ce))])
margin = other_best - own  # nats/token lost by the best *other* domain's unigram model
min_kl = float(np.min(kl + np.diag(np.full(len(kl), np.inf))))
homogeneous = float(np.mean(np.array(distinct_global) == 1)); mixed_shuffled = float(np.mean(np.array(distinct_shuffled) > 1))
verdict = lambda ok: "holds" if ok else "DOES NOT HOLD"
claims = [
    ("rebuild from scratch gives the same checksums", f"text {rebuild_cmp['text']}, tokens {rebuild_cmp['tokens']} ({rebuild_s:.1f} s build)",
     verdict(rebuild_cmp == {"text": "equal", "tokens": "equal"}) if check_rebuild else "not run"),
    ("default recipe matches data/corpus_manifest.json", f"text {committed_cmp['text']}, tokens {committed_cmp['tokens']}",
     verdict(committed_cmp == {"text": "equal", "tokens": "equal"}) if committed_cmp["tokens"] != "not applicable" else "not applicable"),
    ("global_batch micro-batches are domain-homogeneous", f"{homogeneous:.0%} of {len(distinct_global)} micro-batches hold one domain", verdict(homogeneous == 1.0)),
    ("shuffled control mixes domains", f"{mixed_shuffled:.0%} of micro-batches hold >1 domain (mean {np.mean(distinct_shuffled):.2f} domains)", verdict(mixed_shuffled > 0.5)),
    ("own-domain unigram model predicts best", f"margin over best other domain {margin.min():.2f}-{margin.max():.2f} nats/token", verdict(margin.min() > 0.1)),
    ("unigram distributions differ", f"min pairwise KL {min_kl:.2f} nats", verdict(min_kl > 0.1)),
    ("no source in both splits", f"{sum(leaks.values())} shared sources", verdict(sum(leaks.values()) == 0)),
    ("mixture replay fraction = weight", f"{replay:.3f} realised for weight {replay_weight}", verdict(abs(replay - replay_weight) < 0.05)),
    ("cached load is instant", f"{cached_load_s * 1000:.0f} ms", verdict(cached_load_s < 1.0)),
]
print(f"| claim | measured | verdict |\n|---|---|---|")
for cl in claims: print(f"| {cl[0]} | {cl[1]} | {cl[2]} |")
total_tokens = sum(man[d]["splits"][s]["tokens"] for d in corpus.domains for s in SPLITS)
print(f"\nScale: {len(corpus.domains)} domains, {total_tokens:,} tokens in all, a {corpus.vocab_size}-token BPE, "
      f"Python {corpus.manifest['python']}: a corpus for tiny models, not a pre-training corpus.")
record_metrics(total_tokens=total_tokens, tokens={d: {s: man[d]["splits"][s]["tokens"] for s in SPLITS} for d in corpus.domains},
               tokens_per_byte={r[0]: r[7] for r in rows}, min_unigram_kl=min_kl, own_domain_ce_margin_min=float(margin.min()),
               rebuild_equal=rebuild_cmp == {"text": "equal", "tokens": "equal"}, homogeneous_fraction=homogeneous,
               shuffled_mixed_fraction=mixed_shuffled, replay_fraction=float(replay), cached_load_s=cached_load_s,
               first_load_s=first_load_s, rebuild_s=rebuild_s)
