# %% [markdown]
# # Core utilities
#
# > Seeds, metric recording, provenance, progress bars and atomic files shared by every moebook notebook.

# %%
#| default_exp core

# %%
#| export
from __future__ import annotations
import contextlib, json, math, numbers, os, random, subprocess, sys, tempfile
from pathlib import Path
from typing import IO, Any, Callable, Iterable

import numpy as np
from tqdm.auto import tqdm

# %% [markdown]
# `torch` is imported inside the functions that need it, so that `moebook run` (which imports this module)
# can check a run's parameters and answer in a fraction of a second.

# %%
import sys
import torch
from fastcore.test import test_eq, test_fail, test_close

# %% tags=["parameters"]
seed: int = 0  # the only parameter of this utility notebook: the seed its examples use


# %% [markdown]
# ## Reproducibility
#
# Every experiment takes `seed` as a papermill parameter and calls `seed_everything` first. On a CPU
# this makes two runs with the same parameters produce identical metrics (a test in
# `tests/test_runner.py` checks it end to end).

# %%
#| export
def seed_everything(seed: int, # seed for `random`, NumPy and torch (all devices)
                    deterministic: bool = True, # also ask torch for deterministic kernels
                   ) -> "torch.Generator": # a CPU generator seeded with `seed`, for data pipelines
    "Seed every random number generator moebook uses."
    import torch
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} ({seed!r})")
    random.seed(seed); np.random.seed(seed % 2**32); torch.manual_seed(seed)
    if deterministic: _use_deterministic_algorithms()
    return torch.Generator().manual_seed(seed)


def _use_deterministic_algorithms():
    "`torch.use_deterministic_algorithms(True, warn_only=True)`, without importing Inductor when it is not loaded yet."
    # The public call imports torch._inductor (about 2 s) just to set one config flag; a new process (a notebook
    # kernel, a worker, a rank) that never compiles pays that for nothing. Inductor reads the same flag from
    # TORCHINDUCTOR_DETERMINISTIC when it is imported later.
    import torch
    if "torch._inductor.config" in sys.modules: return torch.use_deterministic_algorithms(True, warn_only=True)
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1"
    torch._C._set_deterministic_algorithms(True, warn_only=True)


# %%
seed_everything(seed); a = torch.rand(3)
seed_everything(seed); test_eq(torch.rand(3), a)
test_fail(lambda: seed_everything(1.5), contains="seed must be an int")

# %% [markdown]
# In a fresh process `seed_everything` leaves Inductor unloaded and still ends in the state of the public call
# (deterministic kernels, warnings only, Inductor's deterministic mode once it is imported):

# %%
#| slow
_probe = """
import sys, torch
from moebook.core import seed_everything
seed_everything(0)
state = [torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
         "torch._inductor" in sys.modules]
import torch._inductor.config
print(state + [torch._inductor.config.deterministic])
"""
_env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_DETERMINISTIC"}
_out = subprocess.run([sys.executable, "-c", _probe], capture_output=True, text=True, env=_env, check=True).stdout
test_eq(_out.split(), "[True, True, False, True]".split())


# %%
#| export
def pick_device(device: str = "auto") -> "torch.device":
    "`'auto'` picks CUDA when available, else CPU; any other string is passed to `torch.device`."
    import torch
    if device == "auto": return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# %%
test_eq(pick_device("cpu"), torch.device("cpu"))

# %% [markdown]
# ## Recording metrics
#
# Notebooks call `record_metrics` with the numbers worth keeping. Interactively it only returns what was
# recorded so far; under `moebook run` the runner sets `MOEBOOK_METRICS` to a file path and every call
# merges the new values into that JSON file, which ends up in the run's `metrics.json`.

# %%
#| export
METRICS_ENV = "MOEBOOK_METRICS"
_recorded: dict[str, Any] = {}

def to_jsonable(x: Any) -> Any:
    "Convert tensors, NumPy values, paths and containers of them into plain JSON values."
    if hasattr(x, "detach") and hasattr(x, "numel"):  # a torch tensor (duck-typed: no torch import needed)
        x = x.detach().cpu(); x = x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, np.generic): x = x.item()
    if isinstance(x, np.ndarray): x = x.tolist()
    if isinstance(x, Path): return str(x)
    if isinstance(x, dict): return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)): return [to_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x): return str(x)  # JSON has no NaN/inf
    return x

def atomic_write(path: str | Path, # the file to (over)write; its folder is created if missing
                 write: Callable[[IO[bytes]], Any], # writes the content to the binary file object it is given
                ) -> Path:
    "Write `path` through `write(f)` on a temporary file `.<name>.<random>.tmp` beside it, fsync, then `os.replace`."
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f); f.flush(); os.fsync(f.fileno())  # the bytes are on disk before the rename publishes them
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError): os.unlink(tmp)
        raise
    folder = os.open(path.parent, os.O_RDONLY)  # and the rename itself survives a power cut
    try: os.fsync(folder)
    finally: os.close(folder)
    return path

def atomic_write_text(path: str | Path, text: str) -> Path:
    "`atomic_write` of `text` encoded as UTF-8."
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))

def record_metrics(**metrics) -> dict[str, Any]:
    "Record named metrics for this run; returns everything recorded so far."
    _recorded.update(to_jsonable(metrics))
    if path := os.environ.get(METRICS_ENV):
        p = Path(path)
        old = json.loads(p.read_text()) if p.exists() else {}
        atomic_write_text(p, json.dumps({**old, **_recorded}, indent=2, sort_keys=True))
    return dict(_recorded)


# %% [markdown]
# `atomic_write` is the one way moebook writes a file that someone may read while it is being written
# (metrics, manifests, checkpoints): a reader sees the old file or the new one, never half of one; a
# writer that fails leaves the old file and no temporary behind; the data and the rename are fsync'ed,
# so a crash right after the call does not lose the file.

# %%
class WriterCrash(Exception): pass
def crash_half_way(f): f.write(b"half a file"); raise WriterCrash("the writer died")

with tempfile.TemporaryDirectory() as d:
    target = Path(d) / "sub" / "a.json"
    synced, real_fsync = [], os.fsync
    os.fsync = lambda fd: (synced.append(fd), real_fsync(fd))[1]
    try: atomic_write_text(target, "caf\u00e9 1")
    finally: os.fsync = real_fsync
    test_eq(target.read_bytes(), "caf\u00e9 1".encode("utf-8")); test_eq(len(synced), 2)  # the file, then its folder
    test_fail(lambda: atomic_write(target, crash_half_way), contains="the writer died")
    test_eq(target.read_text(), "caf\u00e9 1"); test_eq([p.name for p in target.parent.iterdir()], ["a.json"])

# %%
with tempfile.TemporaryDirectory() as d:
    os.environ[METRICS_ENV] = f"{d}/m.json"
    try:
        record_metrics(loss=torch.tensor(0.5), curve=np.arange(3), bad=float("nan"))
        record_metrics(acc=1.0)
        test_eq(json.loads(Path(f"{d}/m.json").read_text()), {"acc": 1.0, "bad": "nan", "curve": [0, 1, 2], "loss": 0.5})
    finally: del os.environ[METRICS_ENV]; _recorded.clear()


# %% [markdown]
# ## Checking arguments
#
# Configurations are checked when they are built, and each check names the setting that is wrong. These two
# helpers are the one place the package does it. Booleans are refused where a number is expected (`True` is
# an `int` in Python, and `warmup_steps=True` is always a mistake).

# %%
#| export
def check_int(name: str, # the setting's name, as the user wrote it (e.g. 'TrainConfig.max_steps')
              value, minimum: int = 0) -> int:
    "`value` as an int if it is an integer >= `minimum`; else a `TypeError` / `ValueError` naming `name`."
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum: raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)

def check_float(name: str, value, minimum: float = 0.0,
                strict: bool = False, # require value > minimum
               ) -> float:
    "`value` as a float if it is a finite real >= `minimum` (> with `strict`); else an error naming `name`."
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__} ({value!r})")
    if not math.isfinite(value) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum}, got {value}")
    return float(value)


# %%
test_eq(check_int("warmup_steps", 3), 3)
test_fail(lambda: check_int("warmup_steps", -1), contains="warmup_steps must be >= 0, got -1")
test_fail(lambda: check_int("warmup_steps", True), contains="warmup_steps must be an int, got bool")
test_fail(lambda: check_int("total_steps", 2.5), contains="total_steps must be an int")
test_eq(check_int("n", np.int64(4), 1), 4)
test_eq(check_float("lr_max", 1), 1.0)
test_fail(lambda: check_float("lr_max", -1e-3), contains="lr_max must be a finite number >= 0")
test_fail(lambda: check_float("lr", 0.0, strict=True), contains="lr must be a finite number > 0")
test_fail(lambda: check_float("lr_max", float("nan")), contains="lr_max must be a finite number")
test_fail(lambda: check_float("lr_max", "3e-4"), contains="lr_max must be a float, got str")


# %% [markdown]
# ## Provenance
#
# Every record (a run's `metrics.json`, a claim, a checkpoint manifest) says which code made it: the git commit,
# and whether tracked files had uncommitted changes then. It lives here, not with the statistics of
# `moebook.evidence`, because `moebook run` asks for it before every run and this module imports quickly.

# %%
#| export
def _repo_root() -> Path:
    import moebook
    return Path(moebook.__file__).resolve().parent.parent

def provenance(root: str | Path | None = None, # a folder inside the checkout (default: the one moebook is imported from)
              ) -> dict[str, Any]:
    "Git commit of the code and whether tracked files had uncommitted changes (None outside a git checkout)."
    root = Path(root) if root else _repo_root()
    def git(*args):
        try: return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError): return None
    head = git("rev-parse", "HEAD")
    if head is None or head.returncode: return {"commit": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": head.stdout.strip(), "dirty": bool(status.stdout.strip())}


# %%
with tempfile.TemporaryDirectory() as d:
    _git = lambda *a: subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=d, check=True,
                                     capture_output=True, text=True).stdout.strip()
    test_eq(provenance(d), {"commit": None, "dirty": None})  # not a checkout yet
    _git("init", "-q"); Path(d, "a.txt").write_text("1"); _git("add", "a.txt"); _git("commit", "-qm", "one")
    test_eq(provenance(d), {"commit": _git("rev-parse", "HEAD"), "dirty": False})
    Path(d, "new.txt").write_text("untracked files do not count")
    test_eq(provenance(d)["dirty"], False)
    Path(d, "a.txt").write_text("2")
    test_eq(provenance(d), {"commit": _git("rev-parse", "HEAD"), "dirty": True})


# %% [markdown]
# ## Progress bars
#
# Long loops use `progress`, a notebook-friendly tqdm. Every experiment notebook has a `progress: bool`
# parameter, and `MOEBOOK_QUIET=1` silences all bars (the test suite sets it).

# %%
#| export
def progress(iterable: Iterable | None = None, enabled: bool = True, **kwargs):
    "A tqdm bar over `iterable`, off when `enabled` is False or `MOEBOOK_QUIET` is set."
    quiet = os.environ.get("MOEBOOK_QUIET", "") not in ("", "0")
    return tqdm(iterable, disable=(not enabled) or quiet, **kwargs)


# %%
test_eq(list(progress(range(3), enabled=False)), [0, 1, 2])
