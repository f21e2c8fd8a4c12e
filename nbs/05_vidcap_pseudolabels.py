# %% [markdown]
# # Video captioning from image pseudolabels
#
# > A TimeSformer + frozen OPT video captioner with Flamingo-style gated adapters, pre-trained on image-captioner pseudolabels instead of ASR-like narration, in a small synthetic world.

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
# from an image captioner trained here. Five pre-training conditions with the same budget are then fine-tuned on
# the gold set and scored on a held-out gold test set with CIDEr, BLEU-4 and ROUGE-L.

# %%
#| default_exp vidcap

# %%
#| export
from __future__ import annotations
import copy, hashlib, json, re
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM,
                          TimesformerConfig, TimesformerModel)
from transformers.utils import logging as hf_logging
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from moebook.core import progress as progress_bar

hf_logging.set_verbosity_error()  # tiny configs trigger harmless "not initialised from a checkpoint" notes

# %%
import time
import moebook
from pathlib import Path
from fastcore.test import test_eq, test_fail, test_close
import matplotlib.pyplot as plt
from moebook.core import seed_everything, record_metrics, pick_device, atomic_write_text

# %% tags=["parameters"]
seed: int = 0  # seed for data generation, the text LM and the image captioner; video runs use seed, seed+1, ...
n_seeds: int = 1  # number of training seeds for the video captioner conditions (mean and spread reported)
image_size: int = 32  # frame height and width in pixels
clip_frames: int = 8  # frames per clip (the TimeSformer's num_frames)
clips_per_video: int = 2  # pre-training videos have clip_frames * clips_per_video frames, cut into clips
n_images: int = 2000  # captioned still images (image captioner and the "images" condition)
n_pretrain_videos: int = 400  # unlabelled pre-training videos (each gives clips_per_video clips)
n_gold_train: int = 160  # gold-captioned clips for fine-tuning
n_gold_test: int = 200  # held-out gold-captioned clips for evaluation
d_model: int = 64  # width of every model (LMs, encoders, adapters)
lm_steps: int = 300  # steps pre-training the OPT LM on caption text (then frozen)
image_captioner_steps: int = 600  # steps training the image captioner
pretrain_steps: int = 300  # video-captioner pre-training steps, identical for every condition
finetune_steps: int = 200  # fine-tuning steps on the gold set
batch_size: int = 32  # examples per optimizer step
lr: float = 2e-3  # AdamW learning rate for every trained module
gate_lr_mult: float = 10.0  # the adapters' tanh gates learn this many times faster (they start at 0)
prefix_ablation: bool = True  # also train the projected-visual-prefix captioner (images + videos condition)
cache_dir: str = ""  # if set, each finished run's scores are saved there atomically and reused on resume
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
# fine-tuning and testing. Frames are `uint8`, videos are `(N, T, 3, H, W)`.

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
                   ) -> WorldData:
    "Generate the images, pre-training videos and gold clips deterministically."
    for name, v in dict(n_images=n_images, n_videos=n_videos, n_gold_train=n_gold_train, n_gold_test=n_gold_test,
                        clip_frames=clip_frames, clips_per_video=clips_per_video, size=size).items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1: raise ValueError(f"{name} must be a positive int, got {v!r}")
    if clip_frames < 4: raise ValueError(f"clip_frames must be >= 4 so events unfold over time, got {clip_frames}")
    if size < 16 or size % 8: raise ValueError(f"size must be a multiple of 8 and >= 16, got {size}")
    rngs = [np.random.default_rng([seed, k]) for k in range(5)]  # one stream per set: sizes don't interact
    scenes = [_random_scene(rngs[0], size, int(rngs[0].integers(1, 3))) for _ in range(n_images)]
    images = torch.from_numpy(np.stack([render_frame(s, size) for s in scenes]))
    videos, vevents = _clips(rngs[1], n_videos, clips_per_video, clip_frames, size)
    asr = [[asr_caption(e, rngs[2]) for e in evs] for evs in vevents]
    gtr, gtr_ev = _clips(rngs[3], n_gold_train, 1, clip_frames, size)
    gte, gte_ev = _clips(rngs[4], n_gold_test, 1, clip_frames, size)
    gtr_ev, gte_ev = [e[0] for e in gtr_ev], [e[0] for e in gte_ev]
    return WorldData(images, [image_caption(s, size) for s in scenes], videos, vevents, asr,
                     gtr, [gold_caption(e) for e in gtr_ev], gtr_ev, gte, [gold_caption(e) for e in gte_ev], gte_ev,
                     meta=dict(seed=seed, size=size, clip_frames=clip_frames, clips_per_video=clips_per_video))


# %%
_d1 = make_world_data(7, 6, 3, 2, 2, clip_frames=8, clips_per_video=2, size=32)
_d2 = make_world_data(7, 6, 3, 2, 2, clip_frames=8, clips_per_video=2, size=32)
test_eq(_d1.videos.shape, (3, 16, 3, 32, 32)); test_eq(_d1.gold_test.shape, (2, 8, 3, 32, 32))
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
# CIDEr, BLEU-4 and ROUGE-L from `pycocoevalcap`, fed with our own tokenisation (the COCO PTB tokenizer needs
# Java). Scores are on the usual scales: BLEU and ROUGE-L in [0, 1], CIDEr(-D) up to 10.

# %%
#| export
def caption_scores(references: list[list[str]] | list[str], # per sample: one reference or a list of them
                   hypotheses: list[str], # one generated caption per sample
                  ) -> dict[str, float]: # CIDEr, BLEU-4, ROUGE-L
    "Corpus-level captioning metrics (pycocoevalcap scorers, `simple_tokenize` tokenisation)."
    if len(references) != len(hypotheses) or not hypotheses:
        raise ValueError(f"need one hypothesis per reference set, got {len(hypotheses)} hypotheses for {len(references)} samples")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    gts = {i: [" ".join(simple_tokenize(r)) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [" ".join(simple_tokenize(h))] for i, h in enumerate(hypotheses)}
    cider, _ = Cider().compute_score(gts, res)
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, _ = Rouge().compute_score(gts, res)
    return {"CIDEr": float(cider), "BLEU-4": float(bleu[3]), "ROUGE-L": float(rouge)}


# %%
_refs = ["a red square moves left", "a blue circle turns green", "a yellow cross hits a red triangle"]
_s = caption_scores(_refs, _refs)
test_close(_s["BLEU-4"], 1.0, eps=1e-6); test_close(_s["ROUGE-L"], 1.0, eps=1e-6); test_close(_s["CIDEr"], 10.0, eps=1e-6)
_bad = caption_scores(_refs, ["do not forget to like and subscribe"] * 3)
assert _bad["BLEU-4"] < 1e-3 and _bad["CIDEr"] < 1e-3 and _bad["ROUGE-L"] < 0.2
_half = caption_scores(_refs, ["a red square moves right", "a blue circle turns red", "a yellow cross hits a red circle"])
assert 0 < _half["CIDEr"] < 10 and 0 < _half["BLEU-4"] < 1
test_fail(lambda: caption_scores(_refs, _refs[:2]), contains="one hypothesis per reference")


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
    for _ in progress_bar(range(steps), enabled=show_progress, leave=False):
        loss = 0.0
        for pool, n in zip(pools, shares):
            x, ids = pool.batch(torch.randint(len(pool.ids), (n,), generator=generator), device)
            loss = loss + model.loss(x, ids) * (n / batch_size)
        opt.zero_grad(); loss.backward(); nn.utils.clip_grad_norm_(params, 1.0); opt.step()
        losses.append(loss.item())
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
test_eq(len(caption_videos(_vc, _d1.gold_test, _vocab)), 2)
test_fail(lambda: Pool(_d1.images, _vocab.encode(_d1.image_captions[:2], 12)), contains="as many captions")

# %% [markdown]
# ## Experiment
#
# Steps: (1) generate the world; (2) pre-train the OPT LM on caption text (gold-style event captions from a
# separate text-only sample, image captions and narration) and freeze it; (3) train the image captioner on
# still images; (4) pseudolabel the pre-training videos; (5) for every condition and seed, pre-train the video
# captioner for `pretrain_steps` steps, fine-tune it `finetune_steps` steps on the gold set and score it on the
# gold test set.

# %%
#| slow
for _name, _v in dict(seed=seed, n_seeds=n_seeds, pretrain_steps=pretrain_steps, finetune_steps=finetune_steps,
                      batch_size=batch_size, d_model=d_model, lm_steps=lm_steps, image_captioner_steps=image_captioner_steps).items():
    if not isinstance(_v, int) or isinstance(_v, bool) or _v < (0 if _name in ("seed",) or _name.endswith("steps") else 1):
        raise ValueError(f"parameter {_name} must be a non-negative int (positive for sizes), got {_v!r}")
if d_model % 4: raise ValueError(f"d_model must be divisible by 4 (attention heads), got {d_model}")
if not lr > 0: raise ValueError(f"lr must be positive, got {lr}")
dev = pick_device(device)
show = progress
t_start = time.time()
seed_everything(seed)
data = make_world_data(seed, n_images, n_pretrain_videos, n_gold_train, n_gold_test, clip_frames, clips_per_video, image_size)
vocab = CaptionVocab()
MAX_LEN = 24  # longest narration (two phrases) + <bos> + <eos>
print(f"device {dev}; vocab {len(vocab)} words; images {tuple(data.images.shape)}, pre-training videos "
      f"{tuple(data.videos.shape)}, gold train {tuple(data.gold_train.shape)}, gold test {tuple(data.gold_test.shape)}")

# %% [markdown]
# The manifest records what was generated; sets whose sizes match `data/vidcap_manifest.json` must match it
# exactly.

# %%
#| slow
manifest = world_manifest(data)
manifest_path = Path(moebook.__file__).resolve().parent.parent / "data" / "vidcap_manifest.json"
saved = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
if saved and saved["parameters"] == manifest["parameters"] and saved["sets"].keys() == manifest["sets"].keys():
    for name, v in manifest["sets"].items():
        if v["shape"] == saved["sets"][name]["shape"] and v != saved["sets"][name]:
            raise RuntimeError(f"{name} differs from {manifest_path}: data generation is no longer deterministic/unchanged")
    print(f"checked against {manifest_path.name}: every set of the same size matches")
for name, v in manifest["sets"].items(): print(f"{name:16s} {v}")

# %%
#| slow
clip_events = [e for evs in data.video_events for e in evs]
clip_asr = [a for asr in data.video_asr for a in asr]
g_asr = float(np.mean([grounding(a, e) for a, e in zip(clip_asr, clip_events)]))
g_gold = float(np.mean([grounding(c, e) for c, e in zip(data.gold_train_captions, data.gold_train_events)]))
print(f"grounding (fraction of the event's object words named): gold {g_gold:.2f}, ASR-like {g_asr:.2f}")
for e, a in list(zip(clip_events, clip_asr))[:3]: print(f"  event: {gold_caption(e):35s} | ASR-like: {a}")


# %% [markdown]
# ### The frozen language model
#
# OPT learns the language of the world (event captions, image captions, narration) from text alone and is
# then frozen for every video captioner. The event captions come from a fresh text-only sample of events, not
# from the gold sets.

# %%
#| slow
def _text_corpus(n: int, rng: np.random.Generator) -> list[str]:
    out = []
    for _ in range(n):
        scene = _random_scene(rng, image_size, int(rng.integers(1, 3)))
        _, ev, _ = simulate_clip(scene, rng, 4, image_size)  # tiny render: only the event text is kept
        out.append(gold_caption(ev))
    return out
text = _text_corpus(n_images, np.random.default_rng([seed, 99])) + data.image_captions + clip_asr
text_ids = vocab.encode(text, MAX_LEN)
seed_everything(seed)
lm = make_text_lm(len(vocab), d_model, 2, 4, MAX_LEN + clip_frames).to(dev)
class _TextOnly(nn.Module):
    "Text LM loss at a random position offset, so captions after a visual prefix sit at trained positions."
    def __init__(self, lm, max_offset): super().__init__(); self.lm, self.max_offset = lm, max_offset
    def loss(self, _x, ids):
        pos = torch.arange(ids.shape[1], device=ids.device) + int(torch.randint(0, self.max_offset + 1, ()))
        return self.lm(input_ids=ids, position_ids=pos.expand_as(ids), labels=ids.masked_fill(ids == PAD, -100)).loss
lm_losses = train_captioner(_TextOnly(lm, clip_frames), [Pool(text_ids, text_ids)], lm_steps, batch_size, lr,
                            torch.Generator().manual_seed(seed), dev, show)
lm.eval().requires_grad_(False)
print(f"[{time.time() - t_start:.0f}s] LM loss: first {lm_losses[0]:.2f}, last 20 mean {np.mean(lm_losses[-20:]):.2f}")

# %% [markdown]
# ### The image captioner and the pseudolabels

# %%
#| slow
seed_everything(seed)
img_cap = ImageCaptioner(len(vocab), image_size, d_model, 2, 4, MAX_LEN).to(dev)
n_val = max(1, n_images // 10)  # last 10% of the images are held out to score the captioner
img_pool = Pool(data.images[:-n_val], vocab.encode(data.image_captions[:-n_val], MAX_LEN))
ic_losses = train_captioner(img_cap, [img_pool], image_captioner_steps, batch_size, lr,
                            torch.Generator().manual_seed(seed), dev, show)
img_cap.eval()
val_caps = [vocab.decode(r) for r in img_cap.generate(to_float(data.images[-n_val:]).to(dev)).cpu()]
ic_scores = caption_scores(data.image_captions[-n_val:], val_caps)
print(f"[{time.time() - t_start:.0f}s] image captioner on {n_val} held-out images: " + ", ".join(f"{k} {v:.3f}" for k, v in ic_scores.items()))

pl_clips, pl_captions, _ = pseudolabel_videos(data.videos, img_cap, vocab, clip_frames)
g_pseudo = float(np.mean([grounding(c, e) for c, e in zip(pl_captions, clip_events)]))
print(f"{len(pl_captions)} pseudolabelled clips; grounding: gold {g_gold:.2f}, pseudolabels {g_pseudo:.2f}, ASR-like {g_asr:.2f}")
for e, p, a in list(zip(clip_events, pl_captions, clip_asr))[:4]:
    print(f"  true: {gold_caption(e):33s} | pseudolabel: {p:30s} | ASR-like: {a}")

# %% [markdown]
# ### Pre-training conditions, fine-tuning and evaluation
#
# Every condition gets the same `pretrain_steps` x `batch_size` examples (except *none*), then the same
# fine-tuning on the gold set. All conditions of a seed start from identical initial weights (the seed is reset
# before each model is built), so differences come from the pre-training data alone.

# %%
#| slow
asr_ids, pl_ids = vocab.encode(clip_asr, MAX_LEN), vocab.encode(pl_captions, MAX_LEN)
image_pool = Pool(data.images, vocab.encode(data.image_captions, MAX_LEN), repeat_frames=clip_frames)
conditions = {
    "none": [],
    "ASR-like captions": [Pool(pl_clips, asr_ids)],
    "video pseudolabels": [Pool(pl_clips, pl_ids)],
    "images only": [image_pool],
    "images + videos": [image_pool, Pool(pl_clips, pl_ids)],
}
gold_pool = Pool(data.gold_train, vocab.encode(data.gold_train_captions, MAX_LEN))
runs = [(c, "xattn") for c in conditions] + ([("images + videos", "prefix")] if prefix_ablation else [])
run_seeds = [seed + k for k in range(n_seeds)]
cache = Path(cache_dir) if cache_dir else None
results, examples = {}, {}

def run_condition(cond: str, mode: str, s: int) -> dict:
    seed_everything(s)
    model = VideoCaptioner(lm, clip_frames, image_size, 8, d_model, 2, 4, 4, mode=mode).to(dev)
    gen = torch.Generator().manual_seed(s)
    pre = train_captioner(model, conditions[cond], pretrain_steps if conditions[cond] else 0, batch_size, lr, gen, dev, show, gate_lr_mult)
    ft = train_captioner(model, [gold_pool], finetune_steps, batch_size, lr, gen, dev, show, gate_lr_mult)
    hyps = caption_videos(model, data.gold_test, vocab)
    gates = [float(torch.tanh(a.attn_gate.detach())) for a in model.adapters]
    return {"scores": caption_scores(data.gold_test_captions, hyps), "hyps": hyps, "gates": gates,
            "pretrain_loss": float(np.mean(pre[-20:])) if pre else None, "finetune_loss": float(np.mean(ft[-20:]))}

for cond, mode in progress_bar(runs, enabled=show, desc="conditions"):
    for s in run_seeds:
        key = f"{cond}|{mode}|{s}"
        path = cache / (hashlib.sha256(json.dumps([key, manifest["sets"], pretrain_steps, finetune_steps, batch_size,
                                                   lr, d_model, lm_steps, image_captioner_steps]).encode()).hexdigest()[:16] + ".json") if cache else None
        if path is not None and path.exists(): r = json.loads(path.read_text())
        else:
            r = run_condition(cond, mode, s)
            if path is not None: atomic_write_text(path, json.dumps(r))
        results[key] = r
        print(f"[{time.time() - t_start:.0f}s] {cond:20s} {mode:6s} seed {s}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["scores"].items())
              + f" | gates tanh(a1) {[round(g, 3) for g in r['gates']]}")
print(f"total time so far {time.time() - t_start:.0f}s")


# %%
#| slow
def summary(cond: str, mode: str = "xattn", metric: str = "CIDEr") -> tuple[float, float]:
    v = [results[f"{cond}|{mode}|{s}"]["scores"][metric] for s in run_seeds]
    return float(np.mean(v)), float(np.std(v))

rows = [(c, m) for c, m in runs]
print(f"{'pre-training':22s} {'model':7s} " + "  ".join(f"{k:>14s}" for k in ("CIDEr", "BLEU-4", "ROUGE-L")))
for c, m in rows:
    print(f"{c:22s} {m:7s} " + "  ".join(f"{summary(c, m, k)[0]:8.3f} ± {summary(c, m, k)[1]:.3f}" for k in ("CIDEr", "BLEU-4", "ROUGE-L")))

fig, ax = plt.subplots(figsize=(8, 3.2))
labels = [c if m == "xattn" else f"{c}\n(prefix)" for c, m in rows]
means, stds = zip(*[summary(c, m) for c, m in rows])
ax.bar(range(len(rows)), means, yerr=stds, color=["grey", "tab:red", "tab:blue", "tab:green", "tab:purple", "tab:olive"][:len(rows)])
ax.set_xticks(range(len(rows)), labels, fontsize=8); ax.set_ylabel("CIDEr (gold test)")
ax.set_title(f"Fine-tuned on {n_gold_train} gold clips; mean ± std over {n_seeds} seed(s)")
plt.tight_layout(); plt.show()

# %% [markdown]
# ### Qualitative examples
#
# Four frames of test clips with the gold caption and the captions of three fine-tuned models (first seed).

# %%
#| slow
show_conds = [("none", "xattn"), ("ASR-like captions", "xattn"), ("video pseudolabels", "xattn"), ("images + videos", "xattn")]
n_show = 4
fig, axes = plt.subplots(n_show, 4, figsize=(9, 2.6 * n_show))
for row in range(n_show):
    for j, t in enumerate(np.linspace(0, clip_frames - 1, 4).round().astype(int)):
        axes[row, j].imshow(data.gold_test[row, t].permute(1, 2, 0).numpy()); axes[row, j].axis("off")
        axes[row, j].set_title(f"frame {t}", fontsize=7)
    lines = [f"gold: {data.gold_test_captions[row]}"] + [f"{c}: {results[f'{c}|{m}|{run_seeds[0]}']['hyps'][row]}" for c, m in show_conds]
    axes[row, 0].text(0, -0.15, "\n".join(lines), transform=axes[row, 0].transAxes, va="top", fontsize=7)
plt.tight_layout(); plt.show()

# %% [markdown]
# ## Claim check
#
# The table is computed by the cell below from this run's variables: the committed outputs are the default
# setting, which takes about 5 minutes on an idle 2-core CPU. With one seed a verdict only says which way the
# difference went; with `n_seeds` ≥ 2 the cell reports means ± spread and calls a claim supported only when
# the difference exceeds twice the spread.
#
# One seed is not enough here, and we measured how much it misleads: `moebook run
# nbs/05_vidcap_pseudolabels.ipynb -p n_seeds 3` (17 minutes; its `metrics.json` is kept as
# `data/results/vidcap_n_seeds3_metrics.json`) gave CIDEr pseudolabels 2.38 ± 0.31 vs ASR-like 1.27 ± 0.23
# (supported), images + videos 2.72 ± 0.05 vs images only 2.04 ± 0.83 and videos only 2.38 ± 0.31
# (+0.34 over the best single source: **inconclusive**, not "not supported" as seed 0 alone says), and
# cross-attention adapters 2.72 ± 0.05 vs projected prefix 1.09 ± 0.12 (supported). Pre-training on images
# alone is the unstable condition: CIDEr 2.83, 0.90 and 2.39 for seeds 0, 1, 2.

# %%
#| slow
asr_m, asr_s = summary("ASR-like captions"); pl_m, pl_s = summary("video pseudolabels")
img_m, img_s = summary("images only"); both_m, both_s = summary("images + videos"); none_m, none_s = summary("none")
best_single = max(pl_m, img_m)

def verdict(diff: float, spread: float) -> str:
    if n_seeds < 2: return "supported (1 seed)" if diff > 0 else "not supported (1 seed)"
    return "supported" if diff > 2 * spread else ("not supported" if diff < -2 * spread else "inconclusive")

claims = [
    ("Pseudolabels pre-train better than ASR-like text", f"CIDEr pseudolabels {pl_m:.3f}±{pl_s:.3f} vs ASR-like {asr_m:.3f}±{asr_s:.3f}",
     verdict(pl_m - asr_m, max(pl_s, asr_s))),
    ("Images + videos beat either alone (paper: +4 CIDEr on MSR-VTT)",
     f"CIDEr images+videos {both_m:.3f}±{both_s:.3f} vs best single {best_single:.3f} (images {img_m:.3f}, videos {pl_m:.3f}): {both_m - best_single:+.3f}",
     verdict(both_m - best_single, max(both_s, pl_s, img_s))),
    ("ASR text is poorly grounded (motivation)", f"grounding ASR-like {g_asr:.2f} vs pseudolabels {g_pseudo:.2f} vs gold {g_gold:.2f}",
     "supported (by construction)" if g_asr < g_pseudo else "not supported"),
]
if prefix_ablation:
    pre_m, pre_s = summary("images + videos", "prefix")
    claims.append(("(ablation) gated cross-attention adapters vs projected prefix", f"CIDEr xattn {both_m:.3f}±{both_s:.3f} vs prefix {pre_m:.3f}±{pre_s:.3f}",
                   verdict(both_m - pre_m, max(both_s, pre_s))))
print("| claim | our measurement | verdict |\n|---|---|---|")
for c, m, v in claims: print(f"| {c} | {m} | {v} |")
print(f"\nScale: {image_size}x{image_size} synthetic clips of {clip_frames} frames, {len(pl_captions)} pre-training clips, "
      f"{n_images} images, {n_gold_train} gold fine-tuning clips, {n_gold_test} test clips, d_model={d_model}, "
      f"{pretrain_steps}+{finetune_steps} steps, {n_seeds} seed(s); no-pre-training baseline CIDEr {none_m:.3f}±{none_s:.3f}. "
      "A toy world with a closed vocabulary, not MSR-VTT: the numbers test the mechanism, not the paper's magnitudes.")
record_metrics(cider=({f"{c}|{m}": summary(c, m)[0] for c, m in runs}), cider_std=({f"{c}|{m}": summary(c, m)[1] for c, m in runs}),
               bleu4=({f"{c}|{m}": summary(c, m, "BLEU-4")[0] for c, m in runs}), rougeL=({f"{c}|{m}": summary(c, m, "ROUGE-L")[0] for c, m in runs}),
               grounding_gold=g_gold, grounding_asr=g_asr, grounding_pseudolabels=g_pseudo, image_captioner=ic_scores,
               claims={c: v for c, _, v in claims}, wall_s=time.time() - t_start)
