# %% [markdown]
# # Video captioning from image pseudolabels
#
# > A TimeSformer + frozen OPT video captioner with Flamingo-style gated adapters, pre-trained on image-captioner pseudolabels instead of ASR-like narration, in a small synthetic world; ten paired seeds, a validation / test split and the claim ledger.

# %% [markdown]
# Lialin et al. ("Scalable and Accurate Self-supervised Multimodal Representation Learning without Aligned
# Video and Text Data", arXiv 2304.02080) ask how to pre-train a video captioner when the only large source of
# video text, ASR transcripts (HowTo100M), often does not describe what is visible. Their idea: cut videos into
# clips, caption the centre frame of each clip with an image captioner and use that caption as the clip's
# label. The captioner is a TimeSformer video encoder feeding a **frozen** OPT language model through trained
# adapters inserted before each LM layer, Flamingo-style:
# $h' = h + \tanh(\alpha_1)\,\mathrm{CrossAttn}(h, v)$, $h'' = h' + \tanh(\alpha_2)\,\mathrm{FFN}(h')$ with
# $\alpha_1=\alpha_2=0$ at initialisation. Their headline claims: pseudolabels pre-train better than ASR text,
# and pre-training on images and videos together beats either alone (+4 CIDEr on MSR-VTT).
#
# We rebuild every piece at toy scale. A deterministic world of coloured shapes that **move**, **change colour**
# or **hit** each other gives videos with ground-truth events; still images of the same world come with
# captions. Video clips get three kinds of text: gold captions (a small labelled set), *ASR-like* narration
# (intentions, chatter, half-right object mentions; the HowTo100M failure mode made explicit) and pseudolabels
# from an image captioner trained here. Pre-training conditions with the same budget are fine-tuned on the gold
# training clips; every tuning choice (checkpoint, steps, learning rate) is made on a **validation** split of
# gold clips, and the claims are judged on a separate **test** split with the evidence standard of
# `moebook.evidence`: ten paired seeds (seed *s* shares initialisation and data order across conditions), a
# paired *t* interval over seeds, trivial baselines, caption diversity and measured preconditions.

# %%
#| default_exp vidcap

# %%
#| export
from __future__ import annotations
import copy, hashlib, json, re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from safetensors.torch import load_model, save_model
from transformers import (GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM,
                          TimesformerConfig, TimesformerModel)
from transformers.utils import logging as hf_logging
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from moebook.core import progress as progress_bar

hf_logging.set_verbosity_error()  # tiny configs trigger harmless "not initialised from a checkpoint" notes

# %%
import time, dataclasses, os, tempfile
import moebook
from fastcore.test import test_eq, test_fail, test_close
import matplotlib.pyplot as plt
from moebook.core import seed_everything, record_metrics, pick_device, atomic_write_text
from moebook.evidence import Claim, Precondition, paired_t, paired_bootstrap, paired_runs, sealed_runs, show_claims, forest_plot, RunClock

# %%
clock = RunClock()  # wall time, CPU time and load of the whole notebook, for the claim records

# %% tags=["parameters"]
seed: int = 0  # seed of the data, the frozen LM and the image captioner; video-captioner seeds are seed, seed+1, ...
n_seeds: int = 10  # paired seeds per condition (at least 3: the paired t interval is not trusted below)
workers: int = 2  # worker processes for the paired runs (forked on CPU; 1 process on CUDA)
image_size: int = 32  # frame height and width in pixels
clip_frames: int = 8  # frames per clip (the TimeSformer's num_frames)
clips_per_video: int = 2  # pre-training videos have clip_frames * clips_per_video frames, cut into clips
n_images: int = 2000  # captioned still images (image captioner and the "images" condition)
n_pretrain_videos: int = 400  # unlabelled pre-training videos (each gives clips_per_video clips)
n_gold_train: int = 160  # gold-captioned clips for fine-tuning
n_gold_val: int = 100  # gold clips for every tuning choice (checkpoint selection, the pilot)
n_gold_test: int = 200  # held-out gold clips on which the claims are judged
d_model: int = 64  # width of the frozen OPT LM and of the image captioner (the committed checkpoints)
d_visual: int = 64  # width of the video captioner's TimeSformer
lm_steps: int = 300  # steps pre-training the OPT LM on caption text (then frozen)
image_captioner_steps: int = 600  # steps training the image captioner
pretrain_steps: int = 300  # video-captioner pre-training steps, identical for every condition
finetune_steps: int = 200  # fine-tuning steps on the gold training clips
eval_every: int = 50  # validation CIDEr every this many fine-tuning steps; the best checkpoint is kept
batch_size: int = 32  # video-captioner examples per optimizer step
lr: float = 2e-3  # AdamW learning rate of the video captioner
gate_lr_mult: float = 10.0  # the adapters' tanh gates learn this many times faster (they start at 0)
prefix_ablation: bool = False  # also train the projected-visual-prefix captioner (images + videos), a secondary row
matched_baseline: bool = True  # also train on the matched ASR-like narration (the fairer weak text baseline)
retrain: bool = False  # train the frozen LM and the image captioner from scratch instead of loading data/vidcap_checkpoints
setting: str = "default"  # claim records' setting: "default" (these values), "evidence" (a bigger run) or "smoke"
cache_dir: str = ""  # if set, each finished (condition, seed) run is saved there and reused on resume
evidence_runs: str = "data/vidcap_runs"  # sealed results of the default's runs (committed, with the command and commit that made them); "" trains every run here
device: str = "auto"  # "auto", "cpu" or "cuda"
progress: bool = True  # show progress bars

# %% [markdown]
# ## A small world of shapes and events
#
# A scene holds one or two objects (a colour and a shape at a position). A clip of `clip_frames` frames shows
# one event of one object: it **moves** in a direction, **turns** another colour at a random frame, or moves
# until it **hits** the other object. Events are recorded as structured dictionaries, and gold captions are
# rendered from them ("a red square moves left"). Still images show a static scene and are captioned with the
# objects and, for a single object, where it is ("a blue circle on the left").

# %%
#| export
COLORS = {"red": (0.95, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.35, 1.0),
          "yellow": (0.95, 0.9, 0.1), "purple": (0.65, 0.2, 0.85)}
SHAPES = ("square", "circle", "triangle", "cross")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
BACKGROUND = 0.08  # grey level of the empty canvas

@dataclass
class Obj:
    "One object of a scene: colour name, shape name and centre (x, y) in pixels."
    color: str
    shape: str
    x: float
    y: float

def shape_mask(shape: str, # one of `SHAPES`
               x: float, y: float, # centre in pixels
               radius: float, # half the object's size in pixels
               size: int, # canvas height and width
              ) -> np.ndarray: # (size, size) bool
    "Pixels covered by a shape centred at (x, y)."
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - x, yy - y
    if shape == "square": return (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    if shape == "circle": return dx**2 + dy**2 <= radius**2
    if shape == "triangle": return (np.abs(dy) <= radius) & (np.abs(dx) <= (dy + radius) / 2)
    if shape == "cross":
        arm = radius / 2.5
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")

def render_frame(objects: list[Obj], # drawn in order (later ones on top)
                 size: int, # canvas height and width
                ) -> np.ndarray: # (3, size, size) uint8
    "Render a scene as an RGB frame."
    img = np.full((size, size, 3), BACKGROUND, np.float32)
    for o in objects: img[shape_mask(o.shape, o.x, o.y, size / 8, size)] = COLORS[o.color]
    return (img.transpose(2, 0, 1) * 255).round().astype(np.uint8)


# %%
_f = render_frame([Obj("red", "square", 8, 8), Obj("blue", "circle", 24, 24)], 32)
test_eq(_f.shape, (3, 32, 32)); test_eq(_f.dtype, np.uint8)
test_eq(_f[:, 8, 8], np.array([242, 38, 26], np.uint8))  # red square centre
test_eq(_f[:, 24, 24], np.array([38, 89, 255], np.uint8))  # blue circle centre
test_eq(_f[:, 0, 31], np.full(3, 20, np.uint8))  # background
test_eq(shape_mask("cross", 16, 16, 4, 32)[12, 12], False)  # a cross leaves its corners empty
test_fail(lambda: shape_mask("star", 16, 16, 4, 32), contains="unknown shape")


# %% [markdown]
# Events are sampled so objects stay inside the canvas. A pre-training video chains `clips_per_video` events on
# the same objects, so cutting it into clips (as the paper does with 8-second clips) gives one event per clip.

# %%
#| export
def _random_scene(rng: np.random.Generator, size: int, n_objects: int) -> list[Obj]:
    "Objects with distinct (colour, shape) pairs, placed inside the canvas and apart from each other."
    r, objs = size / 8, []
    kinds = rng.permutation([(c, s) for c in COLORS for s in SHAPES])[:n_objects]
    for c, s in kinds:
        while True:
            x, y = rng.uniform(r + 1, size - r - 1, 2)
            if all((x - o.x)**2 + (y - o.y)**2 >= (3 * r)**2 for o in objs): break
        objs.append(Obj(str(c), str(s), float(x), float(y)))
    return objs

def _feasible_moves(o: Obj, size: int, step: float) -> list[str]:
    r = size / 8
    return [d for d, (dx, dy) in DIRECTIONS.items()
            if r + 0.5 <= o.x + dx * step <= size - r - 0.5 and r + 0.5 <= o.y + dy * step <= size - r - 0.5]

def simulate_clip(objects: list[Obj], # scene at the start of the clip (not modified)
                  rng: np.random.Generator, # source of all randomness
                  n_frames: int, # frames in the clip
                  size: int, # canvas size
                 ) -> tuple[np.ndarray, dict, list[Obj]]: # frames (T, 3, size, size) uint8, event, final scene
    "Pick a feasible event for one object and render the clip."
    objs, r, travel = copy.deepcopy(objects), size / 8, 0.35 * size
    i = int(rng.integers(len(objs)))
    far_apart = len(objs) == 2 and np.hypot(objs[0].x - objs[1].x, objs[0].y - objs[1].y) >= 3 * r + 1
    kinds = ["move", "turn"] + (["hit"] if far_apart else [])  # a hit needs room to approach
    kind = str(rng.choice(kinds))
    if kind == "move" and not _feasible_moves(objs[i], size, travel): kind = "turn"
    subj = objs[i]
    event = {"kind": kind, "subject": [subj.color, subj.shape], "objects": [[o.color, o.shape] for o in objs]}
    frames = []
    if kind == "move":
        d = str(rng.choice(_feasible_moves(subj, size, travel))); event["direction"] = d
        x0, y0, (dx, dy) = subj.x, subj.y, DIRECTIONS[d]
        for t in range(n_frames):
            a = travel * t / (n_frames - 1); subj.x, subj.y = x0 + dx * a, y0 + dy * a
            frames.append(render_frame(objs, size))
    elif kind == "turn":
        new = str(rng.choice([c for c in COLORS if c != subj.color])); event["new_color"] = new
        switch = int(rng.integers(2, n_frames - 1))
        for t in range(n_frames):
            if t == switch: subj.color = new
            frames.append(render_frame(objs, size))
    else:
        other = objs[1 - i]; event["object"] = [other.color, other.shape]
        x0, y0 = subj.x, subj.y
        gap = np.hypot(other.x - x0, other.y - y0)
        ux, uy = (other.x - x0) / gap, (other.y - y0) / gap
        dist = max(gap - 2 * r - 1, 0.0)  # stop when the shapes touch
        for t in range(n_frames):
            a = dist * t / (n_frames - 1); subj.x, subj.y = x0 + ux * a, y0 + uy * a
            frames.append(render_frame(objs, size))
    return np.stack(frames), event, objs

def gold_caption(event: dict) -> str:
    "The reference caption of a structured event."
    c, s = event["subject"]
    if event["kind"] == "move": return f"a {c} {s} moves {event['direction']}"
    if event["kind"] == "turn": return f"a {c} {s} turns {event['new_color']}"
    if event["kind"] == "hit": return f"a {c} {s} hits a {event['object'][0]} {event['object'][1]}"
    raise ValueError(f"unknown event kind {event['kind']!r}")

def _position_word(o: Obj, size: int) -> str:
    dx, dy = o.x - size / 2, o.y - size / 2
    if max(abs(dx), abs(dy)) < size / 8: return "middle"
    return ("left" if dx < 0 else "right") if abs(dx) >= abs(dy) else ("top" if dy < 0 else "bottom")

def image_caption(objects: list[Obj], size: int) -> str:
    "The caption of a still scene: the objects (left to right), and where a lone object is."
    if len(objects) == 1:
        o = objects[0]; where = _position_word(o, size)
        return f"a {o.color} {o.shape} in the middle" if where == "middle" else f"a {o.color} {o.shape} on the {where}"
    a, b = sorted(objects, key=lambda o: o.x)
    return f"a {a.color} {a.shape} next to a {b.color} {b.shape}"


# %%
_rng = np.random.default_rng(0)
_scene = _random_scene(_rng, 32, 2)
for _ in range(20):
    _frames, _ev, _end = simulate_clip(_scene, _rng, 8, 32)
    test_eq(_frames.shape, (8, 3, 32, 32))
    assert _ev["kind"] in ("move", "turn", "hit") and _ev["subject"] in _ev["objects"]
    assert all(32 / 8 - 1e-6 <= o.x <= 32 - 32 / 8 + 1e-6 for o in _end), "objects stay inside the canvas"
test_eq(gold_caption({"kind": "hit", "subject": ["red", "square"], "object": ["blue", "circle"]}),
        "a red square hits a blue circle")
test_eq(image_caption([Obj("red", "cross", 5, 16)], 32), "a red cross on the left")
test_eq(image_caption([Obj("red", "cross", 25, 16), Obj("blue", "circle", 5, 5)], 32), "a blue circle next to a red cross")

# %% [markdown]
# ### ASR-like narration
#
# HowTo100M transcripts talk *around* the video: what the narrator intends to do, chatter unrelated to the
# picture, and object mentions that are only sometimes right. `asr_caption` makes these three failure modes
# explicit: each narration joins two phrases drawn from intention, chatter and mention templates, and a
# mention names the true colour / shape of the acting object only with probability `p_correct` (otherwise a
# random one). `grounding` measures how much of a clip's content a text names: the fraction of the event's
# object words (colours and shapes of the objects taking part) that appear in it.

# %%
#| export
ASR_INTENT = ("now i am going to move this one over here", "next we want to change this one",
              "i will try to make it look nice", "we need to get this out of the way",
              "let me just fix this real quick")
ASR_CHATTER = ("ok so welcome back to the channel", "this one took me a really long time",
               "do not forget to like and subscribe", "let me know what you think in the comments",
               "so yeah that is pretty much it")
ASR_MENTION = ("here we have the {color} one", "grab the {shape} and put it down", "i really like this {color} {shape}")

def asr_caption(event: dict, # structured event of the clip
                rng: np.random.Generator, # source of randomness
                p_correct: float = 0.5, # chance that a mentioned colour / shape is the true one
               ) -> str:
    "Narration that only loosely refers to the clip: intentions, chatter and half-right mentions."
    c, s = event["subject"]
    parts = []
    for kind in rng.choice(["intent", "chatter", "mention"], size=2, p=[0.35, 0.35, 0.3]):
        if kind == "intent": parts.append(str(rng.choice(ASR_INTENT)))
        elif kind == "chatter": parts.append(str(rng.choice(ASR_CHATTER)))
        else:
            color = c if rng.random() < p_correct else str(rng.choice(list(COLORS)))
            shape = s if rng.random() < p_correct else str(rng.choice(SHAPES))
            parts.append(str(rng.choice(ASR_MENTION)).format(color=color, shape=shape))
    return " ".join(parts)

def simple_tokenize(text: str) -> list[str]:
    "Lower-case words (letters and digits only): the tokenisation used for the vocabulary and the metrics."
    return re.findall(r"[a-z0-9]+", text.lower())

def grounding(caption: str, event: dict) -> float:
    "Fraction of the event's object words (colours, shapes of subject and object) present in `caption`."
    words = set(event["subject"]) | set(event.get("object", []))
    return len(words & set(simple_tokenize(caption))) / len(words)


# %%
_ev = {"kind": "move", "subject": ["red", "square"], "direction": "left"}
test_eq(grounding(gold_caption(_ev), _ev), 1.0)
test_eq(grounding("here we have the red one", _ev), 0.5)
test_eq(grounding("do not forget to like and subscribe", _ev), 0.0)
_r1, _r2 = np.random.default_rng(3), np.random.default_rng(3)
test_eq([asr_caption(_ev, _r1) for _ in range(5)], [asr_caption(_ev, _r2) for _ in range(5)])
test_eq(simple_tokenize("A Red-square, moves!"), ["a", "red", "square", "moves"])


# %% [markdown]
# ### Data sets
#
# `make_world_data` generates everything from one seed: captioned still images, unlabelled pre-training
# videos (with their per-clip events and ASR narration kept for analysis), and gold-captioned single clips for
# fine-tuning (train), for every tuning choice (validation) and for the claims (test). Each set has its own random
# stream, so changing one set's size leaves the others unchanged. Frames are `uint8`, videos are `(N, T, 3, H, W)`.

# %%
#| export
@dataclass
class WorldData:
    "All generated data; tensors are uint8 frames, lists are aligned with their tensors."
    images: torch.Tensor          # (n_images, 3, H, W)
    image_captions: list[str]
    videos: torch.Tensor          # (n_videos, clip_frames * clips_per_video, 3, H, W)
    video_events: list[list[dict]]  # one event per clip of each video
    video_asr: list[list[str]]      # one ASR-like narration per clip of each video
    gold_train: torch.Tensor      # (n_gold_train, clip_frames, 3, H, W)
    gold_train_captions: list[str]
    gold_train_events: list[dict]
    gold_test: torch.Tensor       # (n_gold_test, clip_frames, 3, H, W)
    gold_test_captions: list[str]
    gold_test_events: list[dict]
    gold_val: torch.Tensor        # (n_gold_val, clip_frames, 3, H, W): every tuning choice is made on these
    gold_val_captions: list[str]
    gold_val_events: list[dict]
    meta: dict = field(default_factory=dict)

def _clips(rng, n, n_clips, clip_frames, size):
    videos, events = [], []
    for _ in range(n):
        scene, frames, evs = _random_scene(rng, size, int(rng.integers(1, 3))), [], []
        for _ in range(n_clips):
            f, ev, scene = simulate_clip(scene, rng, clip_frames, size); frames.append(f); evs.append(ev)
        videos.append(np.concatenate(frames)); events.append(evs)
    return torch.from_numpy(np.stack(videos)), events

def make_world_data(seed: int, # every sample derives from this seed
                    n_images: int, n_videos: int, n_gold_train: int, n_gold_test: int, # set sizes
                    clip_frames: int = 8, # frames per clip
                    clips_per_video: int = 2, # clips per pre-training video
                    size: int = 32, # frame size in pixels
                    n_gold_val: int = 0, # gold validation clips (their own stream: test clips do not depend on it)
                   ) -> WorldData:
    "Generate the images, pre-training videos and gold clips deterministically."
    for name, v in dict(n_images=n_images, n_videos=n_videos, n_gold_train=n_gold_train, n_gold_test=n_gold_test,
                        clip_frames=clip_frames, clips_per_video=clips_per_video, size=size).items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1: raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(n_gold_val, int) or isinstance(n_gold_val, bool) or n_gold_val < 0:
        raise ValueError(f"n_gold_val must be a non-negative int, got {n_gold_val!r}")
    if clip_frames < 4: raise ValueError(f"clip_frames must be >= 4 so events unfold over time, got {clip_frames}")
    if size < 16 or size % 8: raise ValueError(f"size must be a multiple of 8 and >= 16, got {size}")
    rngs = [np.random.default_rng([seed, k]) for k in range(6)]  # one stream per set: sizes don't interact
    scenes = [_random_scene(rngs[0], size, int(rngs[0].integers(1, 3))) for _ in range(n_images)]
    images = torch.from_numpy(np.stack([render_frame(s, size) for s in scenes]))
    videos, vevents = _clips(rngs[1], n_videos, clips_per_video, clip_frames, size)
    asr = [[asr_caption(e, rngs[2]) for e in evs] for evs in vevents]
    gtr, gtr_ev = _clips(rngs[3], n_gold_train, 1, clip_frames, size)
    gte, gte_ev = _clips(rngs[4], n_gold_test, 1, clip_frames, size)
    gva, gva_ev = _clips(rngs[5], n_gold_val, 1, clip_frames, size) if n_gold_val else (torch.zeros(0, clip_frames, 3, size, size, dtype=torch.uint8), [])
    gtr_ev, gte_ev, gva_ev = [e[0] for e in gtr_ev], [e[0] for e in gte_ev], [e[0] for e in gva_ev]
    return WorldData(images, [image_caption(s, size) for s in scenes], videos, vevents, asr,
                     gtr, [gold_caption(e) for e in gtr_ev], gtr_ev, gte, [gold_caption(e) for e in gte_ev], gte_ev,
                     gva, [gold_caption(e) for e in gva_ev], gva_ev,
                     meta=dict(seed=seed, size=size, clip_frames=clip_frames, clips_per_video=clips_per_video))


# %%
_d1 = make_world_data(7, 6, 3, 2, 2, clip_frames=8, clips_per_video=2, size=32, n_gold_val=2)
_d2 = make_world_data(7, 6, 3, 2, 2, clip_frames=8, clips_per_video=2, size=32, n_gold_val=2)
test_eq(_d1.videos.shape, (3, 16, 3, 32, 32)); test_eq(_d1.gold_test.shape, (2, 8, 3, 32, 32)); test_eq(_d1.gold_val.shape, (2, 8, 3, 32, 32))
assert not torch.equal(_d1.gold_val, _d1.gold_test), "validation and test clips are different samples"
assert torch.equal(make_world_data(7, 6, 3, 2, 2).gold_test, _d1.gold_test), "test clips do not depend on the validation size"
assert torch.equal(_d1.videos, _d2.videos) and _d1.video_asr == _d2.video_asr and _d1.image_captions == _d2.image_captions
test_fail(lambda: make_world_data(0, 0, 1, 1, 1), contains="n_images must be a positive int")
test_fail(lambda: make_world_data(0, 1, 1, 1, 1, size=20), contains="multiple of 8")


# %% [markdown]
# `world_manifest` summarises a generated data set (sizes, SHA-256 prefixes of the frame tensors and caption
# lists, caption grounding); `data/vidcap_manifest.json` holds the one for the notebook's default parameters and
# the experiment checks its freshly generated data against it.

# %%
#| export
def _sha16(x) -> str:
    b = x.numpy().tobytes() if isinstance(x, torch.Tensor) else json.dumps(x).encode()
    return hashlib.sha256(b).hexdigest()[:16]

def world_manifest(data: WorldData) -> dict:
    "Provenance, sizes, checksums and caption statistics of a generated data set."
    events = [e for evs in data.video_events for e in evs]
    asr = [a for aa in data.video_asr for a in aa]
    sets = {name: {"shape": list(t.shape), "frames_sha256_16": _sha16(t), "captions_sha256_16": _sha16(c)}
            for name, t, c in [("images", data.images, data.image_captions), ("pretrain_videos", data.videos, data.video_asr),
                               ("gold_train", data.gold_train, data.gold_train_captions),
                               ("gold_val", data.gold_val, data.gold_val_captions),
                               ("gold_test", data.gold_test, data.gold_test_captions)]}
    return {"generator": "moebook.vidcap.make_world_data", "parameters": data.meta, "sets": sets,
            "event_kinds": {k: sum(e["kind"] == k for e in events) for k in ("move", "turn", "hit")},
            "grounding_asr_like": round(float(np.mean([grounding(a, e) for a, e in zip(asr, events)])), 4),
            "caption_sources": {"gold": "gold_caption(event), single clips", "image": "image_caption(scene)",
                                "asr_like": "asr_caption(event): intentions, chatter, mentions right with p=0.5",
                                "pseudolabel": "image captioner on each clip's centre frame (made in the notebook)"}}


# %%
_m = world_manifest(_d1)
test_eq(_m["sets"]["pretrain_videos"]["shape"], [3, 16, 3, 32, 32])
test_eq(_m, world_manifest(_d2))
assert _m["sets"]["gold_test"]["frames_sha256_16"] != world_manifest(make_world_data(8, 6, 3, 2, 2))["sets"]["gold_test"]["frames_sha256_16"]

# %% [markdown]
# ### Vocabulary
#
# The world's language is closed, so a word-level vocabulary built from every word the generators can emit
# is exact (no unknown words). Sequences are `<bos> words <eos>` padded with `<pad>`.

# %%
#| export
SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD, BOS, EOS = 0, 1, 2

class CaptionVocab:
    "Word-level vocabulary of the world's captions and narration."
    def __init__(self):
        words = set(COLORS) | set(SHAPES) | set(DIRECTIONS)
        words |= set(simple_tokenize(" ".join(ASR_INTENT + ASR_CHATTER + ASR_MENTION)))
        words |= {"a", "moves", "turns", "hits", "next", "to", "on", "the", "in", "middle", "top", "bottom"}
        words -= {"color", "shape"}  # template placeholders
        self.itos = list(SPECIALS) + sorted(words)
        self.stoi = {w: i for i, w in enumerate(self.itos)}
    def __len__(self): return len(self.itos)
    def encode(self, texts: list[str], # captions
               max_len: int, # padded length, including <bos> and <eos>
              ) -> torch.Tensor: # (len(texts), max_len) int64
        "Token ids of `texts`; raises on unknown words or captions longer than `max_len`."
        out = torch.full((len(texts), max_len), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            words = simple_tokenize(t)
            if unknown := [w for w in words if w not in self.stoi]: raise ValueError(f"unknown words {unknown} in {t!r}")
            if len(words) + 2 > max_len: raise ValueError(f"caption {t!r} needs {len(words) + 2} tokens > max_len={max_len}")
            out[i, :len(words) + 2] = torch.tensor([BOS] + [self.stoi[w] for w in words] + [EOS])
        return out
    def decode(self, ids: torch.Tensor | list[int]) -> str:
        "Words up to the first <eos>, specials dropped."
        words = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            if i == EOS: break
            if i >= len(SPECIALS): words.append(self.itos[i])
        return " ".join(words)


# %%
_vocab = CaptionVocab()
_ids = _vocab.encode(["a red square moves left", "do not forget to like and subscribe"], 12)
test_eq(_ids.shape, (2, 12)); test_eq(_ids[0, :2].tolist(), [BOS, _vocab.stoi["a"]])
test_eq(_vocab.decode(_ids[0]), "a red square moves left")
test_eq(_vocab.decode(_ids[1]), "do not forget to like and subscribe")
test_fail(lambda: _vocab.encode(["a pink square"], 12), contains="unknown words")
test_fail(lambda: _vocab.encode(["a red square moves left"], 5), contains="max_len")


# %% [markdown]
# ## Metrics
#
# CIDEr(-D), BLEU-4 and ROUGE-L from `pycocoevalcap`, on the usual scales (BLEU and ROUGE-L in [0, 1], CIDEr-D
# up to 10 for a caption identical to its single reference).
#
# **Tokenisation.** The COCO pipeline first runs pycocoevalcap's `PTBTokenizer`, which starts a Java process
# (Stanford CoreNLP) per call. We do not call it: a run scores captions at every validation checkpoint of
# every condition and seed (hundreds of calls), one JVM start each would cost more than the models, and the
# device machines have no Java. Every text this world emits is lower-case words separated by single spaces,
# where PTB tokenisation changes nothing, so `simple_tokenize` (lower-case, keep letters and digits) feeds the
# scorers directly; `tests/test_vidcap.py` checks that it yields exactly `PTBTokenizer`'s tokens on every kind
# of caption here (gold, image, narration, matched narration) wherever Java is installed.
#
# CIDEr's document frequencies come from the references of the evaluated set, so the per-clip scores of two
# models on the same clips are paired samples (`cider_per_item`, whose mean is the corpus CIDEr).

# %%
#| export
def _coco(references, hypotheses):
    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError(f"need one hypothesis per reference set, got {len(hypotheses)} hypotheses for {len(references)} samples")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    gts = {i: [" ".join(simple_tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    return gts, {i: [" ".join(simple_tokenize(h))] for i, h in enumerate(hypotheses)}

def caption_scores(references: list[list[str]] | list[str], # per sample: one reference or a list of them
                   hypotheses: list[str], # one generated caption per sample
                  ) -> dict[str, float]: # CIDEr, BLEU-4, ROUGE-L
    "Corpus-level captioning metrics (pycocoevalcap scorers, `simple_tokenize` tokenisation)."
    gts, res = _coco(references, hypotheses)
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"CIDEr": float(cider), "BLEU-4": float(bleu[3]), "ROUGE-L": float(rouge)}

def cider_per_item(references: list[list[str]] | list[str], hypotheses: list[str]) -> np.ndarray: # (n,) CIDEr-D per sample
    "CIDEr-D of each sample (document frequencies from all references); its mean is the corpus CIDEr."
    gts, res = _coco(references, hypotheses)
    return np.asarray(Cider().compute_score(gts, res)[1], dtype=float)


# %%
_refs = ["a red square moves left", "a blue circle turns green", "a yellow cross hits a red triangle"]
_s = caption_scores(_refs, _refs)
test_close(_s["BLEU-4"], 1.0, eps=1e-6); test_close(_s["ROUGE-L"], 1.0, eps=1e-6); test_close(_s["CIDEr"], 10.0, eps=1e-6)
_bad = caption_scores(_refs, ["do not forget to like and subscribe"] * 3)
assert _bad["BLEU-4"] < 1e-3 and _bad["CIDEr"] < 1e-3 and _bad["ROUGE-L"] < 0.2
_half = ["a red square moves right", "a blue circle turns red", "a yellow cross hits a red circle"]
assert 0 < caption_scores(_refs, _half)["CIDEr"] < 10 and 0 < caption_scores(_refs, _half)["BLEU-4"] < 1
test_close(cider_per_item(_refs, _half).mean(), caption_scores(_refs, _half)["CIDEr"], eps=1e-9)
assert caption_scores(_refs, _refs[1:] + _refs[:1])["CIDEr"] < 1.0, "shuffled captions score far below identical ones"
test_fail(lambda: caption_scores(_refs, _refs[:2]), contains="one hypothesis per reference")


# %% [markdown]
# ### Baselines and diversity
#
# A captioner that writes the same sentence for every clip can still score a few CIDEr points, so every table
# and every claim carries the trivial baselines of the metric: the single most frequent training caption for
# every clip (`majority_caption`), a random training caption per clip, and the ceiling (the oracle event
# caption, which is the gold caption itself). `caption_diversity` says whether a model collapsed: distinct
# captions per clip and distinct uni- and bigrams.
#
# The ASR-like narration differs from pseudolabels in two ways at once: it is not grounded, and it is longer and
# uses another vocabulary. `matched_asr` is the fairer weak baseline that keeps only the first difference: for
# each clip, the narration restricted to its `k` most frequent words (`k` = the pseudolabels' vocabulary size)
# and cut or cycled to the length of that clip's pseudolabel.

# %%
#| export
def majority_caption(captions: list[str]) -> str:
    "The most frequent caption (ties: the alphabetically first)."
    if not captions: raise ValueError("majority_caption needs at least one caption")
    counts = Counter(captions)
    return min(counts, key=lambda c: (-counts[c], c))

def random_captions(captions: list[str], n: int, rng: np.random.Generator) -> list[str]:
    "`n` captions drawn uniformly (with replacement) from `captions`."
    return [captions[i] for i in rng.integers(len(captions), size=n)]

def caption_diversity(captions: list[str]) -> dict[str, float]:
    "Distinct captions per caption, and the number of distinct unigrams and bigrams."
    if not captions: raise ValueError("caption_diversity needs at least one caption")
    toks = [simple_tokenize(c) for c in captions]
    return {"distinct_captions": len(set(map(tuple, toks))) / len(toks),
            "distinct_unigrams": len({w for t in toks for w in t}),
            "distinct_bigrams": len({b for t in toks for b in zip(t, t[1:])})}

def matched_asr(asr: list[str], # narration, one per clip
                pseudolabels: list[str], # pseudolabel of the same clips
               ) -> list[str]:
    "Narration with the pseudolabels' vocabulary size and per-clip lengths (a weak text baseline of the same form)."
    if len(asr) != len(pseudolabels): raise ValueError(f"need one pseudolabel per narration, got {len(pseudolabels)} and {len(asr)}")
    k = len({w for p in pseudolabels for w in simple_tokenize(p)})
    counts = Counter(w for a in asr for w in simple_tokenize(a))
    keep = set(sorted(counts, key=lambda w: (-counts[w], w))[:k])
    out = []
    for a, p in zip(asr, pseudolabels):
        words, n = [w for w in simple_tokenize(a) if w in keep], len(simple_tokenize(p))
        if not words: words = [min(keep, key=lambda w: (-counts[w], w))]  # no kept word: the most frequent one
        out.append(" ".join((words * (n // len(words) + 1))[:n]))
    return out


# %%
test_eq(majority_caption(["b", "a", "b", "a", "c"]), "a")
test_eq(caption_diversity(["a red square", "a red square", "a blue circle"]),
        {"distinct_captions": 2 / 3, "distinct_unigrams": 5, "distinct_bigrams": 4})
_asr = ["so yeah that is pretty much it", "here we have the red one", "do not forget to like and subscribe"]
_pl = ["a red square on the left", "a blue cross", "a red circle next to a green square"]
_m = matched_asr(_asr, _pl)
test_eq([len(simple_tokenize(x)) for x in _m], [len(simple_tokenize(x)) for x in _pl])
assert len({w for x in _m for w in x.split()}) <= len({w for x in _pl for w in simple_tokenize(x)})
test_eq(random_captions(["x", "y"], 3, np.random.default_rng(0)), random_captions(["x", "y"], 3, np.random.default_rng(0)))
test_fail(lambda: matched_asr(_asr, _pl[:2]), contains="one pseudolabel per narration")


# %% [markdown]
# ## Models
#
# ### Prefix language models
#
# Two models condition a causal LM on a sequence of visual vectors by putting them **before** the caption
# tokens (`inputs_embeds`): the image captioner (which trains its GPT-2 decoder) and the prefix ablation of the
# video captioner (whose OPT stays frozen). Loss is on caption tokens only; generation is greedy through
# `generate(inputs_embeds=...)`.

# %%
#| export
def prefix_lm_loss(lm: nn.Module, # a `transformers` causal LM
                   prefix: torch.Tensor, # (B, P, d) visual vectors in the LM's embedding space
                   input_ids: torch.Tensor, # (B, L) `<bos> caption <eos> <pad>...`
                  ) -> torch.Tensor: # scalar mean cross-entropy over caption tokens
    "Caption loss of a causal LM reading a visual prefix."
    tok = lm.get_input_embeddings()(input_ids)
    labels = torch.cat([torch.full(prefix.shape[:2], -100, dtype=torch.long, device=input_ids.device),
                        input_ids.masked_fill(input_ids == PAD, -100)], 1)
    return lm(inputs_embeds=torch.cat([prefix, tok], 1), labels=labels).loss

@torch.no_grad()
def prefix_lm_generate(lm: nn.Module, prefix: torch.Tensor, # (B, P, d)
                       max_new_tokens: int = 12) -> torch.Tensor: # (B, <= max_new_tokens) new token ids
    "Greedy captions after a visual prefix and `<bos>`."
    bos = lm.get_input_embeddings()(torch.full(prefix.shape[:1] + (1,), BOS, dtype=torch.long, device=prefix.device))
    embeds = torch.cat([prefix, bos], 1)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=prefix.device)
    return lm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                       eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)


# %% [markdown]
# ### The image captioner
#
# A three-layer CNN turns a frame into a 4x4 grid of vectors (16 prefix tokens, position-aware) read by a small
# GPT-2 trained from scratch on the image captions. It is the paper's BLIP stand-in: it only ever sees still
# images.

# %%
#| export
def check_frames(x: torch.Tensor, # images (B, 3, H, W) or videos (B, T, 3, H, W)
                 size: int, # expected H = W
                 num_frames: int | None = None, # expected T for videos, None for images
                ) -> None:
    "Raise a clear error when a batch of images / videos has the wrong shape or values."
    kind = "images" if num_frames is None else "videos"
    want = 4 if num_frames is None else 5
    if not isinstance(x, torch.Tensor): raise TypeError(f"{kind} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != want:
        raise ValueError(f"{kind} must be {'(B, 3, H, W)' if want == 4 else '(B, T, 3, H, W)'}, got shape {tuple(x.shape)}")
    if num_frames is not None and x.shape[1] != num_frames:
        raise ValueError(f"videos must have {num_frames} frames, got {x.shape[1]} (missing or extra frames)")
    if x.shape[-3] != 3: raise ValueError(f"{kind} must have 3 (RGB) channels, got {x.shape[-3]}")
    if x.shape[-2:] != (size, size): raise ValueError(f"{kind} must be {size}x{size}, got {tuple(x.shape[-2:])}")
    if not x.is_floating_point(): raise TypeError(f"{kind} must be float in [0, 1], got {x.dtype} (use `to_float`)")
    if not torch.isfinite(x).all(): raise ValueError(f"{kind} contain NaN or inf")

def to_float(frames: torch.Tensor) -> torch.Tensor:
    "uint8 frames -> float32 in [0, 1]."
    return frames.float() / 255

class ImageCaptioner(nn.Module):
    "CNN grid encoder + GPT-2 decoder reading the grid as a prefix."
    def __init__(self, vocab_size: int, size: int = 32, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, max_len: int = 16):
        super().__init__()
        self.size = size
        self.encoder = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.GELU(), nn.Conv2d(32, 64, 3, 2, 1), nn.GELU(),
                                     nn.Conv2d(64, d_model, 3, 2, 1))  # (B, d, H/8, W/8)
        n_tokens = (size // 8) ** 2
        self.pos = nn.Parameter(torch.randn(1, n_tokens, d_model) * 0.02)
        self.lm = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=n_tokens + max_len + 1, n_embd=d_model,
                                             n_layer=n_layers, n_head=n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                             attn_pdrop=0.0, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD))
    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        "(B, 3, H, W) float -> (B, (H/8)*(W/8), d) prefix."
        check_frames(images, self.size)
        return self.encoder(images).flatten(2).transpose(1, 2) + self.pos
    def loss(self, images, input_ids): return prefix_lm_loss(self.lm, self.prefix(images), input_ids)
    def generate(self, images, max_new_tokens: int = 12): return prefix_lm_generate(self.lm, self.prefix(images), max_new_tokens)


# %%
torch.manual_seed(0)
_ic = ImageCaptioner(len(_vocab), 32, 32, 1, 2)
_imgs = to_float(_d1.images[:2]); _ids = _vocab.encode(_d1.image_captions[:2], 16)
test_eq(_ic.prefix(_imgs).shape, (2, 16, 32))
assert torch.isfinite(_ic.loss(_imgs, _ids))
_gen = _ic.generate(_imgs, max_new_tokens=5)
test_eq(_gen.shape[0], 2); assert _gen.shape[1] <= 5
test_fail(lambda: _ic.prefix(_d1.images[:2]), contains="use `to_float`")
test_fail(lambda: _ic.prefix(_imgs[:, :2]), contains="3 (RGB) channels")


# %% [markdown]
# ### Flamingo-style gated cross-attention adapters in a frozen OPT
#
# `GatedCrossAttention` is the adapter: pre-norm cross-attention from the text stream to the video tokens and
# a pre-norm FFN, each added through a `tanh` gate that starts at 0. `GatedXAttnLayer` wraps one OPT decoder
# layer and runs the adapter **before** it (the paper's "adapters inserted before each LM layer"). The video
# tokens reach the adapters through `VideoCaptioner.attending_to`, a context manager that sets them for the
# duration of a forward pass or a whole `generate` call, so OPT's own forward and `generate` are untouched.
# During cached generation each step's new token attends to the full video, exactly as in training.
# The paper's cross-attention is "separable" over time and space (unverified); ours attends jointly to all
# TimeSformer tokens, which at 8 frames x 16 patches is cheap.

# %%
#| export
class GatedCrossAttention(nn.Module):
    "h' = h + tanh(a1) CrossAttn(LN(h), v); h'' = h' + tanh(a2) FFN(LN(h')), with a1 = a2 = 0 at init."
    def __init__(self, d_model: int, n_heads: int, ffn_mult: int = 2):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_mult * d_model), nn.GELU(), nn.Linear(ffn_mult * d_model, d_model))
        self.attn_gate, self.ffn_gate = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
        self.memory: torch.Tensor | None = None  # (B, N, d) video tokens, set by VideoCaptioner.attending_to
    def forward(self, h: torch.Tensor) -> torch.Tensor: # (B, L, d) -> (B, L, d)
        if self.memory is None: raise RuntimeError("no video tokens: run the LM inside `VideoCaptioner.attending_to(...)`")
        if self.memory.shape[0] != h.shape[0]:
            raise ValueError(f"video batch {self.memory.shape[0]} != text batch {h.shape[0]} (beam search is not supported)")
        x, _ = self.attn(self.attn_norm(h), self.memory, self.memory, need_weights=False)
        h = h + torch.tanh(self.attn_gate) * x
        return h + torch.tanh(self.ffn_gate) * self.ffn(self.ffn_norm(h))

class GatedXAttnLayer(nn.Module):
    "An LM decoder layer preceded by a gated cross-attention adapter; same call signature as the layer."
    def __init__(self, layer: nn.Module, adapter: GatedCrossAttention):
        super().__init__()
        self.adapter, self.layer = adapter, layer
    def forward(self, hidden_states, *args, **kwargs): return self.layer(self.adapter(hidden_states), *args, **kwargs)


# %% [markdown]
# ### The video captioner
#
# A tiny `TimesformerModel` (divided space-time attention) encodes a clip `(B, T, 3, H, W)` into
# `1 + T * (H/p) * (W/p)` tokens, a trained linear map + LayerNorm brings them to the LM width. The OPT LM is
# deep-copied (so the caller's model is never modified), frozen, and either gets a gated adapter before each
# decoder layer (`mode="xattn"`, the paper's design) or reads the per-frame mean of the video tokens as a
# `T`-token prefix (`mode="prefix"`, the ablation). Only the TimeSformer, the projection and the adapters train.

# %%
#| export
class VideoCaptioner(nn.Module):
    "TimeSformer encoder + frozen OPT, conditioned by gated cross-attention adapters or a projected prefix."
    def __init__(self, lm: OPTForCausalLM, # pre-trained LM; copied and frozen here
                 num_frames: int = 8, size: int = 32, patch_size: int = 8,
                 d_visual: int = 64, visual_layers: int = 2, visual_heads: int = 4, adapter_heads: int = 4,
                 mode: str = "xattn", # "xattn" (gated adapters before each LM layer) or "prefix"
                ):
        super().__init__()
        if mode not in ("xattn", "prefix"): raise ValueError(f"mode must be 'xattn' or 'prefix', got {mode!r}")
        self.mode, self.num_frames, self.size = mode, num_frames, size
        self.visual = TimesformerModel(TimesformerConfig(
            image_size=size, patch_size=patch_size, num_channels=3, num_frames=num_frames, hidden_size=d_visual,
            num_hidden_layers=visual_layers, num_attention_heads=visual_heads, intermediate_size=2 * d_visual,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, drop_path_rate=0,
            attention_type="divided_space_time"))
        self.lm = copy.deepcopy(lm)
        self.lm.requires_grad_(False)
        d_lm = self.lm.config.hidden_size
        self.project = nn.Sequential(nn.Linear(d_visual, d_lm), nn.LayerNorm(d_lm))
        self.adapters = nn.ModuleList()
        if mode == "xattn":
            layers = self.lm.model.decoder.layers
            for i in range(len(layers)):
                self.adapters.append(GatedCrossAttention(d_lm, adapter_heads))
                layers[i] = GatedXAttnLayer(layers[i], self.adapters[i])

    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        "(B, T, 3, H, W) float -> (B, 1 + T*P, d_lm) video tokens."
        check_frames(videos, self.size, self.num_frames)
        return self.project(self.visual(pixel_values=videos).last_hidden_state)

    def frame_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        "(B, 1 + T*P, d) -> (B, T, d): mean over each frame's patch tokens (the prefix ablation)."
        return tokens[:, 1:].reshape(tokens.shape[0], self.num_frames, -1, tokens.shape[-1]).mean(2)

    @contextmanager
    def attending_to(self, tokens: torch.Tensor): # (B, N, d_lm) video tokens
        "Make every adapter cross-attend to `tokens` inside the block."
        for a in self.adapters: a.memory = tokens
        try: yield
        finally:
            for a in self.adapters: a.memory = None

    def loss(self, videos: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        "Mean caption cross-entropy; videos (B, T, 3, H, W) float, input_ids (B, L)."
        tokens = self.encode(videos)
        if self.mode == "prefix": return prefix_lm_loss(self.lm, self.frame_prefix(tokens), input_ids)
        with self.attending_to(tokens):
            return self.lm(input_ids=input_ids, attention_mask=(input_ids != PAD).long(),
                           labels=input_ids.masked_fill(input_ids == PAD, -100)).loss

    @torch.no_grad()
    def generate(self, videos: torch.Tensor, max_new_tokens: int = 12) -> torch.Tensor:
        "Greedy captions through `generate`: (B, T, 3, H, W) -> (B, <= max_new_tokens) token ids (no <bos>)."
        tokens = self.encode(videos)
        if self.mode == "prefix": return prefix_lm_generate(self.lm, self.frame_prefix(tokens), max_new_tokens)
        bos = torch.full((videos.shape[0], 1), BOS, dtype=torch.long, device=videos.device)
        with self.attending_to(tokens):
            out = self.lm.generate(input_ids=bos, attention_mask=torch.ones_like(bos), max_new_tokens=max_new_tokens,
                                   do_sample=False, eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)
        return out[:, 1:]


# %% [markdown]
# The tests pin the three properties the design rests on: at initialisation the wrapped LM computes **exactly**
# the frozen LM's logits (the gates are 0); gradients reach only the visual encoder, the projection and the
# adapters (at initialisation only the gates get a gradient, as in Flamingo, since everything else is behind a
# zero gate); and captions come out of `generate`, identical to a manual greedy decode.

# %%
#| export
def make_text_lm(vocab_size: int, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, max_len: int = 32) -> OPTForCausalLM:
    "A tiny OPT causal LM from a config (trained here, never downloaded)."
    return OPTForCausalLM(OPTConfig(vocab_size=vocab_size, hidden_size=d_model, num_hidden_layers=n_layers,
                                    ffn_dim=2 * d_model, num_attention_heads=n_heads, max_position_embeddings=max_len,
                                    word_embed_proj_dim=d_model, dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                                    do_layer_norm_before=True, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS))


# %%
torch.manual_seed(0)
_lm = make_text_lm(len(_vocab), 32, 2, 2).eval()
_vc = VideoCaptioner(_lm, num_frames=8, size=32, d_visual=32, visual_layers=1, visual_heads=2, adapter_heads=2)
_vid = to_float(_d1.gold_test); _ids = _vocab.encode(_d1.gold_test_captions, 12)
with torch.no_grad(), _vc.attending_to(_vc.encode(_vid)):
    _wrapped = _vc.lm(input_ids=_ids).logits
assert torch.equal(_wrapped, _lm(input_ids=_ids).logits), "gates at 0 must leave the frozen LM exactly unchanged"
assert all(not p.requires_grad for n, p in _vc.named_parameters() if n.startswith("lm.") and ".adapter." not in n)

# %%
_vc.loss(_vid, _ids).backward()
_grads = {n: p.grad for n, p in _vc.named_parameters() if p.requires_grad}
assert all(p.grad is None for n, p in _vc.named_parameters() if not p.requires_grad)
assert all(_grads[n].abs().sum() > 0 for n in _grads if n.endswith("_gate")), "gates get gradient at init"
assert all(_grads[n] is None or _grads[n].abs().sum() == 0 for n in _grads if n.startswith("visual.")), "nothing behind a 0 gate learns yet"
_vc.zero_grad()
with torch.no_grad():
    for _a in _vc.adapters: _a.attn_gate.fill_(0.5); _a.ffn_gate.fill_(0.5)
_vc.loss(_vid, _ids).backward()
assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in _vc.named_parameters() if n.startswith("visual.encoder")), "open gates pass gradient to the TimeSformer"
with torch.no_grad(), _vc.attending_to(_vc.encode(_vid)):
    assert not torch.equal(_vc.lm(input_ids=_ids).logits, _wrapped), "open gates change the LM"

# %%
_gen = _vc.generate(_vid, max_new_tokens=6)
with torch.no_grad(), _vc.attending_to(_vc.encode(_vid)):  # manual greedy decode, no cache
    _seq = torch.full((2, 1), BOS)
    for _ in range(_gen.shape[1]): _seq = torch.cat([_seq, _vc.lm(input_ids=_seq).logits[:, -1:].argmax(-1)], 1)
_manual = _seq[:, 1:].masked_fill(torch.cumsum((_seq[:, 1:] == EOS).long(), 1) - (_seq[:, 1:] == EOS).long() > 0, PAD)
test_eq(_gen, _manual)
for _a in _vc.adapters: assert _a.memory is None, "video tokens are released after generate"
_pre = VideoCaptioner(_lm, num_frames=8, size=32, d_visual=32, visual_layers=1, visual_heads=2, mode="prefix")
assert torch.isfinite(_pre.loss(_vid, _ids)); test_eq(_pre.generate(_vid, 4).shape[0], 2)
test_fail(lambda: _vc.encode(_vid[:, :7]), contains="missing or extra frames")
test_fail(lambda: _vc.encode(_vid[0]), contains="(B, T, 3, H, W)")
test_fail(lambda: _vc.encode(_vid[..., :16, :16]), contains="must be 32x32")
test_fail(lambda: _vc.lm(input_ids=_ids), contains="no video tokens")
test_fail(lambda: VideoCaptioner(_lm, mode="linear"), contains="mode must be")


# %% [markdown]
# ## Pseudolabels
#
# As in the paper: cut each video into consecutive non-overlapping clips of `clip_len` frames (trailing frames
# that do not fill a clip are dropped), caption the **centre frame** of each clip with the image captioner, and
# use that caption as the label of the whole clip.

# %%
#| export
def clip_bounds(num_frames: int, # frames in the video
                clip_len: int, # frames per clip
               ) -> list[tuple[int, int]]: # [(start, end)) of each full clip
    "Consecutive non-overlapping clips; a video shorter than one clip is an error."
    if clip_len < 1: raise ValueError(f"clip_len must be >= 1, got {clip_len}")
    if num_frames < clip_len: raise ValueError(f"video has {num_frames} frames, fewer than one clip of {clip_len}")
    return [(s, s + clip_len) for s in range(0, num_frames - clip_len + 1, clip_len)]

def centre_frame(start: int, end: int) -> int:
    "Index of a clip's centre frame (the later of the two middle frames for even lengths)."
    return start + (end - start) // 2

@torch.no_grad()
def pseudolabel_videos(videos: torch.Tensor, # (N, F, 3, H, W) uint8 videos
                       captioner: ImageCaptioner, # trained image captioner
                       vocab: CaptionVocab,
                       clip_len: int, # frames per clip
                       batch_size: int = 256,
                      ) -> tuple[torch.Tensor, list[str], torch.Tensor]: # clips (N*K, clip_len, 3, H, W), captions, centre indices (N*K,)
    "Cut videos into clips and label each clip with the image caption of its centre frame."
    if videos.ndim != 5: raise ValueError(f"videos must be (N, F, 3, H, W), got shape {tuple(videos.shape)}")
    bounds = clip_bounds(videos.shape[1], clip_len)
    clips = torch.stack([videos[:, s:e] for s, e in bounds], 1).flatten(0, 1)
    centres = torch.tensor([centre_frame(s, e) for s, e in bounds]).repeat(videos.shape[0])
    frames = torch.stack([videos[:, centre_frame(s, e)] for s, e in bounds], 1).flatten(0, 1)
    dev = next(captioner.parameters()).device
    captioner.eval()
    captions = []
    for i in range(0, len(frames), batch_size):
        ids = captioner.generate(to_float(frames[i:i + batch_size]).to(dev))
        captions += [vocab.decode(row) for row in ids.cpu()]
    return clips, captions, centres


# %%
test_eq(clip_bounds(16, 8), [(0, 8), (8, 16)])
test_eq(clip_bounds(13, 4), [(0, 4), (4, 8), (8, 12)])  # the 13th frame is dropped
test_eq([centre_frame(s, e) for s, e in clip_bounds(16, 8)], [4, 12])
test_eq(centre_frame(0, 5), 2)
test_fail(lambda: clip_bounds(6, 8), contains="fewer than one clip")


class _Recorder(ImageCaptioner):  # stand-in captioner that records the frames it is asked to caption
    def generate(self, images, max_new_tokens=12):
        self.seen.append(images.clone()); return torch.full((len(images), 1), EOS)
_rec = _Recorder(len(_vocab), 32, 16, 1, 2); _rec.seen = []
_clips_, _caps, _cent = pseudolabel_videos(_d1.videos, _rec, _vocab, clip_len=8)
test_eq(_clips_.shape, (6, 8, 3, 32, 32)); test_eq(len(_caps), 6); test_eq(_cent.tolist(), [4, 12] * 3)
assert torch.equal(_clips_[1], _d1.videos[0, 8:16]) and torch.equal(_clips_[2], _d1.videos[1, :8])
assert torch.equal(torch.cat(_rec.seen), to_float(torch.stack([_d1.videos[v, c] for v in range(3) for c in (4, 12)])))
test_fail(lambda: pseudolabel_videos(_d1.videos[:, :5], _rec, _vocab, 8), contains="fewer than one clip")


# %% [markdown]
# ## Training and evaluation helpers
#
# One loop trains any captioner on a mixture of *pools* (a pool is frames + token ids); each batch is split
# evenly between the pools, which is how "images + videos" shares the same budget as the single-modality
# conditions. Still images enter the video captioner as static clips (the frame repeated `T` times).

# %%
#| export
@dataclass
class Pool:
    "Training examples: uint8 frames (N, 3, H, W) or (N, T, 3, H, W) and token ids (N, L)."
    frames: torch.Tensor
    ids: torch.Tensor
    repeat_frames: int = 0  # > 0: images shown to a video model as static clips of this many frames
    def __post_init__(self):
        if len(self.frames) != len(self.ids) or not len(self.ids):
            raise ValueError(f"pool needs as many captions as frames (and at least one), got {len(self.frames)} and {len(self.ids)}")
    def batch(self, idx: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        x = to_float(self.frames[idx])
        if self.repeat_frames: x = x.unsqueeze(1).expand(-1, self.repeat_frames, -1, -1, -1)
        return x.to(device), self.ids[idx].to(device)

def train_captioner(model: nn.Module, # has `.loss(frames, ids)`
                    pools: list[Pool], # batches are split evenly between these
                    steps: int, batch_size: int, lr: float,
                    generator: torch.Generator, # drives batch sampling (CPU generator)
                    device: torch.device, show_progress: bool = True,
                    gate_lr_mult: float = 1.0, # LR multiplier for the adapters' tanh gates (`*_gate` parameters)
                    on_step: Callable[[int], None] | None = None, # called after optimizer step k (1-based), e.g. to validate
                   ) -> list[float]: # loss per step
    "AdamW with a constant LR on the trainable parameters, gradient clipping at 1."
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if steps and not named: raise ValueError("model has no trainable parameters")
    params = [p for _, p in named]
    gates = [p for n, p in named if n.endswith("_gate")]
    others = [p for n, p in named if not n.endswith("_gate")]
    groups = [{"params": others}] + ([{"params": gates, "lr": lr * gate_lr_mult}] if gates else [])
    opt, losses = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0), []
    shares = [batch_size // len(pools) + (k < batch_size % len(pools)) for k in range(len(pools))]
    model.train()
    for k in progress_bar(range(1, steps + 1), enabled=show_progress, leave=False):
        loss = 0.0
        for pool, n in zip(pools, shares):
            x, ids = pool.batch(torch.randint(len(pool.ids), (n,), generator=generator), device)
            loss = loss + model.loss(x, ids) * (n / batch_size)
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        losses.append(loss.item())
        if on_step is not None: on_step(k); model.train()
    return losses

@torch.no_grad()
def caption_videos(model: VideoCaptioner, videos: torch.Tensor, # (N, T, 3, H, W) uint8
                   vocab: CaptionVocab, batch_size: int = 256) -> list[str]:
    "Greedy captions for uint8 videos."
    model.eval(); dev, out = next(model.parameters()).device, []
    for i in range(0, len(videos), batch_size):
        out += [vocab.decode(r) for r in model.generate(to_float(videos[i:i + batch_size]).to(dev)).cpu()]
    return out


# %%
torch.manual_seed(0)
_pool = Pool(_d1.gold_train, _vocab.encode(_d1.gold_train_captions, 12))
_ipool = Pool(_d1.images, _vocab.encode(_d1.image_captions, 12), repeat_frames=8)
test_eq(_ipool.batch(torch.tensor([0, 1]), "cpu")[0].shape, (2, 8, 3, 32, 32))
_losses = train_captioner(_vc, [_pool, _ipool], steps=3, batch_size=4, lr=1e-3, generator=torch.Generator().manual_seed(0),
                          device=torch.device("cpu"), show_progress=False)
test_eq(len(_losses), 3)
_seen = []
train_captioner(_vc, [_pool], steps=4, batch_size=2, lr=1e-3, generator=torch.Generator().manual_seed(0),
                device=torch.device("cpu"), show_progress=False, on_step=_seen.append)
test_eq(_seen, [1, 2, 3, 4])
test_eq(len(caption_videos(_vc, _d1.gold_test, _vocab)), 2)
test_fail(lambda: Pool(_d1.images, _vocab.encode(_d1.image_captions[:2], 12)), contains="as many captions")

# %% [markdown]
# ## The components trained before the treatment
#
# The frozen OPT LM and the image captioner come before any pre-training condition: every condition and seed
# uses the same ones. `train_components` trains both from one seed: the LM on caption text alone (event
# captions of a fresh text-only sample of events, image captions and narration; never the gold sets), the image
# captioner on all but the last 10 % of the still images (those are held out to score it). To keep the
# default run inside its time budget they are committed as safetensors checkpoints under
# `data/vidcap_checkpoints/`, with a manifest holding their configuration, SHA-256 checksums, the exact command
# and the git commit that made them (`make_checkpoints`). The notebook loads them when its parameters match the
# checkpoint's configuration and trains them from scratch otherwise, or always with `-p retrain True`.

# %%
#| export
MAX_LEN = 24  # longest narration (two phrases) + <bos> + <eos>
COMPONENT_BATCH, COMPONENT_LR = 32, 2e-3  # batch size and learning rate of the LM and the image captioner
CHECKPOINT_COMMAND = 'PYTHONPATH=. .venv/bin/python -c "from moebook.vidcap import make_checkpoints; make_checkpoints()"'

def component_config(seed: int = 0, image_size: int = 32, clip_frames: int = 8, clips_per_video: int = 2,
                     n_images: int = 2000, n_pretrain_videos: int = 400, d_model: int = 64, lm_steps: int = 300,
                     image_captioner_steps: int = 600) -> dict:
    "Everything the frozen LM and the image captioner depend on (a checkpoint is reused only for an equal config)."
    return dict(seed=seed, image_size=image_size, clip_frames=clip_frames, clips_per_video=clips_per_video, n_images=n_images,
                n_pretrain_videos=n_pretrain_videos, d_model=d_model, lm_steps=lm_steps, image_captioner_steps=image_captioner_steps,
                batch_size=COMPONENT_BATCH, lr=COMPONENT_LR, max_len=MAX_LEN)

def heldout_images(n_images: int) -> int:
    "How many of the last images are held out from the image captioner's training (10 %, at least 1)."
    return max(1, n_images // 10)

class _TextOnly(nn.Module):
    "Text LM loss at a random position offset, so captions after a visual prefix sit at trained positions."
    def __init__(self, lm, max_offset): super().__init__(); self.lm, self.max_offset = lm, max_offset
    def loss(self, _x, ids):
        pos = torch.arange(ids.shape[1], device=ids.device) + int(torch.randint(0, self.max_offset + 1, ()))
        return self.lm(input_ids=ids, position_ids=pos.expand_as(ids), labels=ids.masked_fill(ids == PAD, -100)).loss

def lm_corpus(data: WorldData, n_text: int, seed: int) -> list[str]:
    "The frozen LM's text: event captions of `n_text` fresh text-only events, the image captions and the narration."
    rng, size, out = np.random.default_rng([seed, 99]), data.meta["size"], []
    for _ in range(n_text):
        _, ev, _ = simulate_clip(_random_scene(rng, size, int(rng.integers(1, 3))), rng, 4, size)  # only the event is kept
        out.append(gold_caption(ev))
    return out + data.image_captions + [a for aa in data.video_asr for a in aa]

def new_image_captioner(vocab_size: int, cfg: dict) -> ImageCaptioner:
    return ImageCaptioner(vocab_size, cfg["image_size"], cfg["d_model"], 2, 4, cfg["max_len"])

def new_text_lm(vocab_size: int, cfg: dict) -> OPTForCausalLM:
    return make_text_lm(vocab_size, cfg["d_model"], 2, 4, cfg["max_len"] + cfg["clip_frames"])

def train_components(data: WorldData, vocab: CaptionVocab, cfg: dict, # from `component_config`
                     device: torch.device, show: bool = True,
                    ) -> tuple[OPTForCausalLM, ImageCaptioner, dict]: # frozen LM, image captioner (eval mode), last losses
    "Train the text LM (then frozen) and the image captioner from `cfg['seed']`."
    torch.manual_seed(cfg["seed"])
    lm = new_text_lm(len(vocab), cfg).to(device)
    ids = vocab.encode(lm_corpus(data, cfg["n_images"], cfg["seed"]), cfg["max_len"])
    lm_losses = train_captioner(_TextOnly(lm, cfg["clip_frames"]), [Pool(ids, ids)], cfg["lm_steps"], cfg["batch_size"], cfg["lr"],
                                torch.Generator().manual_seed(cfg["seed"]), device, show)
    lm.eval().requires_grad_(False)
    torch.manual_seed(cfg["seed"])
    ic = new_image_captioner(len(vocab), cfg).to(device)
    n_val = heldout_images(len(data.images))
    ic_losses = train_captioner(ic, [Pool(data.images[:-n_val], vocab.encode(data.image_captions[:-n_val], cfg["max_len"]))],
                                cfg["image_captioner_steps"], cfg["batch_size"], cfg["lr"], torch.Generator().manual_seed(cfg["seed"]), device, show)
    ic.eval()
    last = lambda l: float(np.mean(l[-20:])) if l else float("nan")
    return lm, ic, {"lm_loss_last20": last(lm_losses), "image_captioner_loss_last20": last(ic_losses)}

def _sha256(path: Path) -> str: return hashlib.sha256(Path(path).read_bytes()).hexdigest()

def save_components(path: str | Path, lm: OPTForCausalLM, ic: ImageCaptioner, cfg: dict, info: dict) -> dict:
    "Write `lm.safetensors`, `image_captioner.safetensors` and `manifest.json` (config, checksums, `info`)."
    path = Path(path); path.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, m in (("lm.safetensors", lm), ("image_captioner.safetensors", ic)):
        save_model(m, str(path / name)); files[name] = {"sha256": _sha256(path / name), "bytes": (path / name).stat().st_size}
    manifest = {"config": cfg, "files": files, **info}
    (path / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest

def load_components(path: str | Path, vocab: CaptionVocab, cfg: dict) -> tuple[OPTForCausalLM, ImageCaptioner] | None:
    "The checkpointed LM and image captioner if `path` holds them for exactly `cfg`, else None; a bad checksum raises."
    path = Path(path)
    if not (path / "manifest.json").exists(): return None
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest["config"] != cfg: return None
    for name, f in manifest["files"].items():
        if _sha256(path / name) != f["sha256"]: raise ValueError(f"{path / name}: SHA-256 differs from {path / 'manifest.json'} (corrupted or replaced)")
    lm, ic = new_text_lm(len(vocab), cfg), new_image_captioner(len(vocab), cfg)
    load_model(lm, str(path / "lm.safetensors")); load_model(ic, str(path / "image_captioner.safetensors"))
    return lm.eval().requires_grad_(False), ic.eval()

def score_image_captioner(ic: ImageCaptioner, data: WorldData, vocab: CaptionVocab) -> dict[str, float]:
    "Captioning metrics of the image captioner on its held-out images."
    n_val = heldout_images(len(data.images))
    with torch.no_grad(): hyps = [vocab.decode(r) for r in ic.generate(to_float(data.images[-n_val:]).to(next(ic.parameters()).device)).cpu()]
    return caption_scores(data.image_captions[-n_val:], hyps)

def make_checkpoints(path: str | Path = "data/vidcap_checkpoints", # where to write (relative to the repository root)
                     device: str = "cpu", **config) -> dict: # config: overrides of `component_config`
    "Train the frozen components at `config` (default: the notebook's defaults) and save them with provenance."
    from moebook.evidence import provenance, _repo_root
    import time
    cfg, t0 = component_config(**config), time.time()
    data = make_world_data(cfg["seed"], cfg["n_images"], cfg["n_pretrain_videos"], 1, 1, cfg["clip_frames"], cfg["clips_per_video"], cfg["image_size"])
    vocab, dev = CaptionVocab(), torch.device(device)
    lm, ic, losses = train_components(data, vocab, cfg, dev, show=False)
    info = {"made_by": "moebook.vidcap.make_checkpoints", "command": CHECKPOINT_COMMAND, **provenance(), "device": str(dev),
            "torch": torch.__version__, "wall_s": round(time.time() - t0, 1), "image_captioner_heldout": score_image_captioner(ic, data, vocab), **losses}
    out = Path(path) if Path(path).is_absolute() else _repo_root() / path
    return save_components(out, lm.cpu(), ic.cpu(), cfg, info)


# %%
_cfg = component_config(seed=1, n_images=12, n_pretrain_videos=3, d_model=16, lm_steps=2, image_captioner_steps=2)
_dc = make_world_data(1, 12, 3, 1, 1)
_lm1, _ic1, _ = train_components(_dc, _vocab, _cfg, torch.device("cpu"), show=False)
_lm2, _ic2, _ = train_components(_dc, _vocab, _cfg, torch.device("cpu"), show=False)
assert all(torch.equal(a, b) for a, b in zip(_ic1.state_dict().values(), _ic2.state_dict().values())), "components are seeded"
with tempfile.TemporaryDirectory() as _d:
    save_components(_d, _lm1, _ic1, _cfg, {"command": "test"})
    _lm3, _ic3 = load_components(_d, _vocab, _cfg)
    _x = _vocab.encode(["a red square"], 8)
    test_eq(_lm3(input_ids=_x).logits, _lm1(input_ids=_x).logits)
    assert all(torch.equal(a, b) for a, b in zip(_ic3.state_dict().values(), _ic1.state_dict().values()))
    test_eq(load_components(_d, _vocab, {**_cfg, "lm_steps": 3}), None)  # another config: not reused
    with open(Path(_d) / "lm.safetensors", "r+b") as _f: _f.seek(-4, 2); _f.write(b"\x00\x01\x02\x03")
    test_fail(lambda: load_components(_d, _vocab, _cfg), contains="SHA-256 differs")


# %% [markdown]
# ## One paired run
#
# `train_and_score` is one (condition, seed) cell of the experiment: build the video captioner from `seed`
# alone, pre-train it on the condition's pools, fine-tune it on the gold training clips while scoring the
# validation clips every `eval_every` steps, keep the checkpoint with the best validation CIDEr, and only then
# caption the test clips. Its initial weights and both data orders (pre-training batches are drawn by index,
# and every condition's pool has one caption per pre-training clip; fine-tuning batches come from a fresh
# generator) depend on the seed only, so the conditions of one seed differ by their pre-training text alone.
# The result carries a checksum of the initial weights so the pairing is checked, not assumed.

# %%
#| export
def weights_sha(model: nn.Module) -> str:
    "SHA-256 prefix of a model's trainable parameters (names and values)."
    h = hashlib.sha256()
    for n, p in model.named_parameters():
        if p.requires_grad: h.update(n.encode()); h.update(p.detach().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

def train_and_score(lm: OPTForCausalLM, # the frozen LM (copied, never modified)
                    pretrain: list[Pool], # the condition's pre-training pools ([] = no pre-training)
                    gold: Pool, # gold training clips
                    val: tuple[torch.Tensor, list[str]], # validation clips (uint8) and captions: checkpoint selection
                    test: tuple[torch.Tensor, list[str]], # test clips and captions: scored once, at the end
                    vocab: CaptionVocab, seed: int, mode: str = "xattn", d_visual: int = 32, pretrain_steps: int = 150,
                    finetune_steps: int = 100, eval_every: int = 25, batch_size: int = 16, lr: float = 2e-3,
                    gate_lr_mult: float = 10.0, device: str | torch.device = "cpu", show: bool = False) -> dict:
    "Pre-train, fine-tune with validation checkpoint selection, score on test; everything random comes from `seed`."
    if eval_every < 1 or finetune_steps < 1: raise ValueError(f"need finetune_steps >= 1 and eval_every >= 1, got {finetune_steps}, {eval_every}")
    dev = torch.device(device)
    torch.manual_seed(seed)  # initial weights: the seed only, never the condition
    model = VideoCaptioner(lm, test[0].shape[1], test[0].shape[-1], 8, d_visual, 2, 4, 4, mode=mode).to(dev)
    init = weights_sha(model)
    pre = train_captioner(model, pretrain, pretrain_steps if pretrain else 0, batch_size, lr, torch.Generator().manual_seed(seed),
                          dev, show, gate_lr_mult)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    curve, best = [], {"cider": -float("inf")}
    def validate(k: int):
        if k % eval_every and k != finetune_steps: return
        c = caption_scores(val[1], caption_videos(model, val[0], vocab))["CIDEr"]
        curve.append([k, c])
        if c > best["cider"]: best.update(cider=c, step=k, state=[p.detach().clone() for _, p in trainable])
    ft = train_captioner(model, [gold], finetune_steps, batch_size, lr, torch.Generator().manual_seed(seed), dev, show,
                         gate_lr_mult, on_step=validate)
    with torch.no_grad():
        for (_, p), v in zip(trainable, best["state"]): p.copy_(v)
    hyps = caption_videos(model, test[0], vocab)
    gates = {k: [float(torch.tanh(getattr(a, f"{k}_gate").detach())) for a in model.adapters] for k in ("attn", "ffn")}
    return {"init_sha": init, "val_curve": curve, "best_step": best["step"], "val_cider": best["cider"],
            "test": caption_scores(test[1], hyps), "test_cider_items": cider_per_item(test[1], hyps).tolist(), "hyps": hyps,
            "gates": gates, "pretrain_loss": float(np.mean(pre[-20:])) if pre else None, "finetune_loss": float(np.mean(ft[-20:]))}


# %%
_lmt = make_text_lm(len(_vocab), 32, 2, 2, 24).eval().requires_grad_(False)
_gold = Pool(_d1.gold_train, _vocab.encode(_d1.gold_train_captions, 24))
_vt = ((_d1.gold_val, _d1.gold_val_captions), (_d1.gold_test, _d1.gold_test_captions))
_kw = dict(d_visual=16, pretrain_steps=2, finetune_steps=3, eval_every=2, batch_size=2)
_a = train_and_score(_lmt, [], _gold, *_vt, _vocab, seed=5, **_kw)
_b = train_and_score(_lmt, [_ipool], _gold, *_vt, _vocab, seed=5, **_kw)
test_eq(_a["init_sha"], _b["init_sha"])  # two conditions of one seed start from the same weights
assert train_and_score(_lmt, [], _gold, *_vt, _vocab, seed=6, **_kw)["init_sha"] != _a["init_sha"]
test_eq([k for k, _ in _a["val_curve"]], [2, 3]); test_eq(len(_a["test_cider_items"]), 2)
test_eq(_a["val_cider"], max(c for _, c in _a["val_curve"]))

# %% [markdown]
# ### The conditions, and a validation-only pilot
#
# `condition_pools` builds the pre-training pools of every condition from the pseudolabelled clips: the same
# clips carry the ASR-like narration, the matched narration or the pseudolabels, so only the text differs;
# still images enter as static clips. `validation_pilot` runs chosen conditions and seeds at chosen sizes and
# scores them on the **validation** clips only (the test clips are passed nowhere), saving a record with the
# git commit and the command; it fixed the claims' target and measured the full-size reference of the shrink
# precondition.

# %%
#| export
_PILOT: dict = {}  # what `_pilot_one` needs; set before `paired_runs` forks its workers (a closure cannot be pickled)

def _pilot_one(v: str, s: int) -> dict:
    import time
    P, c0 = _PILOT, time.process_time()
    pools, mode = P["conds"][v]
    r = train_and_score(P["lm"], pools, P["gold"], P["val"], P["val"], P["vocab"], s, mode=mode, **P["run_kw"])  # "test" = validation here
    return {"val_cider": r["val_cider"], "val_curve": r["val_curve"], "distinct_captions": len(set(r["hyps"])), "cpu_s": time.process_time() - c0}

CONDITION_NAMES = ("none", "ASR-like captions", "matched ASR-like", "video pseudolabels", "images only", "images + videos",
                   "images + videos (prefix)")

def condition_pools(data: WorldData, vocab: CaptionVocab, pl_clips: torch.Tensor, pl_captions: list[str],
                   ) -> dict[str, tuple[list[Pool], str]]: # condition -> (pre-training pools, adapter mode)
    "Pre-training pools and adapter mode of every condition in `CONDITION_NAMES`."
    asr = [a for aa in data.video_asr for a in aa]
    enc = lambda texts: vocab.encode(texts, MAX_LEN)
    images = Pool(data.images, enc(data.image_captions), repeat_frames=pl_clips.shape[1])
    pl = Pool(pl_clips, enc(pl_captions))
    return {"none": ([], "xattn"), "ASR-like captions": ([Pool(pl_clips, enc(asr))], "xattn"),
            "matched ASR-like": ([Pool(pl_clips, enc(matched_asr(asr, pl_captions)))], "xattn"),
            "video pseudolabels": ([pl], "xattn"), "images only": ([images], "xattn"),
            "images + videos": ([images, pl], "xattn"), "images + videos (prefix)": ([images, pl], "prefix")}

def validation_pilot(out: str | Path, # the record (JSON) to write
                     conditions: list[str], seeds: list[int], workers: int = 2,
                     n_gold_val: int = 100, **run_kw, # sizes passed to `train_and_score` (d_visual, steps, batch_size, ...)
                    ) -> dict:
    "Validation CIDEr of `conditions` x `seeds` at the default data and components (test clips never captioned)."
    from moebook.evidence import paired_runs, provenance
    import time
    t0, cfg = time.time(), component_config()
    data = make_world_data(cfg["seed"], cfg["n_images"], cfg["n_pretrain_videos"], 160, 1, cfg["clip_frames"], cfg["clips_per_video"],
                           cfg["image_size"], n_gold_val)
    vocab = CaptionVocab()
    loaded = load_components(Path(__file__).resolve().parent.parent / "data" / "vidcap_checkpoints", vocab, cfg)
    if loaded is None: raise FileNotFoundError("validation_pilot needs the committed checkpoints in data/vidcap_checkpoints")
    lm, ic = loaded
    pl_clips, pl_captions, _ = pseudolabel_videos(data.videos, ic, vocab, cfg["clip_frames"])
    _PILOT.update(conds=condition_pools(data, vocab, pl_clips, pl_captions), lm=lm, vocab=vocab, run_kw=run_kw,
                  gold=Pool(data.gold_train, vocab.encode(data.gold_train_captions, MAX_LEN)), val=(data.gold_val, data.gold_val_captions))
    R = paired_runs(_pilot_one, conditions, seeds, workers=workers)
    call = f"validation_pilot({str(out)!r}, {list(conditions)!r}, {list(seeds)!r}, workers={workers}, n_gold_val={n_gold_val}, **{run_kw!r})"
    rec = {"made_by": "moebook.vidcap", "call": call, **provenance(),
           "run_kw": run_kw, "seeds": list(seeds), "n_gold_val": n_gold_val, "wall_s": time.time() - t0,
           "val_cider": {v: [R[(v, s)]["val_cider"] for s in seeds] for v in conditions},
           "runs": {f"{v}|{s}": R[(v, s)] for v in conditions for s in seeds}}
    Path(out).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


# %%
test_eq(set(condition_pools(_d1, _vocab, _clips_, ["a red square"] * 6)), set(CONDITION_NAMES))
_cp = condition_pools(_d1, _vocab, _clips_, ["a red square"] * 6)
assert all(len(p.ids) == 6 for v in CONDITION_NAMES[1:4] for p in _cp[v][0]), "the video conditions caption the same clips"
test_eq(_cp["images + videos (prefix)"][1], "prefix")

# %% [markdown]
# ## Claims, fixed before the experiment
#
# Each claim's metric, direction, kind, target and precondition thresholds are set here, before any
# experiment cell runs. Effects are *treatment − control* in CIDEr-D points on the gold **test** clips, one
# paired difference per seed; the primary estimate is the paired *t* interval over the seeds.
#
# **How the target was fixed.** The paper's +4 CIDEr on MSR-VTT has no meaning on our scale (our captions are
# five words from a closed vocabulary; a perfect caption scores 10). We fixed the smallest effect of interest as
# a fraction of what pre-training can do here: a pilot at these defaults with 3 seeds (`validation_pilot`, whose
# records `FULL_SIZE_RECORD` and `NONE_RECORD` hold the exact calls and the clean commits that made them; the
# test clips were never captioned) measured the mean paired no-pre-training → video-pseudolabel gap in
# **validation** CIDEr; the target is a quarter of it, rounded to two decimals. Both primary claims use it: an effect smaller than a quarter of the
# whole pre-training benefit would not be the paper's effect.
#
# **Preconditions.** The pseudolabels must be grounded for the paper's mechanism to exist: the image captioner
# scores at least 3 CIDEr on its held-out images and its pseudolabels name at least half of the event's object
# words. The fine-tuned models must have reached a plateau on validation: the mean validation CIDEr gain over
# the last `eval_every` fine-tuning steps is at most 0.3. A smaller video captioner (narrower TimeSformer, half
# the steps and batch) was tried first: it barely trained (one or two distinct captions per model, a
# validation none → pseudolabel gap of 0.17 CIDEr, `data/results/vidcap_pilot_defaults.json`), so the default
# is the full-size captioner (`FULL_SIZE`). Any
# smaller setting passed by parameters must keep the effect: its mean pseudolabel − ASR validation gain must be
# at least half of the full size's (`FULL_SIZE_RECORD`, 3 seeds, validation clips only).
#
# **Power.** With 3 seeds the paired *t* interval is wide (the MDE is about 3.1 paired standard deviations,
# and the images-only CIDEr is bimodal across seeds), so the default has 10 paired seeds (MDE about 0.94
# paired standard deviations); a claim whose MDE exceeds the target is `inconclusive` by the rule, whatever
# its point estimate.
#
# **Where the runs come from.** Ten seeds of six conditions took 4,117 CPU-seconds (about 34 minutes of an idle
# 2-core machine; the manifest's command line says where that was measured), more than the 10-minute default may. So the default *loads* those 60 runs from `data/vidcap_runs/`: the cache
# of one `paired_runs` call at exactly these parameters, sealed by `moebook.evidence.seal_runs` with the
# command and the clean commit that made them and the SHA-256 of every result (checked on load; a run is
# reused only when every setting it depends on matches). Everything else (data, components, pseudolabels,
# baselines, statistics) is computed here. `-p evidence_runs ""` trains all 60 runs here instead, and the
# slow test `tests/test_vidcap.py::test_sealed_runs_reproduce` retrains three seeds and compares.

# %%
#| slow
NB = "05_vidcap_pseudolabels.ipynb"
root = Path(moebook.__file__).resolve().parent.parent
FULL_SIZE_RECORD = "data/results/vidcap_pilot_fullsize.json"  # validation_pilot(..., ["ASR-like captions", "video pseudolabels"], [0, 1, 2], **FULL_SIZE)
NONE_RECORD = "data/results/vidcap_pilot_fullsize_none.json"  # validation_pilot(..., ["none"], [0, 1, 2], **FULL_SIZE)
for rec_path in (FULL_SIZE_RECORD, NONE_RECORD):
    if not (root / rec_path).exists(): raise FileNotFoundError(f"{rec_path} is missing: it fixes the claims' target (see the markdown above)")
pilot_pl, pilot_none = (json.loads((root / r).read_text()) for r in (FULL_SIZE_RECORD, NONE_RECORD))
assert pilot_pl["seeds"] == pilot_none["seeds"] and pilot_pl["run_kw"] == pilot_none["run_kw"], "the two pilot records must be paired"
PILOT_GAP = float(np.mean(np.asarray(pilot_pl["val_cider"]["video pseudolabels"]) - np.asarray(pilot_none["val_cider"]["none"])))
TARGET = round(PILOT_GAP / 4, 2)  # CIDEr: the smallest effect of interest of claims 1 and 2
for r in (pilot_pl, pilot_none): print(f"pilot {r['call'][:60]}...: commit {r['commit'][:10]}, dirty {r['dirty']}")
print(f"validation gap none -> pseudolabels {PILOT_GAP:.3f} CIDEr; target {TARGET}")
MIN_IMAGE_CIDER, MIN_GROUNDING, MAX_PLATEAU_GAIN, MIN_SHRINK_RATIO = 3.0, 0.5, 0.3, 0.5
FULL_SIZE = dict(d_visual=64, pretrain_steps=300, finetune_steps=200, eval_every=50, batch_size=32)  # the unshrunk video captioner
DEVIATIONS = ["synthetic 32x32 shape world with a closed vocabulary, not HowTo100M / MSR-VTT: tests the mechanism, not the paper's magnitudes",
              "tiny models trained here (2-layer OPT LM, 2-layer TimeSformer, CNN + GPT-2 image captioner) instead of pre-trained OPT / BLIP",
              "ASR-like text is generated (intentions, chatter, half-right mentions), not real speech transcripts",
              "CIDEr-D with our tokenisation, not the COCO PTB tokenizer (identical tokens on this vocabulary)"]
V_NONE, V_ASR, V_MATCHED, V_PL, V_IMG, V_BOTH, V_PREFIX = CONDITION_NAMES
_common = dict(notebook=NB, metric="CIDEr-D on gold test clips", direction="increase", kind="superiority", deviations=DEVIATIONS)
CLAIMS = {
    "1": Claim(id="1", claim="Image-captioner pseudolabels pre-train a video captioner better than ASR narration",
               treatment=V_PL, control=V_ASR, target=TARGET, **_common),
    "1b": Claim(id="1b", claim="Pseudolabels beat ASR narration, per test clip (seed-averaged CIDEr)", treatment=V_PL, control=V_ASR,
                target=TARGET, primary=False, **_common),
    "2": Claim(id="2", claim="Pre-training on images and videos together beats the best single source", treatment=V_BOTH,
               control="best single source on validation", target=TARGET, paper_effect=4.0, paper_metric="CIDEr on MSR-VTT", **_common),
    "3": Claim(id="3", claim="Gated cross-attention adapters beat a projected visual prefix (ablation)", treatment=V_BOTH,
               control=V_PREFIX, target=TARGET, primary=False, **_common),
}

# %% [markdown]
# ## Experiment
#
# Steps: (1) generate the world; (2) load (or train) the frozen OPT LM and the image captioner; (3) pseudolabel
# the pre-training videos; (4) for every condition and seed, pre-train the video captioner for
# `pretrain_steps` steps, fine-tune it `finetune_steps` steps on the gold training clips keeping the best
# validation checkpoint, and caption the test clips.
#
# **Scale-up** (20 paired seeds trained here, and the prefix ablation; on a GPU, not timed here):
# `moebook run nbs/05_vidcap_pseudolabels.ipynb -p n_seeds 20 -p prefix_ablation True -p evidence_runs "" -p setting evidence -p device cuda`

# %%
#| slow
_ints = dict(seed=seed, n_seeds=n_seeds, workers=workers, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, eval_every=eval_every,
             batch_size=batch_size, d_model=d_model, d_visual=d_visual, lm_steps=lm_steps, image_captioner_steps=image_captioner_steps)
for _name, _v in _ints.items():
    if not isinstance(_v, int) or isinstance(_v, bool) or _v < (0 if _name in ("seed", "pretrain_steps", "lm_steps", "image_captioner_steps") else 1):
        raise ValueError(f"parameter {_name} must be a non-negative int (positive for sizes, fine-tuning and eval_every), got {_v!r}")
if n_seeds < 3: raise ValueError(f"n_seeds must be >= 3: the paired t interval's coverage is only trusted from 3 pairs, got {n_seeds}")
if d_model % 4 or d_visual % 4: raise ValueError(f"d_model and d_visual must be divisible by 4 (attention heads), got {d_model}, {d_visual}")
if not lr > 0: raise ValueError(f"lr must be positive, got {lr}")
if setting not in ("smoke", "default", "evidence"): raise ValueError(f"setting must be smoke, default or evidence, got {setting!r}")
if not isinstance(evidence_runs, str): raise TypeError(f"evidence_runs must be a folder path (str) or '', got {evidence_runs!r}")
sealed = sealed_runs(root / evidence_runs) if evidence_runs else None  # checks every result's SHA-256 against its manifest
dev = pick_device(device)
n_workers = workers if dev.type == "cpu" else 1  # CUDA cannot be forked
show = progress
seed_everything(seed)
data = make_world_data(seed, n_images, n_pretrain_videos, n_gold_train, n_gold_test, clip_frames, clips_per_video, image_size, n_gold_val)
vocab = CaptionVocab()
print(f"device {dev}, {n_workers} worker(s); vocab {len(vocab)} words; images {tuple(data.images.shape)}, pre-training videos "
      f"{tuple(data.videos.shape)}, gold train / val / test {len(data.gold_train)} / {len(data.gold_val)} / {len(data.gold_test)} clips")

# %% [markdown]
# The manifest records what was generated; sets whose sizes match `data/vidcap_manifest.json` must match it
# exactly.

# %%
#| slow
manifest = world_manifest(data)
manifest_path = root / "data" / "vidcap_manifest.json"
saved = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
if saved and saved["parameters"] == manifest["parameters"]:
    for name, v in manifest["sets"].items():
        if name in saved["sets"] and v["shape"] == saved["sets"][name]["shape"] and v != saved["sets"][name]:
            raise RuntimeError(f"{name} differs from {manifest_path}: data generation is no longer deterministic/unchanged")
    print(f"checked against {manifest_path.name}: every set of the same size matches")
for name, v in manifest["sets"].items(): print(f"{name:16s} {v}")

# %% [markdown]
# ### The frozen LM, the image captioner and the pseudolabels

# %%
#| slow
comp_cfg = component_config(seed, image_size, clip_frames, clips_per_video, n_images, n_pretrain_videos, d_model, lm_steps, image_captioner_steps)
ckpt_dir = root / "data" / "vidcap_checkpoints"
loaded = None if retrain else load_components(ckpt_dir, vocab, comp_cfg)
if loaded:
    lm, img_cap = (m.to(dev) for m in loaded)
    ckpt = json.loads((ckpt_dir / "manifest.json").read_text())
    print(f"loaded the frozen LM and the image captioner from {ckpt_dir.relative_to(root)} (commit {ckpt['commit'][:10]}, dirty {ckpt['dirty']}; "
          f"made by: {ckpt['command']})")
else:
    print("training the frozen LM and the image captioner " + ("(retrain=True)" if retrain else "(no checkpoint for these parameters)"))
    lm, img_cap, _losses = train_components(data, vocab, comp_cfg, dev, show)
    print(f"[{clock.fields()['wall_s']:.0f}s] last losses: {_losses}")
ckpt_sha = hashlib.sha256(b"".join(t.cpu().numpy().tobytes() for m in (lm, img_cap) for t in m.state_dict().values())).hexdigest()[:16]
ic_scores = score_image_captioner(img_cap, data, vocab)
print(f"image captioner on {heldout_images(n_images)} held-out images: " + ", ".join(f"{k} {v:.3f}" for k, v in ic_scores.items()))

clip_events = [e for evs in data.video_events for e in evs]
clip_asr = [a for asr in data.video_asr for a in asr]
pl_clips, pl_captions, _ = pseudolabel_videos(data.videos, img_cap, vocab, clip_frames)
asr_matched = matched_asr(clip_asr, pl_captions)
g = {name: float(np.mean([grounding(c, e) for c, e in zip(texts, clip_events)]))
     for name, texts in (("pseudolabels", pl_captions), ("ASR-like", clip_asr), ("matched ASR-like", asr_matched))}
g["gold"] = float(np.mean([grounding(c, e) for c, e in zip(data.gold_train_captions, data.gold_train_events)]))
print(f"[{clock.fields()['wall_s']:.0f}s] {len(pl_captions)} pseudolabelled clips; grounding (fraction of the event's object words named): "
      + ", ".join(f"{k} {v:.2f}" for k, v in g.items()))
print("text diversity: " + ", ".join(f"{k} {caption_diversity(t)}" for k, t in (("pseudolabels", pl_captions), ("ASR-like", clip_asr), ("matched ASR-like", asr_matched))))
for e, p, a, m in list(zip(clip_events, pl_captions, clip_asr, asr_matched))[:4]:
    print(f"  true: {gold_caption(e):33s} | pseudolabel: {p:30s} | ASR-like: {a} | matched: {m}")


# %% [markdown]
# ### Trivial baselines
#
# Computed on the same test (and validation) clips as the models: the most frequent gold training caption for
# every clip, a random gold training caption per clip, the oracle event caption (the ceiling), and the image
# captioner applied to each test clip's centre frame (what the pseudolabels alone would score).

# %%
#| slow
def _baselines(clips: torch.Tensor, caps: list[str], events: list[dict]) -> dict[str, float]:
    _, zero_shot, _ = pseudolabel_videos(clips, img_cap, vocab, clip_frames)
    return {"majority caption (one caption for every clip)": caption_scores(caps, [majority_caption(data.gold_train_captions)] * len(caps))["CIDEr"],
            "random training caption": caption_scores(caps, random_captions(data.gold_train_captions, len(caps), np.random.default_rng(seed)))["CIDEr"],
            "oracle event caption (ceiling)": caption_scores(caps, [gold_caption(e) for e in events])["CIDEr"],
            "image captioner on the centre frame (zero-shot)": caption_scores(caps, zero_shot)["CIDEr"]}
trivial = {"test": _baselines(data.gold_test, data.gold_test_captions, data.gold_test_events),
           "val": _baselines(data.gold_val, data.gold_val_captions, data.gold_val_events)}
print(f"majority caption: {majority_caption(data.gold_train_captions)!r}")
for k in trivial["test"]: print(f"{k:50s} CIDEr test {trivial['test'][k]:.3f}, val {trivial['val'][k]:.3f}")

# %% [markdown]
# ### Paired runs: every condition on every seed
#
# Every condition gets the same `pretrain_steps` x `batch_size` examples (except *none*), then the same
# fine-tuning; seed *s* fixes the initial weights and both data orders for all conditions (checked below from
# the runs' initial-weight checksums). `paired_runs` runs them in `workers` forked processes, one torch thread
# each, and caches each result when `cache_dir` is set.

# %%
#| slow
CONDITIONS = condition_pools(data, vocab, pl_clips, pl_captions)
if not prefix_ablation: del CONDITIONS[V_PREFIX]
if not matched_baseline: del CONDITIONS[V_MATCHED]
gold_pool = Pool(data.gold_train, vocab.encode(data.gold_train_captions, MAX_LEN))
val_set, test_set = (data.gold_val, data.gold_val_captions), (data.gold_test, data.gold_test_captions)
run_seeds = [seed + k for k in range(n_seeds)]
run_kw = dict(d_visual=d_visual, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps, eval_every=eval_every,
              batch_size=batch_size, lr=lr, gate_lr_mult=gate_lr_mult)

def run_one(variant: str, s: int) -> dict:
    pools, mode = CONDITIONS[variant]
    return train_and_score(lm, pools, gold_pool, val_set, test_set, vocab, s, mode=mode, device=dev, **run_kw)

made_here = []  # (condition, seed) of the runs trained in this session (`paired_runs` reports only those)
def _report(done, total, v, s):
    made_here.append((v, s))
    if done % len(CONDITIONS) == 0: print(f"[{clock.fields()['wall_s']:.0f}s] {done}/{total} runs done")
if sealed: print(f"reusing the sealed runs in {evidence_runs}: made at commit {sealed['commit'][:10]} (dirty {sealed['dirty']}) by `{sealed['command']}`")
R = paired_runs(run_one, list(CONDITIONS), run_seeds, config=dict(run_kw, sets=manifest["sets"], components=comp_cfg, ckpt=ckpt_sha, device=dev.type),
                cache_dir=cache_dir or None, reuse=[root / evidence_runs] if sealed else [], workers=n_workers, progress=_report)
print(f"[{clock.fields()['wall_s']:.0f}s] {len(R)} runs: {len(R) - len(made_here)} loaded from sealed or cached results, {len(made_here)} trained in this run")
for s in run_seeds:
    assert len({R[(v, s)]["init_sha"] for v in CONDITIONS if CONDITIONS[v][1] == "xattn"}) == 1, f"seed {s}: conditions start from different weights"
print(f"[{clock.fields()['wall_s']:.0f}s] {len(R)} runs; every cross-attention condition of a seed started from the same weights")

# %% [markdown]
# ### Results per condition
#
# Test CIDEr (mean and per-seed range), validation CIDEr (the checkpoint kept), caption diversity of the test
# captions (distinct captions per clip, distinct bigrams; a model that writes one caption for every clip is
# marked *collapsed*), the open gates tanh(α) of the two adapters, and the validation gain over the last
# `eval_every` fine-tuning steps (the plateau check).

# %%
#| slow
test_cider = {v: np.array([R[(v, s)]["test"]["CIDEr"] for s in run_seeds]) for v in CONDITIONS}
val_cider = {v: np.array([R[(v, s)]["val_cider"] for s in run_seeds]) for v in CONDITIONS}
div = {v: [caption_diversity(R[(v, s)]["hyps"]) for s in run_seeds] for v in CONDITIONS}
collapsed = {v: sum(d["distinct_captions"] * n_gold_test <= 1 for d in div[v]) for v in CONDITIONS}
plateau = {v: np.array([max(0.0, R[(v, s)]["val_curve"][-1][1] - R[(v, s)]["val_curve"][-2][1]) if len(R[(v, s)]["val_curve"]) > 1 else float("nan")
                        for s in run_seeds]) for v in CONDITIONS}
gates = {v: {k: np.mean([R[(v, s)]["gates"][k] for s in run_seeds], 0).round(3).tolist() for k in ("attn", "ffn")} for v in CONDITIONS}
print(f"{'condition':26s} {'test CIDEr':>20s} {'val CIDEr':>10s} {'BLEU-4':>7s} {'ROUGE-L':>7s} {'distinct':>9s} {'bigrams':>7s} {'plateau':>7s}  gates tanh(a) attn / ffn")
for v in CONDITIONS:
    t = test_cider[v]
    print(f"{v:26s} {t.mean():6.3f} [{t.min():.2f}, {t.max():.2f}] {val_cider[v].mean():10.3f} "
          f"{np.mean([R[(v, s)]['test']['BLEU-4'] for s in run_seeds]):7.3f} {np.mean([R[(v, s)]['test']['ROUGE-L'] for s in run_seeds]):7.3f} "
          f"{np.mean([d['distinct_captions'] for d in div[v]]):9.3f} {np.mean([d['distinct_bigrams'] for d in div[v]]):7.1f} "
          f"{np.nanmean(plateau[v]):7.3f}  {gates[v]['attn']} / {gates[v]['ffn']}" + (f"  collapsed in {collapsed[v]}/{n_seeds} seeds" if collapsed[v] else ""))
for k, b in trivial["test"].items(): print(f"{k:50s} {b:6.3f}")

# %% [markdown]
# ### Figures
#
# Left: test CIDEr of every seed (one line per seed joins its conditions: the pairing), with the trivial
# baselines. Right: the per-seed paired differences of the claims, with their mean, 95 % CI and the target.

# %%
#| slow
conds = list(CONDITIONS)
best_single = max((V_PL, V_IMG), key=lambda v: val_cider[v].mean())  # chosen on validation, never on test
pairs = {"1: pseudolabels - ASR": (V_PL, V_ASR), f"2: images+videos - {best_single}": (V_BOTH, best_single)}
if prefix_ablation: pairs["3: xattn - prefix"] = (V_BOTH, V_PREFIX)
fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw=dict(width_ratios=[1.6, 1]))
for i, s in enumerate(run_seeds): ax.plot(range(len(conds)), [test_cider[v][i] for v in conds], color="grey", lw=0.5, alpha=0.5)
for j, v in enumerate(conds):
    ax.plot(np.full(n_seeds, j) + np.linspace(-0.12, 0.12, n_seeds), test_cider[v], "o", ms=4, label=None)
    ax.plot([j - 0.25, j + 0.25], [test_cider[v].mean()] * 2, "k-", lw=2)
for (k, b), c in zip(list(trivial["test"].items())[:2], ("tab:red", "tab:orange")): ax.axhline(b, ls="--", color=c, lw=1, label=k)
ax.set_xticks(range(len(conds)), [c.replace(" + ", "+\n").replace(" (", "\n(") for c in conds], fontsize=8)
ax.set_ylabel("CIDEr-D, gold test clips"); ax.legend(fontsize=7, loc="upper left")
ax.set_title(f"{n_seeds} paired seeds (points), mean (bar); ceiling {trivial['test']['oracle event caption (ceiling)']:.0f}", fontsize=9)
for j, (name, (a, b)) in enumerate(pairs.items()):
    d = test_cider[a] - test_cider[b]; e = paired_t(test_cider[a], test_cider[b])
    bx.plot(d, np.full(n_seeds, j) + np.linspace(-0.15, 0.15, n_seeds), "o", ms=4, alpha=0.7)
    bx.errorbar([e.effect], [j], xerr=[[e.effect - e.ci[0]], [e.ci[1] - e.effect]], fmt="D", color="k", capsize=4)
bx.axvline(0, color="k", lw=0.8); bx.axvline(TARGET, color="tab:green", ls=":", label=f"target {TARGET}")
bx.set_yticks(range(len(pairs)), list(pairs), fontsize=8); bx.invert_yaxis(); bx.legend(fontsize=7)
bx.set_xlabel("paired difference in test CIDEr (per seed; mean and 95 % CI)")
plt.tight_layout(); plt.show()

# %% [markdown]
# Caption diversity (per seed) and validation CIDEr during fine-tuning (mean over seeds, the plateau check):
# a condition whose model writes one caption for every clip sits at 1 / clips distinct captions.

# %%
#| slow
fig, axs = plt.subplots(1, 3, figsize=(14, 3.6))
for j, v in enumerate(conds):
    axs[0].plot(np.full(n_seeds, j) + np.linspace(-0.12, 0.12, n_seeds), [d["distinct_captions"] for d in div[v]], "o", ms=4)
    axs[1].plot(np.full(n_seeds, j) + np.linspace(-0.12, 0.12, n_seeds), [d["distinct_bigrams"] for d in div[v]], "o", ms=4)
    curve = np.mean([[c for _, c in R[(v, s)]["val_curve"]] for s in run_seeds], 0)
    axs[2].plot([k for k, _ in R[(v, run_seeds[0])]["val_curve"]], curve, "o-", label=v)
gold_div = caption_diversity(data.gold_test_captions)
axs[0].axhline(gold_div["distinct_captions"], ls="--", color="k", lw=1, label="gold test captions")
axs[1].axhline(gold_div["distinct_bigrams"], ls="--", color="k", lw=1, label="gold test captions")
for a, t in zip(axs[:2], ("distinct captions / test clips", "distinct bigrams in test captions")):
    a.set_xticks(range(len(conds)), [c.replace(" + ", "+\n").replace(" (", "\n(") for c in conds], fontsize=7); a.set_title(t, fontsize=9); a.legend(fontsize=7)
axs[2].set_xlabel("fine-tuning step"); axs[2].set_ylabel("validation CIDEr (mean over seeds)"); axs[2].legend(fontsize=6)
plt.tight_layout(); plt.show()

# %% [markdown]
# ### Qualitative examples
#
# Four frames of test clips with the gold caption and the captions of four fine-tuned models (first seed).

# %%
#| slow
show_conds = [V_NONE, V_ASR, V_PL, V_BOTH]
n_show = 4
fig, axes = plt.subplots(n_show, 4, figsize=(9, 2.6 * n_show))
for row in range(n_show):
    for j, t in enumerate(np.linspace(0, clip_frames - 1, 4).round().astype(int)):
        axes[row, j].imshow(data.gold_test[row, t].permute(1, 2, 0).numpy()); axes[row, j].axis("off")
        axes[row, j].set_title(f"frame {t}", fontsize=7)
    lines = [f"gold: {data.gold_test_captions[row]}"] + [f"{c}: {R[(c, run_seeds[0])]['hyps'][row]}" for c in show_conds]
    axes[row, 0].text(0, -0.15, "\n".join(lines), transform=axes[row, 0].transAxes, va="top", fontsize=7)
plt.tight_layout(); plt.show()


# %% [markdown]
# ## Claim check
#
# The ledger rows below are judged by `moebook.evidence.judge` from this run's variables; nothing is typed in.
# Claim 2's control is the single source with the higher mean **validation** CIDEr, so the test comparison is
# not against the maximum of two noisy test scores. Every claim carries the trivial baselines, the none and
# matched-ASR models (marked when they collapse to one caption) and the measured preconditions.

# %%
#| slow
def model_baseline(v: str) -> tuple[str, float]:
    tag = f"; collapses to one caption in {collapsed[v]}/{n_seeds} seeds" if collapsed[v] else ""
    return f"{v} (mean over seeds{tag})", float(test_cider[v].mean())
baselines = dict(model_baseline(v) for v in (V_NONE, V_MATCHED, V_ASR) if v in CONDITIONS) | trivial["test"]

def pl_asr_val_gain(val: dict) -> float: return float(np.mean(np.asarray(val[V_PL]) - np.asarray(val[V_ASR])))
shrink_params = {k: globals()[k] for k in FULL_SIZE}
if shrink_params == FULL_SIZE: shrink_ratio, shrink_src = 1.0, "this run is the full size"
elif (root / FULL_SIZE_RECORD).exists():
    full = json.loads((root / FULL_SIZE_RECORD).read_text())
    if any(full["run_kw"].get(k) != v for k, v in FULL_SIZE.items()): raise ValueError(f"{FULL_SIZE_RECORD} was not made at {FULL_SIZE}")
    ref_gain = pl_asr_val_gain(full["val_cider"])
    shrink_ratio = pl_asr_val_gain(val_cider) / ref_gain if ref_gain > 0 else float("nan")  # no full-size effect: nothing to survive
    shrink_src = f"{FULL_SIZE_RECORD}: {len(full['seeds'])} seeds, commit {full['commit'][:10]}, dirty {full['dirty']}"
else: shrink_ratio, shrink_src = float("nan"), f"{FULL_SIZE_RECORD} is missing"
print(f"pseudolabel - ASR validation gain here / at full size: {shrink_ratio:.3f} ({shrink_src})")

def plateau_pre(*vs) -> Precondition:
    return Precondition(f"fine-tuned to a plateau: mean validation CIDEr gain over the last {eval_every} steps ({', '.join(vs)})",
                        float(np.nanmean(np.concatenate([plateau[v] for v in vs]))), "<=", MAX_PLATEAU_GAIN)
pre_ic = Precondition("image captioner CIDEr on held-out images", ic_scores["CIDEr"], ">=", MIN_IMAGE_CIDER)
pre_g = Precondition("pseudolabel grounding (fraction of the event's object words named)", g["pseudolabels"], ">=", MIN_GROUNDING)
pre_shrink = Precondition("the pseudolabel - ASR effect survives the shrink: validation gain here / at full size", shrink_ratio, ">=", MIN_SHRINK_RATIO)

items = {v: np.mean([R[(v, s)]["test_cider_items"] for s in run_seeds], 0) for v in CONDITIONS}
claims = [
    CLAIMS["1"].with_estimate(paired_t(test_cider[V_PL], test_cider[V_ASR])),
    CLAIMS["2"].with_estimate(paired_t(test_cider[V_BOTH], test_cider[best_single])),
]
claims[0] = dataclasses.replace(claims[0], baselines=baselines, preconditions=[pre_ic, pre_g, plateau_pre(V_PL, V_ASR), pre_shrink])
claims[1] = dataclasses.replace(claims[1], control=f"{best_single} (best single source on validation)",
                                baselines=baselines | {f"{v} (mean over seeds)": float(test_cider[v].mean()) for v in (V_PL, V_IMG)},
                                preconditions=[pre_ic, pre_g, plateau_pre(V_BOTH, best_single)])
if n_gold_test >= 100:  # the bootstrap's coverage is only trusted from 100 items (moebook.evidence.MIN_N)
    claims.append(dataclasses.replace(CLAIMS["1b"].with_estimate(paired_bootstrap(items[V_PL], items[V_ASR], seed=seed)),
                                      baselines=baselines, preconditions=claims[0].preconditions))
if prefix_ablation:
    claims.append(dataclasses.replace(CLAIMS["3"].with_estimate(paired_t(test_cider[V_BOTH], test_cider[V_PREFIX])),
                                      baselines=baselines, preconditions=[pre_ic, plateau_pre(V_BOTH, V_PREFIX)]))
params = {k: globals()[k] for k in ("seed", "n_seeds", "workers", "image_size", "clip_frames", "clips_per_video", "n_images", "n_pretrain_videos",
                                    "n_gold_train", "n_gold_val", "n_gold_test", "d_model", "d_visual", "lm_steps", "image_captioner_steps",
                                    "pretrain_steps", "finetune_steps", "eval_every", "batch_size", "lr", "gate_lr_mult", "prefix_ablation", "matched_baseline", "retrain",
                                    "evidence_runs")} | {"evidence_runs_commit": sealed["commit"] if sealed else None}
record_metrics(test_cider={v: c.tolist() for v, c in test_cider.items()}, val_cider={v: c.tolist() for v, c in val_cider.items()},
               trivial_baselines=trivial, diversity={v: {k: float(np.mean([d[k] for d in div[v]])) for k in div[v][0]} for v in CONDITIONS},
               collapsed_seeds=collapsed, gates=gates, plateau_gain={v: float(np.nanmean(p)) for v, p in plateau.items()},
               grounding=g, image_captioner=ic_scores, best_single_on_val=best_single, shrink_ratio=shrink_ratio, components_loaded=bool(loaded))
records = show_claims(claims, setting=setting, seeds=run_seeds, params=params, device=str(dev), **clock.fields())
for r in records: print(f"claim {r['id']}: {r['verdict']} - {r['reason']}")

# %%
#| slow
forest_plot(records); plt.tight_layout(); plt.show()
