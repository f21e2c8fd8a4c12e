# %% [markdown]
# # mTTI: translation-enhanced multilingual text-to-image generation (EnsAd)
#
# > A small-scale reproduction of Li et al. (ACL 2023): a frozen multilingual text encoder and a frozen
# > diffusion generator, an Ensemble Adapter that weighs a caption and its machine translations, and the
# > three cross-lingual baselines, on a generated world of coloured shapes.

# %% [markdown]
# **Paper.** Li, Chang, Rawls, Vulić, Korhonen, *Translation-Enhanced Multilingual Text-to-Image Generation*
# (ACL 2023, arXiv 2305.19216). Image–caption data is mostly English; how should a text-to-image model serve
# prompts in other languages? The paper compares three cross-lingual baselines built on a multilingual
# text encoder (multilingual CLIP conditioning the LAFITE GAN):
#
# - **Translate Train**: machine-translate the English training captions into the target language and train on them;
# - **Translate Test**: machine-translate the target-language prompt into English and use the English model;
# - **Zero-Shot Transfer**: train on English only and feed target-language text straight into the multilingual encoder;
#
# and proposes the **Ensemble Adapter (EnsAd)**: encode the source prompt and *N* machine translations of it,
# weigh them with attention, consolidate them through a small residual adapter into one conditioning vector,
# and train only the adapter (encoder and generator frozen) with the generator's own loss.
#
# **Our stand-ins.** Everything is built and trained here, nothing is downloaded: scenes of coloured shapes
# rendered as 16x16 RGB images, captions in English, German, Spanish and Russian written from the scene by
# per-language lexicons and grammar templates, three simulated MT systems with documented error profiles,
# a tiny BERT text encoder trained CLIP-style against a small CNN (our "multilingual CLIP"), a small
# `diffusers` `UNet2DConditionModel` trained with `DDPMScheduler` and sampled with `DDIMScheduler`, and a
# committed evaluation network trained here on images disjoint from the generator's (our "Inception"): its
# all-five-attribute accuracy is the primary metric, and `torchmetrics`' Fréchet distance on its normalised
# features the secondary one.
#
# **Calibration (before the claims were fixed).** With the encoder seeing the non-English captions of 1 % of
# the training images (`encoder_multilingual_fraction`), one seed-0 pilot on the validation prompts gave
# all-five accuracy 0.15 for English prompts, 0.00 for random prompts and 0.05 for zero-shot (0.33 of the gap
# closed); at 2 % zero-shot closed 0.71 of it (0.14 / 0.00 / 0.10), too close to the 80 % bound. That pilot
# also fixed `MIN_PROMPT_GAIN` below (the ceiling is only about 0.15 at this budget).

# %%
#| default_exp mtti

# %%
#| export
from __future__ import annotations
import json, hashlib, math, zlib
from functools import lru_cache
from dataclasses import dataclass, field, asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from torchmetrics.image.fid import FrechetInceptionDistance
from transformers import BertConfig, BertModel, BertPreTrainedModel, PreTrainedTokenizerFast

from moebook.core import progress as progress_iter, seed_everything

# %%
import tempfile
from fastcore.test import test_eq, test_fail, test_close

# %% tags=["parameters"]
seed: int = 0  # seed of the data and the text encoder; the paired seeds (generator, Translate Train, adapters, noise) are seed, seed+1, ...
n_seeds: int = 3  # paired seeds; each retrains the generator, Translate Train and every adapter (at least 3)
workers: int = 3  # worker processes for the paired seeds (forked on CPU, one torch thread each; 1 on CUDA)
progress: bool = True  # show progress bars
device: str = "auto"  # 'auto' (CUDA if available), 'cpu' or 'cuda'
n_train: int = 3000  # generated training scenes (each has one caption per language)
n_val: int = 300  # validation prompts, a third per target language: the language-gap precondition and every choice
n_eval: int = 1002  # test prompts, a third per target language; every method generates one image per prompt and seed
n_reference: int = 1000  # real images for the Fréchet distance's reference statistics
n_floor_draws: int = 5  # independent draws of n_eval real images: the real-vs-real noise floor of the distance
encoder_steps: int = 150  # contrastive text/image encoder training steps
encoder_multilingual_fraction: float = 0.01  # share of training images whose non-English captions the encoder sees
generator_steps: int = 300  # diffusion generator training steps on English captions
translate_train_steps: int = 60  # fine-tuning steps of the Translate Train generator on translated captions
adapter_steps: int = 200  # training steps of each Ensemble Adapter
adapter_eval_every: int = 25  # the adapters' fixed validation loss is measured every this many steps (plateau check)
batch_size: int = 64  # batch size for generator and adapter training
sample_steps: int = 6  # DDIM steps at evaluation
guidance_scale: float = 2.0  # classifier-free guidance scale at evaluation
unet_channels: int = 32  # channels of both UNet levels
setting: str = "default"  # claim records' setting: "default" (these values), "evidence" (a bigger run) or "smoke"
cache_dir: str = ""  # if set, each finished seed is saved there and reused on resume

# %% [markdown]
# **Scale-up** (10 paired seeds, 3,000 test prompts, longer training; e.g. on a GPU; not timed here):
# `moebook run nbs/04_mtti_ensad.ipynb -p n_seeds 10 -p n_eval 3000 -p generator_steps 1000 -p adapter_steps 400 -p setting evidence -p device cuda`

# %% [markdown]
# ## The world: scenes and images
#
# A scene is five attributes: `count` shapes of one `shape`, `colour` and `size`, grouped in one half of the
# image (`position`). There are 4 x 3 x 3 x 2 x 4 = 288 distinct scenes. Rendering adds jitter (object
# placement, colour shade, background noise), so two images of one scene differ.

# %%
#| export
ATTRIBUTES: dict[str, tuple] = {
    "colour": ("red", "green", "blue", "yellow"),
    "shape": ("circle", "square", "triangle"),
    "count": (1, 2, 3),
    "size": ("small", "big"),
    "position": ("left", "right", "top", "bottom"),
}
IMAGE_SIZE = 16
_RGB = {"red": (0.85, 0.1, 0.1), "green": (0.1, 0.7, 0.15), "blue": (0.1, 0.2, 0.9), "yellow": (0.95, 0.85, 0.1)}
_SIDE = {"small": 3, "big": 5}  # object side length in pixels

def sample_scenes(n: int, # number of scenes
                  rng: np.random.Generator, # source of randomness
                 ) -> np.ndarray: # (n, 5) int attribute indices, columns in `ATTRIBUTES` order
    "Draw `n` scenes uniformly over all attribute combinations."
    if not isinstance(n, int) or n < 1: raise ValueError(f"n must be a positive int, got {n!r}")
    return np.stack([rng.integers(0, len(v), n) for v in ATTRIBUTES.values()], 1)

def scene_dict(row: Sequence[int]) -> dict:
    "Attribute names -> values of one scene row, e.g. `{'colour': 'red', 'count': 2, ...}`."
    if len(row) != len(ATTRIBUTES): raise ValueError(f"a scene row has {len(ATTRIBUTES)} entries, got {len(row)}")
    return {k: vals[int(i)] for (k, vals), i in zip(ATTRIBUTES.items(), row)}

def _shape_mask(shape: str, side: int, cy: float, cx: float) -> np.ndarray:
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    dy, dx, h = y - cy, x - cx, side / 2
    if shape == "circle": return dy**2 + dx**2 <= (0.9 * h) ** 2  # a plus at side 3, a rounded square at 5
    if shape == "square": return (np.abs(dy) <= h) & (np.abs(dx) <= h)
    return (np.abs(dy) <= h) & (np.abs(dx) <= (dy + h) / 2 + 0.25)  # triangle pointing up

def render_scene(row: Sequence[int], # one scene (attribute indices)
                 rng: np.random.Generator, # jitter source
                ) -> np.ndarray: # (3, 16, 16) float32 image in [0, 1]
    "Draw the scene: `count` shapes spread along the long axis of their half of the image."
    s = scene_dict(row)
    side, n = _SIDE[s["size"]], s["count"]
    img = 0.92 + 0.03 * rng.standard_normal((3, IMAGE_SIZE, IMAGE_SIZE))
    colour = np.clip(np.array(_RGB[s["colour"]]) + 0.05 * rng.standard_normal(3), 0, 1)
    half = IMAGE_SIZE / 2
    vertical = s["position"] in ("left", "right")  # the group is stacked along the half's long axis
    for k in range(n):
        along = (k + 0.5) * IMAGE_SIZE / n + rng.uniform(-0.5, 0.5) * max(IMAGE_SIZE / n - side, 0)
        across = half / 2 + rng.uniform(-1, 1) * max(half / 2 - side / 2 - 0.5, 0)
        if s["position"] in ("right", "bottom"): across += half
        cy, cx = (along, across) if vertical else (across, along)
        cy, cx = np.floor(cy) + 0.5, np.floor(cx) + 0.5  # odd sides: centre on a pixel so shapes are crisp
        img[:, _shape_mask(s["shape"], side, cy, cx)] = colour[:, None]
    return np.clip(img, 0, 1).astype(np.float32)


# %%
_rng = np.random.default_rng(0)
_rows = sample_scenes(5, _rng)
test_eq(_rows.shape, (5, 5))
test_eq(render_scene(_rows[0], np.random.default_rng(1)), render_scene(_rows[0], np.random.default_rng(1)))
_img = render_scene([0, 1, 2, 1, 0], _rng)  # three big red squares on the left
_red = (_img[0] > 0.6) & (_img[1] < 0.4)
test_eq(_red[:, 8:].any(), False); assert _red[:, :8].sum() >= 3 * 25 - 3
test_fail(lambda: scene_dict([0, 1]), contains="has 5 entries")

# %% [markdown]
# ## Captions in four languages
#
# Each language has a lexicon (one or more surface forms per attribute value, paraphrases included) and
# grammar templates. A form is either a string or a tuple of agreement forms picked by a per-language rule:
# English and Spanish inflect for number, German adjectives for number and the noun's gender, Russian for
# the count (after два/три the noun takes the genitive singular and adjectives the genitive plural).
# Word order differs too (Spanish puts colour and size after the noun). Every token that names exactly one
# attribute value is a *keyword*, which lets `parse_caption` read a caption back into its scene.

# %%
#| export
LANGUAGES = ("en", "de", "es", "ru")
LEXICONS: dict[str, dict[str, dict]] = {
    # English: the last form of each value is the rarer synonym the MT systems sometimes choose (EN_SYNONYMS)
    "en": {"colour": {"red": ["red", "crimson"], "green": ["green", "emerald"], "blue": ["blue", "navy"], "yellow": ["yellow", "golden"]},
           "shape": {"circle": [("circle", "circles"), ("ring", "rings")], "square": [("square", "squares"), ("box", "boxes")],
                     "triangle": [("triangle", "triangles"), ("wedge", "wedges")]},
           "count": {1: ["one", "a single", "a lone"], 2: ["two", "a pair of"], 3: ["three", "a trio of"]},
           "size": {"small": ["small", "little", "tiny"], "big": ["big", "large", "huge"]},
           "position": {"left": ["on the left", "in the left half", "to the west"], "right": ["on the right", "in the right half", "to the east"],
                        "top": ["at the top", "in the upper half", "to the north"], "bottom": ["at the bottom", "in the lower half", "to the south"]}},
    "de": {"colour": {"red": [("roter", "rotes", "rote")], "green": [("grüner", "grünes", "grüne")],
                      "blue": [("blauer", "blaues", "blaue")], "yellow": [("gelber", "gelbes", "gelbe")]},
           "shape": {"circle": [("Kreis", "Kreise")], "square": [("Quadrat", "Quadrate")], "triangle": [("Dreieck", "Dreiecke")]},
           "count": {1: ["ein"], 2: ["zwei"], 3: ["drei"]},
           "size": {"small": [("kleiner", "kleines", "kleine")], "big": [("großer", "großes", "große")]},
           "position": {"left": ["links", "auf der linken Seite"], "right": ["rechts", "auf der rechten Seite"],
                        "top": ["oben", "im oberen Teil"], "bottom": ["unten", "im unteren Teil"]}},
    "es": {"colour": {"red": [("rojo", "rojos")], "green": [("verde", "verdes")], "blue": [("azul", "azules")],
                      "yellow": [("amarillo", "amarillos")]},
           "shape": {"circle": [("círculo", "círculos")], "square": [("cuadrado", "cuadrados")], "triangle": [("triángulo", "triángulos")]},
           "count": {1: ["un"], 2: ["dos"], 3: ["tres"]},
           "size": {"small": [("pequeño", "pequeños"), ("chico", "chicos")], "big": [("grande", "grandes")]},
           "position": {"left": ["a la izquierda", "en la parte izquierda"], "right": ["a la derecha", "en la parte derecha"],
                        "top": ["arriba", "en la parte superior"], "bottom": ["abajo", "en la parte inferior"]}},
    "ru": {"colour": {"red": [("красный", "красных")], "green": [("зелёный", "зелёных")], "blue": [("синий", "синих")],
                      "yellow": [("жёлтый", "жёлтых")]},
           "shape": {"circle": [("круг", "круга")], "square": [("квадрат", "квадрата")], "triangle": [("треугольник", "треугольника")]},
           "count": {1: ["один"], 2: ["два"], 3: ["три"]},
           "size": {"small": [("маленький", "маленьких")], "big": [("большой", "больших")]},
           "position": {"left": ["слева", "в левой части"], "right": ["справа", "в правой части"],
                        "top": ["сверху", "в верхней части"], "bottom": ["снизу", "в нижней части"]}},
}
TEMPLATES: dict[str, tuple[str, ...]] = {
    "en": ("{count} {size} {colour} {shape} {position}", "{position} you can see {count} {size} {colour} {shape}",
           "an image of {count} {size} {colour} {shape} {position}"),
    "de": ("{count} {size} {colour} {shape} {position}", "{position} : {count} {size} {colour} {shape}",
           "im Bild {position} {count} {size} {colour} {shape}"),
    "es": ("{count} {shape} {colour} {size} {position}", "{position} hay {count} {shape} {size} {colour}",
           "una imagen con {count} {shape} {colour} {size} {position}"),
    "ru": ("{count} {size} {colour} {shape} {position}", "{position} {count} {size} {colour} {shape}",
           "на картинке {position} {count} {size} {colour} {shape}"),
}
_GENDER_DE = {"circle": 0, "square": 1, "triangle": 1}  # masculine / neuter

def _agreement(lang: str, attr: str, scene: dict) -> int:
    "Which entry of a tuple form this attribute takes in this scene."
    plural = scene["count"] > 1
    if lang == "de" and attr in ("colour", "size"): return 2 if plural else _GENDER_DE[scene["shape"]]
    return int(plural)

def check_language(lang: str) -> str:
    "Return `lang` if supported, else raise a `ValueError` naming the supported languages."
    if lang not in LANGUAGES: raise ValueError(f"unknown language {lang!r}; supported: {', '.join(LANGUAGES)}")
    return lang

def realise(scene: dict, # attribute -> value (see `scene_dict`)
            lang: str, # one of `LANGUAGES`
            rng: np.random.Generator, # picks the template and the paraphrase of each word
            omit: Sequence[str] = (), # attributes to leave out (used by the MT systems' word drops)
            words: dict | None = None, # attribute -> forced surface form (MT synonyms), overrides the lexicon
            template: int | None = None, # template index; random when None
           ) -> str:
    "Write a caption of `scene` in `lang` from its lexicon and grammar templates."
    lex, temps = LEXICONS[check_language(lang)], TEMPLATES[lang]
    t = temps[int(rng.integers(len(temps)))] if template is None else temps[template]
    slots = {}
    for attr in ATTRIBUTES:
        forms = lex[attr][scene[attr]]
        form = forms[int(rng.integers(len(forms)))]
        if words and attr in words: form = words[attr]
        slots[attr] = "" if attr in omit else (form[_agreement(lang, attr, scene)] if isinstance(form, tuple) else form)
    return " ".join(t.format(**slots).split())

@lru_cache(maxsize=None)
def _keywords(lang: str) -> dict[str, tuple[str, object]]:
    "Lower-cased tokens that name exactly one attribute value in `lang`."
    seen: dict[str, set] = {}
    entries = [(a, v, f) for a, vals in LEXICONS[lang].items() for v, forms in vals.items() for f in forms]
    for attr, value, form in entries:
        for variant in (form if isinstance(form, tuple) else (form,)):
            for tok in variant.lower().split(): seen.setdefault(tok, set()).add((attr, value))
    return {tok: next(iter(s)) for tok, s in seen.items() if len(s) == 1}

def parse_caption(text: str, # a caption
                  lang: str, # its language
                 ) -> dict: # attribute -> value for every attribute found (first keyword wins)
    "Read the scene attributes a caption mentions back from its keywords."
    kw, out = _keywords(check_language(lang)), {}
    for tok in text.lower().split():
        if tok in kw and kw[tok][0] not in out: out[kw[tok][0]] = kw[tok][1]
    return out


# %%
_rng = np.random.default_rng(0)
_scene = scene_dict([0, 0, 1, 0, 0])  # two small red circles on the left
test_eq(realise(_scene, "en", np.random.default_rng(1), template=0), "a pair of tiny red rings on the left")  # synonyms are English paraphrases
assert realise(_scene, "de", _rng, template=0).startswith("zwei kleine rote Kreise")  # agreement: plural
assert realise(_scene, "ru", _rng, template=0).startswith("два маленьких красных круга")  # paucal genitive
assert realise(scene_dict([2, 1, 0, 1, 2]), "de", _rng, template=0).startswith("ein großes blaues Quadrat")  # neuter
test_eq(realise(_scene, "en", _rng, template=0, omit=["size"]).split()[:2], ["two", "red"])
test_fail(lambda: realise(_scene, "fr", _rng), contains="unknown language 'fr'")
# every caption of every scene in every template parses back to its scene
for _lang in LANGUAGES:
    for _row in sample_scenes(60, _rng):
        for _t in range(len(TEMPLATES[_lang])):
            test_eq(parse_caption(realise(scene_dict(_row), _lang, _rng, template=_t), _lang), scene_dict(_row))

# %% [markdown]
# ## Simulated machine translation
#
# Each MT system reads the source caption (its keyword parser stands in for the NMT encoder), then makes
# errors with documented per-attribute probabilities before writing the target sentence:
#
# | error | what happens |
# |---|---|
# | `drop` | the attribute's word is left out of the translation |
# | `mistranslate` | the attribute gets a wrong value (e.g. *rot* -> "blue", *drei* -> "two") |
# | `synonym` | (into English only) the rarer English synonym ("crimson", "ring", "huge", "to the west"); since issue 16 these are English paraphrases too, so the encoder knows them (no `[UNK]`) |
# | `reorder` | per sentence: two adjacent words swap places |
#
# Drops and mistranslations are multiplied by a per-language difficulty (Russian is hardest). A system
# is deterministic: the same caption always gets the same translation (its random stream is seeded from
# the system name and the text), which is how real NMT behaves and what makes translations of one caption
# *disagree* across systems rather than across calls.

# %%
#| export
EN_SYNONYMS: dict[tuple[str, object], object] = {(a, v): forms[-1] for a, vals in LEXICONS["en"].items() for v, forms in vals.items()}
LANGUAGE_DIFFICULTY = {"en": 1.0, "de": 1.0, "es": 1.2, "ru": 1.6}  # multiplies drop and mistranslate rates

@dataclass(frozen=True)
class MTSystem:
    "A simulated MT system with a documented error profile (per-attribute / per-sentence probabilities)."
    name: str
    drop: float  # per attribute: word left out
    mistranslate: float  # per attribute: wrong value
    synonym: float  # per attribute, English target only: unusual synonym
    reorder: float  # per sentence: two adjacent words swapped

    def rates(self, src: str) -> dict[str, float]:
        "The error probabilities this system has when translating from `src`."
        d = LANGUAGE_DIFFICULTY[check_language(src)]
        return {"drop": round(min(self.drop * d, 1.0), 6), "mistranslate": round(min(self.mistranslate * d, 1.0), 6),
                "synonym": self.synonym, "reorder": self.reorder}

    def translate(self, text: str, # source caption
                  src: str, # its language
                  tgt: str = "en", # target language
                  return_errors: bool = False, # also return the list of `(error, attribute)` events
                 ):
        "Translate `text` from `src` into `tgt` with this system's errors (deterministic in the text)."
        if not isinstance(text, str): raise TypeError(f"text must be a str, got {type(text).__name__}")
        check_language(tgt); r = self.rates(src)
        rng = np.random.default_rng(zlib.crc32(f"{self.name}|{src}|{tgt}|{text}".encode()))
        scene, events, omit, words = parse_caption(text, src), [], [], {}
        for attr, values in ATTRIBUTES.items():
            if attr not in scene: scene[attr] = values[0]; omit.append(attr); continue  # nothing to translate
            u = rng.random(3)
            if u[0] < r["drop"]: omit.append(attr); events.append(("drop", attr)); continue
            if u[1] < r["mistranslate"]:
                wrong = [v for v in values if v != scene[attr]]
                scene[attr] = wrong[int(rng.integers(len(wrong)))]; events.append(("mistranslate", attr))
            if tgt == "en" and u[2] < r["synonym"]: words[attr] = EN_SYNONYMS[(attr, scene[attr])]; events.append(("synonym", attr))
        out = realise(scene, tgt, rng, omit=omit, words=words).split()
        if len(out) > 1 and rng.random() < r["reorder"]:
            i = int(rng.integers(len(out) - 1)); out[i], out[i + 1] = out[i + 1], out[i]; events.append(("reorder", None))
        out = " ".join(out)
        return (out, events) if return_errors else out

MT_SYSTEMS: tuple[MTSystem, ...] = (
    MTSystem("mt_a", drop=0.03, mistranslate=0.04, synonym=0.10, reorder=0.05),  # strong system, rare errors
    MTSystem("mt_b", drop=0.05, mistranslate=0.08, synonym=0.05, reorder=0.50),  # literal: word-order errors
    MTSystem("mt_c", drop=0.15, mistranslate=0.15, synonym=0.25, reorder=0.10),  # weak: drops, wrong attributes
)

# %%
_src = realise(_scene, "de", np.random.default_rng(0), template=0)
test_eq(MT_SYSTEMS[0].translate(_src, "de"), MT_SYSTEMS[0].translate(_src, "de"))  # deterministic
_perfect = MTSystem("perfect", 0, 0, 0, 0)
test_eq(parse_caption(_perfect.translate(_src, "de"), "en"), _scene)
test_eq(parse_caption(_perfect.translate(realise(_scene, "en", _rng), "en", tgt="ru"), "ru"), _scene)  # en -> ru
_t, _ev = MTSystem("syn", 0, 0, 1.0, 0).translate(_src, "de", return_errors=True)
test_eq(len(_ev), 5); assert "crimson" in _t and "rings" in _t
test_fail(lambda: MT_SYSTEMS[0].translate(_src, "xx"), contains="unknown language 'xx'")
test_close(MT_SYSTEMS[2].rates("ru")["drop"], 0.15 * 1.6)

# %% [markdown]
# ## The data set
#
# `make_dataset` draws scenes, renders them and writes one caption per language (random template and
# paraphrases); all randomness comes from one seed. `mt_error_rates` measures the error rates of the MT
# systems on a data set, independently of their own event logs: a dropped attribute is one the English
# parser cannot find in the translation, a mistranslation one it finds with the wrong value. Both go into
# the manifest (`data/mtti_manifest.json`, written by `write_manifest`).

# %%
#| export
GENERATOR_VERSION = "mtti-shapes-2"  # 2: the MT synonyms are English paraphrases (issue 16)

@dataclass
class CaptionedScenes:
    "Generated images with their scenes and one caption per language."
    images: torch.Tensor  # (n, 3, 16, 16) float in [0, 1]
    scenes: np.ndarray  # (n, 5) attribute indices
    captions: dict[str, list[str]]  # language -> n captions

    def __len__(self): return len(self.scenes)

def make_dataset(n: int, # number of scenes
                 seed: int, # data seed
                ) -> CaptionedScenes:
    "Deterministic captioned-image set: same `(n, seed)`, same bytes."
    rng = np.random.default_rng(seed)
    scenes = sample_scenes(n, rng)
    images = torch.from_numpy(np.stack([render_scene(s, rng) for s in scenes]))
    captions = {lang: [realise(scene_dict(s), lang, rng) for s in scenes] for lang in LANGUAGES}
    return CaptionedScenes(images, scenes, captions)

def mt_error_rates(data: CaptionedScenes, # captions to translate
                   system: MTSystem, # the MT system
                   src: str, # source language (into English)
                  ) -> dict[str, float]: # measured drop / mistranslate rates per attribute, reorder rate per sentence
    "Measure an MT system's error rates by parsing its English output against the true scenes."
    drops = wrong = reorders = 0
    for row, text in zip(data.scenes, data.captions[check_language(src)]):
        out, events = system.translate(text, src, return_errors=True)
        got, truth = parse_caption(out, "en"), scene_dict(row)
        drops += sum(a not in got for a in ATTRIBUTES)
        wrong += sum(a in got and got[a] != truth[a] for a in ATTRIBUTES)
        reorders += any(e == "reorder" for e, _ in events)
    n = len(data) * len(ATTRIBUTES)
    return {"drop": drops / n, "mistranslate": wrong / max(n - drops, 1), "reorder": reorders / len(data)}

def _sha256(b: bytes) -> str: return hashlib.sha256(b).hexdigest()

def dataset_manifest(n: int = 3000, # scenes
                     seed: int = 0, # data seed
                    ) -> dict:
    "Provenance, sizes, checksums and MT error rates (documented and measured) of `make_dataset(n, seed)`."
    data = make_dataset(n, seed)
    caps = {l: _sha256("\n".join(c).encode()) for l, c in data.captions.items()}
    vocab = {l: len({w for c in cs for w in c.lower().split()}) for l, cs in data.captions.items()}
    return {"generator_version": GENERATOR_VERSION, "seed": seed, "n_scenes": n, "image_shape": list(data.images.shape[1:]),
            "languages": list(LANGUAGES), "attributes": {k: list(v) for k, v in ATTRIBUTES.items()},
            "templates_per_language": {l: len(t) for l, t in TEMPLATES.items()}, "vocabulary_size": vocab,
            "sha256": {"images_uint8": _sha256((data.images * 255).round().to(torch.uint8).numpy().tobytes()),
                       "scenes": _sha256(data.scenes.astype(np.int64).tobytes()), "captions": caps},
            "mt_systems": {s.name: {"documented": {l: s.rates(l) for l in LANGUAGES if l != "en"},
                                    "measured": {l: {k: round(v, 4) for k, v in mt_error_rates(data, s, l).items()}
                                                 for l in LANGUAGES if l != "en"}} for s in MT_SYSTEMS}}

def write_manifest(path: str | Path, n: int = 3000, seed: int = 0) -> Path:
    "Write `dataset_manifest(n, seed)` as JSON to `path`."
    from moebook.core import atomic_write_text
    return atomic_write_text(path, json.dumps(dataset_manifest(n, seed), indent=1, ensure_ascii=False) + "\n")


# %%
_d = make_dataset(50, 3)
test_eq(_d.images.shape, (50, 3, 16, 16)); test_eq(len(_d.captions["ru"]), 50)
test_eq(make_dataset(50, 3).captions, _d.captions); assert torch.equal(make_dataset(50, 3).images, _d.images)
test_eq(mt_error_rates(_d, _perfect, "es"), {"drop": 0.0, "mistranslate": 0.0, "reorder": 0.0})

# %% [markdown]
# ## A multilingual text encoder trained CLIP-style
#
# The tokenizer is word-level over the training captions of all languages (lower-cased, split on spaces);
# words it never saw become `[UNK]` (`unk_rate` measures how often a set of texts hits one), like rare words for a real
# encoder. The text encoder is a 2-layer BERT built from a config; a caption embedding is the projected
# mean of its token states, L2-normalised. The image side is a small CNN. Training is CLIP's symmetric
# InfoNCE, with every pair showing the same scene counted as a positive (batches hold repeated scenes).
# The encoder sees English captions for every training image but non-English captions only for a fraction
# of them, mimicking a multilingual CLIP whose non-English side is weaker.

# %%
#| export
SPECIAL_TOKENS = ["[PAD]", "[UNK]"]

def build_tokenizer(texts: Sequence[str], # captions to take the vocabulary from
                   ) -> PreTrainedTokenizerFast:
    "A word-level `transformers` tokenizer over the words of `texts` (lower-cased)."
    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", model_max_length=32)

def unk_rate(tokenizer: PreTrainedTokenizerFast, # word-level tokenizer
             texts: Sequence[str], # captions or translations
            ) -> float: # share of texts with at least one [UNK] token
    "How often a text contains a word the tokenizer does not know."
    unk = tokenizer.unk_token_id
    return float(np.mean([unk in ids for ids in tokenizer(list(texts))["input_ids"]])) if len(texts) else 0.0

class CaptionEncoder(BertPreTrainedModel):
    "Tiny BERT + projection: captions -> L2-normalised embeddings of size `config.projection_dim`."
    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.proj = nn.Linear(config.hidden_size, config.projection_dim, bias=False)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        "(B, L) token ids and mask -> (B, projection_dim) unit vectors."
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize(self.proj((h * m).sum(1) / m.sum(1).clamp(min=1)), dim=-1)

def new_caption_encoder(vocab_size: int, dim: int = 64) -> CaptionEncoder:
    "A randomly initialised `CaptionEncoder` (2 layers, hidden 64, 4 heads)."
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=32, projection_dim=dim,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return CaptionEncoder(cfg)

class ImageEncoder(nn.Module):
    "Small CNN: (B, 3, 16, 16) images in [0, 1] -> (B, dim) features (`embed` normalises them)."
    def __init__(self, dim: int = 64, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
                                 nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
                                 nn.Flatten(), nn.Linear(2 * width * 16, dim))
    def forward(self, x: torch.Tensor) -> torch.Tensor: return self.net(x)
    def embed(self, x: torch.Tensor) -> torch.Tensor: return F.normalize(self(x), dim=-1)

def check_images(x: torch.Tensor, name: str = "images") -> torch.Tensor:
    "Raise a clear error unless `x` is a float (B, 3, 16, 16) tensor."
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (3, IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{name} must be a (B, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) tensor, got {getattr(x, 'shape', type(x))}")
    return x

@torch.no_grad()
def encode_texts(encoder: CaptionEncoder, tokenizer: PreTrainedTokenizerFast, texts: Sequence[str],
                 batch: int = 512) -> torch.Tensor:
    "Embed captions with the frozen encoder: (len(texts), dim), on the encoder's device."
    if isinstance(texts, str): raise TypeError("texts must be a sequence of captions, not one str")
    dev, out = encoder.device, []
    for i in range(0, len(texts), batch):
        t = tokenizer(list(texts[i:i + batch]), padding=True, return_tensors="pt")
        out.append(encoder(t["input_ids"].to(dev), t["attention_mask"].to(dev)))
    return torch.cat(out)

def clip_loss(text_emb: torch.Tensor, # (B, D) unit vectors
              image_emb: torch.Tensor, # (B, D) unit vectors
              scene_ids: torch.Tensor, # (B,) ints; pairs of one scene are all positives
              logit_scale: torch.Tensor, # scalar log-temperature
             ) -> torch.Tensor:
    "Symmetric InfoNCE with multiple positives."
    logits = logit_scale.exp().clamp(max=100) * text_emb @ image_emb.T
    pos = (scene_ids[:, None] == scene_ids[None, :]).float()
    tgt = pos / pos.sum(1, keepdim=True)
    return 0.5 * (-(tgt * logits.log_softmax(1)).sum(1).mean() - (tgt.T * logits.T.log_softmax(1)).sum(1).mean())

def scene_ids(scenes: np.ndarray) -> torch.Tensor:
    "A unique integer per distinct scene row: (n, 5) -> (n,)."
    return torch.from_numpy(np.ravel_multi_index(scenes.T, [len(v) for v in ATTRIBUTES.values()]))


# %%
_tok = build_tokenizer(["zwei rote Kreise", "two red circles"])
test_eq(_tok(["Zwei crimson Kreise"])["input_ids"][0], [_tok.convert_tokens_to_ids(w) for w in ("zwei", "[UNK]", "kreise")])
test_eq(unk_rate(_tok, ["zwei rote kreise", "two crimson circles", "two red circles", "Zwei crimson Kreise"]), 0.5)
_enc = new_caption_encoder(len(_tok))
_e = encode_texts(_enc, _tok, ["two red circles", "zwei rote kreise"])
test_eq(_e.shape, (2, 64)); test_close(_e.norm(dim=-1), torch.ones(2))
test_fail(lambda: encode_texts(_enc, _tok, "two red circles"), contains="not one str")
_ids = torch.tensor([0, 0, 1])
_perfect_emb = F.normalize(torch.eye(3)[[0, 0, 1]], dim=-1)
assert clip_loss(_perfect_emb, _perfect_emb, _ids, torch.tensor(3.0)) < clip_loss(_perfect_emb, _perfect_emb.flip(0), _ids, torch.tensor(3.0))
test_fail(lambda: check_images(torch.zeros(2, 3, 8, 8)), contains="must be a (B, 3, 16, 16)")


# %% [markdown]
# ## Evaluation network: attribute classifier and Fréchet distance features
#
# Real FID uses Inception-v3 features, whose weights cannot be downloaded here. We train a CNN to predict all
# five attributes (one head each) on real images rendered from a data seed no experiment uses
# (`EVAL_DATA_SEED`), so its training images are disjoint from the generator's; it is trained once and
# committed (`data/mtti_eval/`, see below). Its predictions on generated images give the **primary metric**,
# **all-five-attribute accuracy**: the share of images whose five attributes all match the prompt's scene.
# Its penultimate activations, L2-normalised, are the features of the **secondary metric**, the Fréchet
# distance computed by `torchmetrics`' `FrechetInceptionDistance` with `feature=` our extractor
# (`frechet_metric`; no Inception network is built, so nothing is downloaded). Because the features are unit
# vectors the distance is small (in [0, 4] for the mean term); what matters is its size relative to the
# real-vs-real noise floor, which the experiment measures.

# %%
#| export
class AttributeClassifier(nn.Module):
    "CNN trunk -> 64-d features -> one head per attribute."
    def __init__(self, width: int = 32, feat_dim: int = 64):
        super().__init__()
        self.trunk = nn.Sequential(ImageEncoder(feat_dim, width), nn.GELU())
        self.heads = nn.ModuleDict({a: nn.Linear(feat_dim, len(v)) for a, v in ATTRIBUTES.items()})
    def features(self, x: torch.Tensor) -> torch.Tensor:
        "(B, 3, 16, 16) -> (B, feat_dim)"
        return self.trunk(check_images(x))
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        "(B, 3, 16, 16) -> attribute -> (B, n_values) logits"
        f = self.features(x)
        return {a: h(f) for a, h in self.heads.items()}

class EvalFeatures(nn.Module):
    "The classifier's trunk as a Fréchet-distance feature extractor: (B, 3, 16, 16) in [0, 1] -> (B, D) unit vectors."
    def __init__(self, classifier: AttributeClassifier):
        super().__init__()
        self.classifier = classifier
        self.num_features = next(iter(classifier.heads.values())).in_features  # torchmetrics reads this (no dummy forward)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.classifier.features(x.float()), dim=-1)

def frechet_metric(extractor: nn.Module, # maps (B, 3, 16, 16) floats in [0, 1] to (B, D) features; has `num_features`
                  ) -> FrechetInceptionDistance:
    "torchmetrics' Fréchet distance on `extractor`'s features; real statistics survive `reset()` (fake ones do not)."
    return FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=False)

@torch.no_grad()
def frechet_distance(metric: FrechetInceptionDistance, # a `frechet_metric` holding the real statistics
                     images: torch.Tensor, # (B, 3, 16, 16) generated (or other) images in [0, 1]
                     batch: int = 500,
                    ) -> float:
    "The Fréchet distance of `images` to the metric's real images (the fake statistics are reset first)."
    metric.reset()
    for i in range(0, len(images), batch): metric.update(check_images(images[i:i + batch]), real=False)
    return float(metric.compute())

@torch.no_grad()
def attribute_hits(classifier: AttributeClassifier, # trained evaluation network
                   images: torch.Tensor, # (B, 3, 16, 16) in [0, 1]
                   scenes: np.ndarray, # (B, 5) the scenes the images should show
                  ) -> np.ndarray: # (B, 5) bool: attribute read correctly
    "Which attributes the classifier reads correctly off each image."
    logits = classifier(check_images(images).to(next(classifier.parameters()).device))
    truth = torch.from_numpy(np.asarray(scenes))
    return torch.stack([logits[a].argmax(-1).cpu() == truth[:, i] for i, a in enumerate(ATTRIBUTES)], 1).numpy()

def attribute_accuracy(classifier: AttributeClassifier, images: torch.Tensor, scenes: np.ndarray) -> dict[str, float]:
    "Per-attribute accuracy, their mean, and `all` (all five correct), from `attribute_hits`."
    ok = attribute_hits(classifier, images, scenes)
    return {**{a: float(ok[:, i].mean()) for i, a in enumerate(ATTRIBUTES)}, "mean": float(ok.mean()), "all": float(ok.all(1).mean())}


# %% [markdown]
# The metric against scipy: for samples from two known Gaussians, torchmetrics' distance equals
# $\lVert\mu_1-\mu_2\rVert^2 + \operatorname{tr}(\Sigma_1+\Sigma_2-2(\Sigma_1\Sigma_2)^{1/2})$ computed with
# `scipy.linalg.sqrtm` from the same samples (`tests/test_mtti.py` repeats this with the network blocked).

# %%
import scipy.linalg


# %%
class _Identity(nn.Module):
    num_features = 3
    def forward(self, x): return x.flatten(1).double()
_rng_t = torch.Generator().manual_seed(0)
_x, _y = torch.randn(4000, 3, generator=_rng_t), torch.randn(4000, 3, generator=_rng_t) @ torch.tensor([[2.0, 0, 0], [0.5, 1, 0], [0, 0, 0.5]]) + 1
_m = FrechetInceptionDistance(feature=_Identity(), normalize=True); _m.update(_x, real=True); _m.update(_y, real=False)
_a, _b = _x.double().numpy(), _y.double().numpy()
_ref = ((_a.mean(0) - _b.mean(0)) ** 2).sum() + np.trace(np.cov(_a.T) + np.cov(_b.T) - 2 * scipy.linalg.sqrtm(np.cov(_a.T) @ np.cov(_b.T)).real)
test_close(float(_m.compute()), _ref, eps=1e-6)
_acc = attribute_accuracy(AttributeClassifier(), torch.rand(4, 3, 16, 16), sample_scenes(4, _rng))
test_eq(set(_acc), set(ATTRIBUTES) | {"mean", "all"})
test_close(EvalFeatures(AttributeClassifier())(torch.rand(3, 3, 16, 16)).detach().norm(dim=-1), torch.ones(3), eps=1e-5)


# %% [markdown]
# ## The generator: a small conditional UNet on pixel-unshuffled images
#
# To keep the UNet cheap on a CPU, a 16x16x3 image is rearranged losslessly into an 8x8x12 tensor
# (`pixel_unshuffle`, a fixed invertible "latent" space) and the diffusion model works there. The
# conditioning is the caption embedding as a length-1 sequence for the cross-attention layers. The UNet
# predicts the clean sample rather than the noise (`prediction_type="sample"`), which learns usable
# images in far fewer steps at this budget, and DDIM uses trailing timesteps so its first step starts
# from pure noise. During
# training the embedding gets 10% Gaussian noise (as LAFITE perturbs its text features) and is replaced by
# zeros 10% of the time, which enables classifier-free guidance when sampling with DDIM.

# %%
#| export
def new_unet(channels: int = 32, # channels of both UNet levels
             cond_dim: int = 64, # conditioning (text embedding) size
            ) -> UNet2DConditionModel:
    "A two-level `UNet2DConditionModel` on 8x8x12 (pixel-unshuffled 16x16x3) inputs with cross attention."
    return UNet2DConditionModel(sample_size=IMAGE_SIZE // 2, in_channels=12, out_channels=12, layers_per_block=1,
                                block_out_channels=(channels, channels), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=cond_dim,
                                attention_head_dim=8, norm_num_groups=8)

def new_scheduler() -> DDPMScheduler:
    "The training noise schedule (cosine, 1000 steps, the UNet predicts the clean sample)."
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="sample")

def new_sampler(scheduler: DDPMScheduler) -> DDIMScheduler:
    "A DDIM sampler on the training schedule, with trailing timesteps (the first step starts from pure noise)."
    return DDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing")

def to_latent(images: torch.Tensor) -> torch.Tensor:
    "(B, 3, 16, 16) in [0, 1] -> (B, 12, 8, 8) in [-1, 1]"
    return F.pixel_unshuffle(check_images(images) * 2 - 1, 2)

def from_latent(z: torch.Tensor) -> torch.Tensor:
    "(B, 12, 8, 8) -> (B, 3, 16, 16) clamped to [0, 1]"
    return ((F.pixel_shuffle(z, 2) + 1) / 2).clamp(0, 1)

def denoising_loss(unet: UNet2DConditionModel, # the generator
                   scheduler: DDPMScheduler, # training noise schedule
                   images: torch.Tensor, # (B, 3, 16, 16) in [0, 1]
                   cond: torch.Tensor, # (B, D) conditioning vectors
                   generator: torch.Generator | None = None, # noise / timestep source (CPU)
                  ) -> torch.Tensor:
    "The generator's MSE for these images and conditions (target: the noise or the clean sample, per the schedule)."
    z0 = to_latent(images)
    if cond.ndim != 2 or len(cond) != len(z0): raise ValueError(f"cond must be (B={len(z0)}, D), got {tuple(cond.shape)}")
    noise = torch.randn(z0.shape, generator=generator).to(z0.device)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (len(z0),), generator=generator).to(z0.device)
    pred = unet(scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=cond[:, None]).sample
    return F.mse_loss(pred, z0 if scheduler.config.prediction_type == "sample" else noise)

@torch.no_grad()
def fixed_denoising_loss(unet: UNet2DConditionModel, scheduler: DDPMScheduler, images: torch.Tensor, cond: torch.Tensor,
                         seed: int = 0) -> float:
    "`denoising_loss` with noise and timesteps fixed by `seed`: a deterministic validation loss (no gradients)."
    return denoising_loss(unet, scheduler, images, cond, torch.Generator().manual_seed(seed)).item()

@torch.no_grad()
def sample_images(unet: UNet2DConditionModel, # the generator
                  scheduler: DDIMScheduler, # sampling schedule (DDIM)
                  cond: torch.Tensor, # (B, D) conditioning vectors
                  steps: int = 12, # DDIM steps
                  guidance_scale: float = 2.0, # classifier-free guidance (1 = off)
                  generator: torch.Generator | None = None, # initial-noise source (CPU); fixes the images
                  progress_bar=None, # optional wrapper around the step iterator
                 ) -> torch.Tensor: # (B, 3, 16, 16) images in [0, 1]
    "DDIM sampling with classifier-free guidance (the unconditional input is the zero vector)."
    if cond.ndim != 2: raise ValueError(f"cond must be (B, D), got {tuple(cond.shape)}")
    dev = cond.device
    z = torch.randn((len(cond), 12, IMAGE_SIZE // 2, IMAGE_SIZE // 2), generator=generator).to(dev)
    scheduler.set_timesteps(steps)
    both = torch.cat([torch.zeros_like(cond), cond])[:, None]
    for t in (progress_bar or (lambda x: x))(scheduler.timesteps):
        out_u, out_c = unet(torch.cat([z, z]), t, encoder_hidden_states=both).sample.chunk(2)
        z = scheduler.step(out_u + guidance_scale * (out_c - out_u), t, z).prev_sample
    return from_latent(z)


# %%
_unet = new_unet(16, 64)
_x = torch.rand(2, 3, 16, 16)
test_close(from_latent(to_latent(_x)), _x, eps=1e-6)
assert denoising_loss(_unet, new_scheduler(), _x, torch.randn(2, 64), torch.Generator().manual_seed(0)).item() > 0
_ddim = new_sampler(new_scheduler())
_cond = torch.randn(2, 64)
_a = sample_images(_unet, _ddim, _cond, steps=2, generator=torch.Generator().manual_seed(1))
test_eq(_a.shape, (2, 3, 16, 16))
test_eq(sample_images(_unet, _ddim, _cond, steps=2, generator=torch.Generator().manual_seed(1)), _a)
test_fail(lambda: denoising_loss(_unet, new_scheduler(), _x, torch.randn(3, 64)), contains="cond must be (B=2, D)")


# %% [markdown]
# ## The Ensemble Adapter
#
# The paper does not pin down the exact form (papers.md: *unverified*), so here is ours. The input is the
# frozen encoder's embeddings of the source caption and of its *N* machine translations, stacked as
# `N+1` candidates (candidate 0 is the source).
#
# 1. **Weigh**: query = $W_q e_\text{src}$, keys = $W_k e_i$; weights = softmax over the N+1 candidates of
#    $q\cdot k_i/\sqrt{d} + b_i$, where $b_i$ is a learned bias per candidate slot (a prior on how much
#    each MT system is trusted) and the dot product lets a translation that disagrees with the source lose
#    weight. `use_slot_bias=False` drops $b_i$ (the ablation that shows whether the content term does any work). $W_k$ and $b$ start at zero, so training starts from mean pooling; $W_q$ starts random
#    (with both $W_q$ and $W_k$ at zero their gradients would vanish and only $b$ would ever learn).
# 2. **Consolidate**: $p = \sum_i w_i e_i$, output $p + \mathrm{MLP}(p)$ (a residual bottleneck adapter whose
#    last layer starts at zero, so the initial output is the pooled embedding).
# 3. **Train** only these parameters with the frozen generator's denoising loss on target-language captions
#    paired with their images. `pooling="mean"` replaces step 1 by uniform weights (the ablation).

# %%
#| export
class EnsembleAdapter(ModelMixin, ConfigMixin):
    "Attention over N+1 caption embeddings (source + N translations) and a residual MLP adapter."
    @register_to_config
    def __init__(self, dim: int = 64, # embedding size
                 n_candidates: int = 4, # N+1: the source caption and N translations
                 hidden: int = 64, # adapter bottleneck width
                 pooling: str = "attention", # 'attention' or 'mean'
                 use_slot_bias: bool = True, # learn a bias per candidate slot (False: the weights depend on content only)
                ):
        super().__init__()
        if pooling not in ("attention", "mean"): raise ValueError(f"pooling must be 'attention' or 'mean', got {pooling!r}")
        self.query, self.key = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.slot_bias = nn.Parameter(torch.zeros(n_candidates)) if use_slot_bias else None
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        # W_k = 0 gives uniform weights at the start; W_q stays random, otherwise both gradients would be zero
        for p in (self.key.weight, self.mlp[2].weight, self.mlp[2].bias): nn.init.zeros_(p)

    def weights(self, candidates: torch.Tensor) -> torch.Tensor:
        "(B, N+1, D) -> (B, N+1) softmax weights (uniform for mean pooling)."
        B, K, D = candidates.shape
        if K != self.config.n_candidates or D != self.config.dim:
            raise ValueError(f"candidates must be (B, {self.config.n_candidates}, {self.config.dim}), got {tuple(candidates.shape)}")
        if self.config.pooling == "mean": return candidates.new_full((B, K), 1 / K)
        q, k = self.query(candidates[:, 0]), self.key(candidates)
        scores = (k @ q[:, :, None]).squeeze(-1) / math.sqrt(D)
        return (scores if self.slot_bias is None else scores + self.slot_bias).softmax(-1)

    def forward(self, candidates: torch.Tensor) -> torch.Tensor:
        "(B, N+1, D) candidate embeddings (source first) -> (B, D) conditioning vector."
        pooled = (self.weights(candidates)[..., None] * candidates).sum(1)
        return pooled + self.mlp(pooled)

def freeze(*modules: nn.Module) -> None:
    "Turn off gradients of every parameter of `modules` and put them in eval mode."
    for m in modules:
        m.eval()
        for p in m.parameters(): p.requires_grad_(False)


# %%
_ad = EnsembleAdapter(dim=64, n_candidates=4)
_c = F.normalize(torch.randn(5, 4, 64), dim=-1)
test_close(_ad(_c), _c.mean(1), eps=1e-6)  # zero init: mean pooling, identity adapter
with torch.no_grad(): _ad.query.weight.normal_(); _ad.key.weight.normal_(); _ad.slot_bias.normal_()
_w = _ad.weights(_c)
test_eq(_w.shape, (5, 4)); test_close(_w.sum(-1), torch.ones(5)); assert (_w > 0).all()
assert not torch.allclose(_w, torch.full_like(_w, 0.25))
test_fail(lambda: _ad(torch.randn(5, 3, 64)), contains="candidates must be (B, 4, 64)")
test_fail(lambda: EnsembleAdapter(pooling="max"), contains="pooling must be")
_nb = EnsembleAdapter(n_candidates=4, use_slot_bias=False)
with torch.no_grad(): _nb.key.weight.copy_(_ad.key.weight); _nb.query.weight.copy_(_ad.query.weight)
_same = _c[:, :1].expand(5, 4, 64)  # identical candidates: without a slot bias the weights are uniform
test_close(_nb.weights(_same), torch.full((5, 4), 0.25)); assert not torch.allclose(_ad.weights(_same), torch.full((5, 4), 0.25))
# only the adapter receives gradients when trained through a frozen generator
freeze(_unet)
_loss = denoising_loss(_unet, new_scheduler(), _x, _ad(_c[:2]), torch.Generator().manual_seed(0)); _loss.backward()
assert all(p.grad is None for p in _unet.parameters()) and all(p.grad is not None for p in _ad.parameters())


# %% [markdown]
# ## The pipeline
#
# `MTTIPipeline` is a `diffusers.DiffusionPipeline` holding the frozen text encoder, tokenizer, UNet,
# DDIM scheduler and the Ensemble Adapter plus the MT systems' profiles. Given prompts in a supported
# language it translates them with the N systems, encodes source + translations, runs EnsAd and samples.
# English prompts skip translation (the generator was trained on English). `save_pretrained` writes each
# component with its own `save_pretrained` into a subfolder plus `mtti_pipeline.json`; `from_pretrained`
# reads that layout back from a local directory.

# %%
#| export
class MTTIPipeline(DiffusionPipeline):
    "Multilingual text-to-image: prompt in any of `LANGUAGES` -> MT into English -> EnsAd -> UNet + DDIM."
    def __init__(self, unet: UNet2DConditionModel, scheduler: DDIMScheduler, text_encoder: CaptionEncoder,
                 tokenizer: PreTrainedTokenizerFast, adapter: EnsembleAdapter, mt_systems: Sequence[MTSystem] = MT_SYSTEMS):
        super().__init__()
        if adapter.config.n_candidates != len(mt_systems) + 1:
            raise ValueError(f"adapter expects {adapter.config.n_candidates - 1} translations, got {len(mt_systems)} MT systems")
        freeze(unet, text_encoder, adapter)  # an inference pipeline: eval mode, no gradients
        self.register_modules(unet=unet, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer, adapter=adapter)
        self.mt_systems = tuple(mt_systems)

    def encode_prompts(self, prompts: Sequence[str], # captions in `language`
                       language: str, # one of `LANGUAGES`
                      ) -> tuple[torch.Tensor, torch.Tensor | None]: # (B, D) conditioning, (B, N+1) EnsAd weights or None
        "Translate, encode and consolidate prompts into conditioning vectors."
        check_language(language)
        if language == "en": return encode_texts(self.text_encoder, self.tokenizer, prompts), None
        texts = [[p] + [s.translate(p, language) for s in self.mt_systems] for p in prompts]
        emb = encode_texts(self.text_encoder, self.tokenizer, [t for ts in texts for t in ts])
        cand = emb.view(len(prompts), len(self.mt_systems) + 1, -1)
        with torch.no_grad(): return self.adapter(cand), self.adapter.weights(cand)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], # one caption or a list
                 language: str = "en", # the prompts' language
                 num_inference_steps: int = 12, # DDIM steps
                 guidance_scale: float = 2.0, # classifier-free guidance
                 generator: torch.Generator | None = None, # CPU generator for the initial noise
                 output_type: str = "pt", # 'pt' (B, 3, 16, 16) tensor, 'np' (B, 16, 16, 3) array, or 'pil'
                ) -> ImagePipelineOutput:
        "Generate one image per prompt."
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts): raise TypeError("prompt must be a str or a non-empty list of str")
        if output_type not in ("pt", "np", "pil"): raise ValueError(f"output_type must be 'pt', 'np' or 'pil', got {output_type!r}")
        cond, _ = self.encode_prompts(prompts, language)
        x = sample_images(self.unet, self.scheduler, cond, num_inference_steps, guidance_scale, generator, self.progress_bar)
        if output_type == "pt": return ImagePipelineOutput(images=x.cpu())
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        return ImagePipelineOutput(images=arr if output_type == "np" else self.numpy_to_pil(arr))

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        "Write every component into `save_directory/<name>/` and the MT profiles into `mtti_pipeline.json`."
        d = Path(save_directory); d.mkdir(parents=True, exist_ok=True)
        for name in ("unet", "scheduler", "text_encoder", "tokenizer", "adapter"): getattr(self, name).save_pretrained(d / name)
        (d / "mtti_pipeline.json").write_text(json.dumps({"mt_systems": [asdict(s) for s in self.mt_systems]}, indent=1))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs) -> "MTTIPipeline":
        "Load a pipeline written by `save_pretrained` from a local directory."
        d = Path(pretrained_model_name_or_path)
        if not (d / "mtti_pipeline.json").is_file(): raise FileNotFoundError(f"no saved MTTIPipeline in {d} (mtti_pipeline.json missing)")
        systems = [MTSystem(**s) for s in json.loads((d / "mtti_pipeline.json").read_text())["mt_systems"]]
        return cls(unet=UNet2DConditionModel.from_pretrained(d / "unet"), scheduler=DDIMScheduler.from_pretrained(d / "scheduler"),
                   text_encoder=CaptionEncoder.from_pretrained(d / "text_encoder"),
                   tokenizer=PreTrainedTokenizerFast.from_pretrained(d / "tokenizer"),
                   adapter=EnsembleAdapter.from_pretrained(d / "adapter"), mt_systems=systems)


# %%
torch.manual_seed(0)
_all_caps = [c for cs in make_dataset(40, 0).captions.values() for c in cs]
_tok = build_tokenizer(_all_caps)
_pipe = MTTIPipeline(new_unet(16), _ddim, new_caption_encoder(len(_tok)), _tok, EnsembleAdapter(n_candidates=4))
_pipe.set_progress_bar_config(disable=True)
_img = _pipe(["два красных круга слева"], language="ru", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images
with tempfile.TemporaryDirectory() as _dir:
    _pipe.save_pretrained(_dir)
    _loaded = MTTIPipeline.from_pretrained(_dir); _loaded.set_progress_bar_config(disable=True)
    test_eq(_loaded(["два красных круга слева"], language="ru", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images, _img)
test_fail(lambda: _pipe("deux cercles", language="fr"), contains="unknown language 'fr'")
test_fail(lambda: MTTIPipeline.from_pretrained("/nonexistent"), contains="mtti_pipeline.json missing")


# %% [markdown]
# ## Training loops
#
# Four small loops, all seeded through one CPU `torch.Generator` so a run is reproducible on a CPU:
# the contrastive encoders, the attribute classifier, the generator (from scratch or fine-tuned) and an
# adapter through the frozen generator.

# %%
#| export
def _batches(n: int, batch: int, steps: int, g: torch.Generator, show_progress: bool, desc: str):
    "Yield `steps` random index batches over `range(n)`."
    for _ in progress_iter(range(steps), enabled=show_progress, desc=desc):
        yield torch.randint(0, n, (batch,), generator=g)

def train_contrastive(data: CaptionedScenes, # training scenes with captions in every language
                      tokenizer: PreTrainedTokenizerFast, # word-level tokenizer over all languages
                      steps: int = 300, # optimisation steps
                      multilingual_fraction: float = 0.1, # share of images whose non-English captions are used
                      batch: int = 128, # pairs per step
                      seed: int = 0, # seed for initialisation and batches
                      device: str | torch.device = "cpu", # where to train
                      show_progress: bool = False, # progress bar
                     ) -> tuple[CaptionEncoder, ImageEncoder, list[float]]: # frozen encoders and the loss curve
    "Train text and image encoders CLIP-style on (caption, image) pairs; return them frozen."
    if not 0 <= multilingual_fraction <= 1: raise ValueError(f"multilingual_fraction must be in [0, 1], got {multilingual_fraction}")
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    n = len(data); k = int(round(multilingual_fraction * n))
    pick = torch.randperm(n, generator=g)[:k].tolist()  # images whose non-English captions the encoder sees
    idx = list(range(n)) + [i for _ in LANGUAGES[1:] for i in pick]
    texts = data.captions["en"] + [data.captions[l][i] for l in LANGUAGES[1:] for i in pick]
    tok = tokenizer(texts, padding=True, return_tensors="pt")
    ids, mask, img_idx, sids = tok["input_ids"], tok["attention_mask"], torch.tensor(idx), scene_ids(data.scenes)
    text_enc, img_enc = new_caption_encoder(len(tokenizer)).to(device), ImageEncoder().to(device)
    scale = nn.Parameter(torch.tensor(math.log(10.0), device=device))
    opt = torch.optim.AdamW([*text_enc.parameters(), *img_enc.parameters(), scale], lr=2e-3, weight_decay=0.01)
    losses = []
    for b in _batches(len(texts), batch, steps, g, show_progress, "encoder"):
        im = img_idx[b]
        loss = clip_loss(text_enc(ids[b].to(device), mask[b].to(device)), img_enc.embed(data.images[im].to(device)), sids[im], scale)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    freeze(text_enc, img_enc)
    return text_enc, img_enc, losses

def train_classifier(data: CaptionedScenes, steps: int = 200, batch: int = 128, seed: int = 0,
                     device: str | torch.device = "cpu", show_progress: bool = False) -> tuple[AttributeClassifier, list[float]]:
    "Train the attribute classifier (evaluation network) on real images and their true scenes; returned frozen."
    g = torch.Generator().manual_seed(seed); torch.manual_seed(seed)
    clf, truth = AttributeClassifier().to(device), torch.from_numpy(data.scenes)
    opt, losses = torch.optim.AdamW(clf.parameters(), lr=3e-3), []
    for b in _batches(len(data), batch, steps, g, show_progress, "classifier"):
        logits = clf(data.images[b].to(device))
        loss = sum(F.cross_entropy(logits[a], truth[b, i].to(device)) for i, a in enumerate(ATTRIBUTES))
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    freeze(clf)
    return clf, losses

def train_generator(unet: UNet2DConditionModel, # generator to train (in place)
                    scheduler: DDPMScheduler, # training noise schedule
                    images: torch.Tensor, # (n, 3, 16, 16) training images
                    cond: torch.Tensor, # (n, D) caption embeddings paired with them
                    steps: int = 500, batch: int = 64, lr: float = 1e-3, seed: int = 0,
                    cond_noise: float = 0.1, # std of the Gaussian noise added to the embeddings (LAFITE-style)
                    cond_drop: float = 0.1, # probability of replacing an embedding by zeros (for guidance)
                    show_progress: bool = False) -> list[float]:
    "Train the UNet with the denoising loss on (image, caption embedding) pairs; returns the loss curve."
    if len(images) != len(cond): raise ValueError(f"{len(images)} images but {len(cond)} conditioning vectors")
    g = torch.Generator().manual_seed(seed); dev = unet.device
    unet.train(); unet.requires_grad_(True)
    opt, losses = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0), []
    for b in _batches(len(images), batch, steps, g, show_progress, "generator"):
        c = cond[b].to(dev)
        c = c + cond_noise * torch.randn(c.shape, generator=g).to(dev) / math.sqrt(c.shape[1])
        c = c * (torch.rand(len(b), 1, generator=g) >= cond_drop).to(dev)
        loss = denoising_loss(unet, scheduler, images[b].to(dev), c, g)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    freeze(unet)
    return losses

def train_adapter(adapter: EnsembleAdapter, # adapter to train (in place)
                  unet: UNet2DConditionModel, # frozen generator
                  scheduler: DDPMScheduler, # training noise schedule
                  images: torch.Tensor, # (n, 3, 16, 16) images
                  candidates: torch.Tensor, # (n, N+1, D) source + translation embeddings of their captions
                  steps: int = 150, batch: int = 64, lr: float = 3e-3, seed: int = 0,
                  show_progress: bool = False,
                  on_step=None, # called as on_step(step) before step 0 and after every step (e.g. a validation loss)
                 ) -> list[float]:
    "Train only the adapter with the frozen generator's denoising loss; returns the loss curve."
    if len(images) != len(candidates): raise ValueError(f"{len(images)} images but {len(candidates)} candidate sets")
    freeze(unet)
    g = torch.Generator().manual_seed(seed); dev = unet.device
    adapter.to(dev).train(); adapter.requires_grad_(True)
    opt, losses = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.0), []
    if on_step: on_step(0)
    for b in _batches(len(images), batch, steps, g, show_progress, f"adapter ({adapter.config.pooling}, N={adapter.config.n_candidates - 1})"):
        loss = denoising_loss(unet, scheduler, images[b].to(dev), adapter(candidates[b].to(dev)), g)
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        if on_step: on_step(len(losses))
    freeze(adapter)
    return losses


# %%
_small = make_dataset(64, 0)
_tok = build_tokenizer([c for cs in _small.captions.values() for c in cs])
_te, _ie, _l = train_contrastive(_small, _tok, steps=2, batch=16)
test_eq(len(_l), 2); assert not any(p.requires_grad for p in _te.parameters())
_u = new_unet(16)
_before = [p.clone() for p in _u.parameters()]
test_eq(len(train_generator(_u, new_scheduler(), _small.images, encode_texts(_te, _tok, _small.captions["en"]), steps=1, batch=4)), 1)
assert any(not torch.equal(a, b) for a, b in zip(_before, _u.parameters()))
_ad = EnsembleAdapter(n_candidates=2); _frozen = [p.clone() for p in _u.parameters()]
train_adapter(_ad, _u, new_scheduler(), _small.images[:8], torch.randn(8, 2, 64), steps=2, batch=4)
assert all(torch.equal(a, b) for a, b in zip(_frozen, _u.parameters()))  # generator untouched
test_fail(lambda: train_adapter(_ad, _u, new_scheduler(), _small.images[:8], torch.randn(7, 2, 64)), contains="8 images but 7")
_calls = []; train_adapter(_ad, _u, new_scheduler(), _small.images[:8], torch.randn(8, 2, 64), steps=3, batch=4, on_step=_calls.append)
test_eq(_calls, [0, 1, 2, 3])

# %% [markdown]
# ## The committed evaluation network
#
# The evaluation network is fixed for every run: `train_eval_network` trains it on `n` real images rendered
# from `EVAL_DATA_SEED` (no experiment draws data from it, so its training images are disjoint from the
# generator's), `save_eval_network` writes it as safetensors into `data/mtti_eval/` with a manifest (sha256 of
# the file, the command that made it, the commit, the training settings and its held-out accuracy), and
# `load_eval_network` refuses a file whose checksum does not match the manifest.

# %%
#| export
EVAL_DATA_SEED = 1_000_003  # the evaluation network's training images; experiments use small seeds

def eval_dir() -> Path:
    "`data/mtti_eval` of this checkout (where the committed evaluation network lives)."
    import moebook
    return Path(moebook.__file__).resolve().parent.parent / "data" / "mtti_eval"

def train_eval_network(n: int = 8000, # real training images (rendered from EVAL_DATA_SEED)
                       steps: int = 1500, batch: int = 128, seed: int = 0, device: str | torch.device = "cpu",
                       show_progress: bool = False) -> tuple[AttributeClassifier, list[float]]:
    "Train the evaluation network on images no experiment uses; returned frozen."
    return train_classifier(make_dataset(n, EVAL_DATA_SEED), steps, batch, seed, device, show_progress)

def save_eval_network(clf: AttributeClassifier, # trained evaluation network
                      directory: str | Path, # where classifier.safetensors and manifest.json go
                      info: dict, # provenance: the command, the commit, training settings, measured accuracy
                     ) -> Path:
    "Write the network as safetensors and a manifest with its sha256 and `info`."
    from moebook.core import atomic_write_text
    d = Path(directory); d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in clf.state_dict().items()}, d / "classifier.safetensors")
    sha = hashlib.sha256((d / "classifier.safetensors").read_bytes()).hexdigest()
    return atomic_write_text(d / "manifest.json", json.dumps({**info, "file": "classifier.safetensors", "sha256": sha}, indent=1) + "\n")

def load_eval_network(directory: str | Path | None = None, # folder written by `save_eval_network` (default: `eval_dir()`)
                      device: str | torch.device = "cpu") -> tuple[AttributeClassifier, dict]:
    "The committed evaluation network (frozen) and its manifest; raises if the file does not match its checksum."
    d = Path(directory) if directory else eval_dir()
    if not (d / "manifest.json").is_file(): raise FileNotFoundError(f"no evaluation network in {d} (manifest.json missing)")
    man = json.loads((d / "manifest.json").read_text())
    sha = hashlib.sha256((d / man["file"]).read_bytes()).hexdigest()
    if sha != man["sha256"]: raise ValueError(f"{d / man['file']}: sha256 {sha[:12]}... does not match the manifest's {man['sha256'][:12]}...")
    clf = AttributeClassifier(); clf.load_state_dict(load_file(d / man["file"])); freeze(clf)
    return clf.to(device), man


# %%
with tempfile.TemporaryDirectory() as _dir:
    _clf = AttributeClassifier(); freeze(_clf)
    save_eval_network(_clf, _dir, {"command": "test"})
    _back, _man = load_eval_network(_dir)
    test_eq(_man["command"], "test"); assert all(torch.equal(a, b) for a, b in zip(_clf.state_dict().values(), _back.state_dict().values()))
    (Path(_dir) / "classifier.safetensors").write_bytes((Path(_dir) / "classifier.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    test_fail(lambda: load_eval_network(_dir), contains="does not match")
test_fail(lambda: load_eval_network("/nonexistent"), contains="manifest.json missing")

# %% [markdown]
# ## The claims, fixed before the experiment
#
# The paper's claims restated for this world, with their metric, direction and smallest effect of interest.
# **Primary metric**: all-five-attribute accuracy (the evaluation network reads every attribute of the
# prompt's scene off the generated image), on `n_eval` test prompts split evenly over German, Spanish and
# Russian; every method generates one image per prompt and paired seed from the *same* initial noise, so the
# primary estimate is a paired BCa bootstrap over prompts of the seed-averaged success (`paired_bootstrap`,
# n = prompts), and a paired *t* over seeds (the training randomness) is a secondary row. **Secondary metric**:
# the Fréchet distance (lower is better), one value per seed and method, paired *t* over seeds; its smallest
# effect of interest is twice the standard deviation of the real-vs-real distance (measured below, before any
# method runs).
#
# - **Claim 1** (direction pinned to the paper's main results table, Table 2 of arXiv 2305.19216, in which
#   Translate Test has a lower FID than Zero-Shot Transfer with the mCLIP-based generator — our reading; the table
#   could not be re-read from a stored copy in this session, so the lead should check it): translation-based
#   inference beats zero-shot transfer. Treatment: Translate Test with the MT system that is best on validation.
# - **Claim 2**: EnsAd beats the best single-translation baseline (Translate Train or Translate Test with one MT
#   system, the best on validation) — pooled over languages, and per language as secondary rows.
# - **Claim 3a**: more translations help (EnsAd with N = 3 vs N = 1). **3b**: attention beats mean pooling.
#   **3c** (secondary, our ablation): the content attention alone is not worse than with the per-slot bias
#   (non-inferiority, margin = the target).
#
# Preconditions, the same for every claim: the evaluation network reads real test images (all five attributes)
# at least `MIN_REAL_ALL5`; no machine translation contains an `[UNK]`; the generator follows English prompts
# (the English ceiling beats the random-prompt floor by `MIN_PROMPT_GAIN` on validation); there is a language
# gap for translation to close: zero-shot closes between 20 % and 80 % of the floor-to-ceiling gap on
# validation. Claims 2 and 3 also need the adapters trained to a plateau: at most `MAX_LATE_GAIN` of an
# adapter's validation-loss improvement may come in the last half of its training.

# %%
import dataclasses, textwrap
import matplotlib.pyplot as plt
from IPython.display import Markdown, display
from moebook.core import pick_device, record_metrics
from moebook.evidence import Claim, Precondition, RunClock, forest_plot, paired_bootstrap, paired_runs, paired_t, show_claims, wilson_rate

# %%
NB = "04_mtti_ensad.ipynb"
TARGET = 0.03  # all-five accuracy: the smallest effect of interest (3 percentage points)
MIN_REAL_ALL5, MAX_UNK, MIN_PROMPT_GAIN, GAP_RANGE, MAX_LATE_GAIN = 0.85, 0.01, 0.1, (0.2, 0.8), 0.25
DEVIATIONS = ["synthetic 16x16 shape world with four templated languages and simulated MT, not COCO-CN / Multi30K / LAION",
              "a small diffusers UNet (DDPM/DDIM) instead of the LAFITE GAN; a 2-layer BERT trained CLIP-style here instead of mCLIP",
              "primary metric all-five-attribute accuracy of an evaluation network trained here; Fréchet distance on its normalised "
              "64-d features (torchmetrics), not Inception FID",
              "EnsAd's exact attention form is not published: ours is described in the adapter section"]
_acc = dict(notebook=NB, metric="all-five-attribute accuracy of generated test images", direction="increase", deviations=DEVIATIONS)
CLAIMS = {
    "1": Claim(id="1", claim="Translation-based inference (Translate Test) beats zero-shot transfer", treatment="Translate Test (best MT on val)",
               control="Zero-Shot", target=TARGET, paper_metric="FID, Table 2 (direction only)", **_acc),
    "2": Claim(id="2", claim="EnsAd beats the best single-translation baseline", treatment="EnsAd",
               control="best single-translation method on val", target=TARGET, **_acc),
    "3a": Claim(id="3a", claim="More translations help (EnsAd N=3 vs N=1)", treatment="EnsAd", control="EnsAd N=1", target=TARGET, **_acc),
    "3b": Claim(id="3b", claim="Attention beats mean pooling of the candidates", treatment="EnsAd", control="EnsAd mean-pool", target=TARGET, **_acc),
    "3c": Claim(id="3c", claim="Content attention alone is not worse than with the per-slot bias", treatment="EnsAd no slot bias",
                control="EnsAd", kind="non-inferiority", margin=TARGET, primary=False, **{**_acc, "direction": "increase"}),
}

# %% [markdown]
# ## Experiment
#
# Data: `n_train` training scenes (captions in all four languages), `n_val` validation and `n_eval` test
# prompts (item *i* is in language `TARGETS[i % 3]`), `n_reference` real images for the reference statistics,
# each from its own seed; the evaluation network is the committed one.

# %%
#| slow
clock = RunClock()  # wall time, CPU time and load of the claims' experiment: from here to the claim check
for _name in ("n_seeds", "workers", "n_train", "n_val", "n_eval", "n_reference", "n_floor_draws", "encoder_steps", "generator_steps",
              "adapter_steps", "adapter_eval_every", "batch_size", "sample_steps", "unet_channels"):
    _v = globals()[_name]
    if not isinstance(_v, int) or isinstance(_v, bool) or _v < 1: raise ValueError(f"parameter {_name} must be a positive int, got {_v!r}")
if n_seeds < 3: raise ValueError(f"n_seeds must be >= 3: the paired t interval's coverage is only trusted from 3 pairs, got {n_seeds}")
if n_eval < 100 or n_val < 3: raise ValueError(f"n_eval must be >= 100 (the bootstrap is trusted from 100 prompts) and n_val >= 3, got {n_eval}, {n_val}")
if not 0 <= encoder_multilingual_fraction <= 1: raise ValueError(f"encoder_multilingual_fraction must be in [0, 1], got {encoder_multilingual_fraction}")
if setting not in ("smoke", "default", "evidence"): raise ValueError(f"setting must be smoke, default or evidence, got {setting!r}")
dev = pick_device(device)
n_workers = min(workers, n_seeds) if dev.type == "cpu" else 1  # CUDA cannot be forked
torch.set_num_threads(1 if n_workers > 1 else max(1, torch.get_num_threads()))
seed_everything(seed)
TARGETS = LANGUAGES[1:]
train, val, test = make_dataset(n_train, seed), make_dataset(n_val, seed + 1), make_dataset(n_eval, seed + 2)
reference = make_dataset(n_reference, seed + 3)
lang_of = {"val": np.array([TARGETS[i % 3] for i in range(n_val)]), "test": np.array([TARGETS[i % 3] for i in range(n_eval)])}
classifier, eval_manifest = load_eval_network(device=dev)
real_acc = attribute_accuracy(classifier, test.images, test.scenes)
print(f"device {dev}, {n_workers} worker(s); {len(train)} training, {len(val)} validation, {len(test)} test prompts, {len(reference)} reference images")
print(f"evaluation network: {eval_manifest['command']} at commit {str(eval_manifest['commit'])[:10]} (dirty {eval_manifest['dirty']}), "
      f"trained on {eval_manifest['n_images']} images of data seed {eval_manifest['data_seed']}; sha256 {eval_manifest['sha256'][:12]}...")
print("its accuracy on the real test images:", {k: round(v, 3) for k, v in real_acc.items()})
for lang in LANGUAGES: print(f"{lang}: {test.captions[lang][0]}")

# %% [markdown]
# ### Machine translations and the vocabulary
#
# One caption per target language and what the three systems make of it; the error rates measured on the
# test captions (parser-based, independent of the systems' own logs) next to the documented ones; and the
# share of translations that contain a word the tokenizer does not know (it must be zero: an `[UNK]` would
# tilt the comparison against translation).

# %%
#| slow
for lang in TARGETS:
    src = test.captions[lang][1]
    print(f"[{lang}] {src}\n    truth : {test.captions['en'][1]}")
    for s_ in MT_SYSTEMS: print(f"    {s_.name:5s} : {s_.translate(src, lang)}")
measured_mt = {(s_.name, l): mt_error_rates(test, s_, l) for s_ in MT_SYSTEMS for l in TARGETS}
print(f"\n{'system':7s}{'lang':5s}{'drop doc/meas':>16s}{'mistr. doc/meas':>18s}{'reorder doc/meas':>18s}")
for (name, l), m in measured_mt.items():
    r = next(s_ for s_ in MT_SYSTEMS if s_.name == name).rates(l)
    print(f"{name:7s}{l:5s}" + "".join(f"{r[k]:>9.3f}/{m[k]:.3f}" for k in ("drop", "mistranslate", "reorder")))
tokenizer = build_tokenizer([c for cs in train.captions.values() for c in cs])

def split_texts(data: CaptionedScenes, langs: np.ndarray) -> dict[str, list[str]]:
    "Per item: the source caption in its language and its translation by every MT system."
    src = [data.captions[l][i] for i, l in enumerate(langs)]
    return {"source": src, **{s_.name: [s_.translate(c, l) for c, l in zip(src, langs)] for s_ in MT_SYSTEMS}}
texts = {"val": split_texts(val, lang_of["val"]), "test": split_texts(test, lang_of["test"])}
train_langs = np.array([l for l in TARGETS for _ in range(n_train)])
train_texts = {"source": [c for l in TARGETS for c in train.captions[l]]}
train_texts |= {s_.name: [s_.translate(c, l) for c, l in zip(train_texts["source"], train_langs)] for s_ in MT_SYSTEMS}
tt_texts = [MT_SYSTEMS[0].translate(c, "en", tgt=l) for l in TARGETS for c in train.captions["en"]]  # Translate Train data
unk = {f"{split}/{name}": unk_rate(tokenizer, t) for split, d in (("train", train_texts), ("test", texts["test"])) for name, t in d.items() if name != "source"}
unk["translate-train captions"] = unk_rate(tokenizer, tt_texts)
print(f"\nvocabulary {len(tokenizer)} words; share of MT outputs with an [UNK]:", {k: round(v, 4) for k, v in unk.items()})

# %% [markdown]
# ### The multilingual text encoder
#
# Trained CLIP-style on every English caption and on the non-English captions of only
# `encoder_multilingual_fraction` of the images: the encoder's non-English side is weak, which is the language
# gap zero-shot transfer has to live with. Caption -> image retrieval on the validation set per language (a hit
# when the nearest validation image shows the caption's scene) shows the gap.

# %%
#| slow
text_encoder, image_encoder, enc_losses = train_contrastive(train, tokenizer, encoder_steps, encoder_multilingual_fraction,
                                                            seed=seed, device=dev, show_progress=progress)
with torch.no_grad(): val_img_emb = image_encoder.embed(val.images.to(dev))
val_ids = scene_ids(val.scenes)

def retrieval_accuracy(captions: list[str]) -> float:
    "Share of validation captions whose nearest validation image shows their scene."
    nearest = (encode_texts(text_encoder, tokenizer, captions) @ val_img_emb.T).argmax(1).cpu()
    return (val_ids[nearest] == val_ids).float().mean().item()

retrieval = {l: retrieval_accuracy(val.captions[l]) for l in LANGUAGES}
retrieval_mt = {s_.name: retrieval_accuracy([s_.translate(c, l) for c, l in zip(texts["val"]["source"], lang_of["val"])])
                for s_ in MT_SYSTEMS}
print(f"encoder loss {enc_losses[0]:.2f} -> {np.mean(enc_losses[-20:]):.2f}")
print("caption->image retrieval accuracy (validation):", {l: round(v, 3) for l, v in retrieval.items()})
print("  of the machine translations (all target languages):", {k: round(v, 3) for k, v in retrieval_mt.items()})

# %% [markdown]
# ### The Fréchet distance and its noise floor
#
# The reference statistics come from `n_reference` real images. The **noise floor** is the distance of
# `n_floor_draws` independent draws of `n_eval` *real* images to that reference: a generated set cannot be
# told apart from real images by less than its spread. Two degradations of the real test images show the
# metric's direction: a 3x3 blur, and an attribute swap (every red object drawn blue), which the all-five
# accuracy must punish too.

# %%
#| slow
fd_metric = frechet_metric(EvalFeatures(classifier))
with torch.no_grad(): fd_metric.update(reference.images.to(dev), real=True)
floor_fd = [frechet_distance(fd_metric, make_dataset(n_eval, seed + 10 + k).images.to(dev)) for k in range(n_floor_draws)]
FD_TARGET = 2 * float(np.std(floor_fd, ddof=1)) if n_floor_draws > 1 else float("nan")  # the distance's smallest effect of interest
blurred = F.avg_pool2d(F.pad(test.images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
swapped_scenes = test.scenes.copy(); swapped_scenes[swapped_scenes[:, 0] == 0, 0] = 2  # red -> blue
_rng_swap = np.random.default_rng(seed + 4)
swapped = torch.from_numpy(np.stack([render_scene(r, _rng_swap) for r in swapped_scenes]))
sanity = {name: {"fd": frechet_distance(fd_metric, imgs.to(dev)), "all5": attribute_accuracy(classifier, imgs, test.scenes)["all"]}
          for name, imgs in (("real test images", test.images), ("3x3 blur", blurred), ("red drawn blue", swapped))}
print(f"real-vs-real noise floor over {n_floor_draws} draws of {n_eval}: mean {np.mean(floor_fd):.4f}, sd {np.std(floor_fd, ddof=1):.4f} "
      f"(range {min(floor_fd):.4f}-{max(floor_fd):.4f}); distance target (2 sd) {FD_TARGET:.4f}")
for k, v in sanity.items(): print(f"{k:18s} distance {v['fd']:.4f}   all-five accuracy {v['all5']:.3f}")

# %% [markdown]
# ### Paired seeds: every method on every seed
#
# Seed *s* trains the generator on English captions (`generator_steps`), fine-tunes a copy on the training
# captions machine-translated into the three target languages by `mt_a` (Translate Train, one generator for
# the three languages), and trains five adapters through the frozen generator on the target-language
# training captions with their images (all three languages pooled): EnsAd (attention with the per-slot bias,
# N = 3), EnsAd without the bias, EnsAd with mean pooling, and attention with N = 2 (`mt_a`, `mt_b`) and
# N = 1 (`mt_a`). Each adapter's loss on a fixed validation batch (fixed noise and timesteps) is measured every
# `adapter_eval_every` steps. Then every method generates one image per validation and test prompt from the
# same initial noise (seeded by *s*), alongside two baselines: the **English-prompt ceiling** (the scene's
# English caption) and the **random-prompt floor** (the English caption of another, random test scene).
# `paired_runs` runs the seeds in `workers` forked processes, one torch thread each.

# %%
#| slow
train_en_emb = encode_texts(text_encoder, tokenizer, train.captions["en"]).cpu()
tt_emb = encode_texts(text_encoder, tokenizer, tt_texts).cpu()
K = len(MT_SYSTEMS) + 1

def candidates(d: dict[str, list[str]]) -> torch.Tensor:
    "(n, N+1, D): the source caption and its translations by every MT system, encoded."
    return torch.stack([encode_texts(text_encoder, tokenizer, d[k]).cpu() for k in ["source"] + [s_.name for s_ in MT_SYSTEMS]], 1)

train_cands = candidates(train_texts)
adapter_images = train.images.repeat(len(TARGETS), 1, 1, 1)
_perm = {split: np.random.default_rng(seed + 5 + j).permutation(n) for j, (split, n) in enumerate((("val", n_val), ("test", n_eval)))}
_perm = {k: np.where(p == np.arange(len(p)), np.roll(p, 1), p) for k, p in _perm.items()}  # a random prompt is another scene's
splits = {}
for split, data in (("val", val), ("test", test)):
    en = encode_texts(text_encoder, tokenizer, data.captions["en"]).cpu()
    splits[split] = {"cands": candidates(texts[split]), "en": en, "random": en[_perm[split]], "scenes": data.scenes}
val_batch = torch.randperm(len(adapter_images), generator=torch.Generator().manual_seed(seed + 6))[:256]  # the adapters' fixed validation batch
ADAPTERS = {"EnsAd": dict(pooling="attention", n=3), "EnsAd no slot bias": dict(pooling="attention", n=3, use_slot_bias=False),
            "EnsAd mean-pool": dict(pooling="mean", n=3), "EnsAd N=2": dict(pooling="attention", n=2), "EnsAd N=1": dict(pooling="attention", n=1)}
SINGLE = ["Translate Train"] + [f"Translate Test ({s_.name})" for s_ in MT_SYSTEMS]
VAL_METHODS = ["English prompt (ceiling)", "random prompt (floor)", "Zero-Shot", *SINGLE, "EnsAd"]
GRID = 8  # test prompts per language kept as images for the grids

def run_seed(variant: str, s: int) -> dict:
    "Train the generator, Translate Train and the adapters of seed `s`; generate and score every method."
    torch.manual_seed(s)
    ddpm, unet = new_scheduler(), new_unet(unet_channels).to(dev)
    gen_losses = train_generator(unet, ddpm, train.images, train_en_emb, generator_steps, batch_size, seed=s)
    tt_unet = new_unet(unet_channels).to(dev); tt_unet.load_state_dict(unet.state_dict())
    tt_losses = train_generator(tt_unet, ddpm, train.images.repeat(len(TARGETS), 1, 1, 1), tt_emb, translate_train_steps, batch_size, seed=s + 1)
    adapters, curves = {}, {}
    for name, cfg in ADAPTERS.items():
        torch.manual_seed(s)
        ad = EnsembleAdapter(dim=train_cands.shape[-1], n_candidates=cfg["n"] + 1, pooling=cfg["pooling"], use_slot_bias=cfg.get("use_slot_bias", True)).to(dev)
        vi, vc = adapter_images[val_batch].to(dev), train_cands[val_batch, :cfg["n"] + 1].to(dev)
        curve = curves[name] = []
        def on_step(k, ad=ad, vi=vi, vc=vc, curve=curve):
            if k % adapter_eval_every == 0 or k == adapter_steps:
                with torch.no_grad(): curve.append((k, fixed_denoising_loss(unet, ddpm, vi, ad(vc), seed=s + 7)))
        train_adapter(ad, unet, ddpm, adapter_images, train_cands[:, :cfg["n"] + 1], adapter_steps, batch_size, seed=s + 2, on_step=on_step)
        adapters[name] = ad
    ddim = new_sampler(ddpm)
    out = {"gen_loss": [float(np.mean(gen_losses[:20])), float(np.mean(gen_losses[-20:]))], "tt_loss": [float(np.mean(tt_losses[:10])), float(np.mean(tt_losses[-10:]))],
           "adapter_curves": curves, "hits": {}, "fd": {}, "weights": {}, "grid": {}}
    for split, sp in splits.items():
        cands = sp["cands"].to(dev)
        conds = {"English prompt (ceiling)": (sp["en"], unet), "random prompt (floor)": (sp["random"], unet),
                 "Zero-Shot": (cands[:, 0], unet), "Translate Train": (cands[:, 0], tt_unet)}
        conds |= {f"Translate Test ({s_.name})": (cands[:, j + 1], unet) for j, s_ in enumerate(MT_SYSTEMS)}
        with torch.no_grad(): conds |= {name: (ad(cands[:, :ad.config.n_candidates]), unet) for name, ad in adapters.items()}
        if split == "val": conds = {m: conds[m] for m in VAL_METHODS}
        for method, (cond, g_unet) in conds.items():
            imgs = sample_images(g_unet, ddim, cond.to(dev), sample_steps, guidance_scale, torch.Generator().manual_seed(s + 10_000)).cpu()
            out["hits"][f"{split}/{method}"] = attribute_hits(classifier, imgs, sp["scenes"]).astype(int).tolist()
            if split == "test":
                out["fd"][method] = frechet_distance(fd_metric, imgs.to(dev))
                keep = np.concatenate([np.flatnonzero(lang_of["test"] == l)[:GRID] for l in TARGETS])
                out["grid"][method] = (imgs[keep] * 255).round().to(torch.uint8).tolist()
        if split == "test":
            with torch.no_grad():
                for name in ("EnsAd", "EnsAd no slot bias"):
                    w = adapters[name].weights(cands[:, :K]).cpu()
                    out["weights"][name] = {l: w[torch.from_numpy(lang_of["test"] == l)].mean(0).tolist() for l in TARGETS}
    return out

run_seeds = [seed + k for k in range(n_seeds)]
run_cfg = {k: globals()[k] for k in ("seed", "n_train", "n_val", "n_eval", "n_reference", "encoder_steps", "encoder_multilingual_fraction",
                                     "generator_steps", "translate_train_steps", "adapter_steps", "adapter_eval_every", "batch_size",
                                     "sample_steps", "guidance_scale", "unet_channels")} | {"eval_net": eval_manifest["sha256"], "version": 1}
def _report(done, total, v, s): print(f"[{clock.fields()['wall_s']:.0f}s] seed {s} done ({done}/{total})", flush=True)
R = paired_runs(run_seed, ["all methods"], run_seeds, config=run_cfg, cache_dir=cache_dir or None, workers=n_workers, progress=_report)
R = {s: R[("all methods", s)] for s in run_seeds}

# %% [markdown]
# ### Results
#
# All-five accuracy per method (mean over seeds, with the Wilson 95 % interval over the seeds x prompts
# generations, which treats them as independent), per language, and the Fréchet distance (mean over seeds),
# next to the noise floor. The English-prompt ceiling and the random-prompt floor are in every table.

# %%
#| slow
METHODS = list(R[run_seeds[0]]["fd"])
def hits(split: str, method: str) -> np.ndarray:
    "(seeds, items, 5) attribute hits."
    return np.array([R[s]["hits"][f"{split}/{method}"] for s in run_seeds], dtype=bool)
all5 = {(split, m): hits(split, m).all(-1) for split, ms in (("val", VAL_METHODS), ("test", METHODS)) for m in ms}  # (seeds, items)
fd = {m: np.array([R[s]["fd"][m] for s in run_seeds]) for m in METHODS}
rows = ["| method | all-five accuracy [Wilson 95 %] | " + " | ".join(TARGETS) + " | mean attribute accuracy | Fréchet distance (seeds: mean ± sd) |",
        "|---|---|" + "---|" * len(TARGETS) + "---|---|"]
for m in METHODS:
    a = all5[("test", m)]; w = wilson_rate(int(a.sum()), int(a.size))
    per_lang = [a[:, lang_of["test"] == l].mean() for l in TARGETS]
    rows.append(f"| {m} | {a.mean():.3f} [{w.ci[0]:.3f}, {w.ci[1]:.3f}] | " + " | ".join(f"{v:.3f}" for v in per_lang)
                + f" | {hits('test', m).mean():.3f} | {fd[m].mean():.4f} ± {fd[m].std(ddof=1):.4f} |")
rows.append(f"| real test images | {real_acc['all']:.3f} | – | – | – | {sanity['real test images']['fd']:.4f} (floor: {np.mean(floor_fd):.4f} ± {np.std(floor_fd, ddof=1):.4f}) |")
display(Markdown("\n".join(rows)))
val5 = {m: float(all5[("val", m)].mean()) for m in VAL_METHODS}
print("validation all-five accuracy:", {m: round(v, 3) for m, v in val5.items()})

# %% [markdown]
# ### The language gap and the adapters' training
#
# On validation, per seed: how much of the gap between the random-prompt floor and the English-prompt ceiling
# zero-shot transfer closes (the precondition: between 20 % and 80 %), and each adapter's fixed validation loss
# over its training (the plateau check: the share of the improvement made in the last half).

# %%
#| slow
gap = {s: (all5[("val", "Zero-Shot")][i].mean() - all5[("val", "random prompt (floor)")][i].mean())
          / max(all5[("val", "English prompt (ceiling)")][i].mean() - all5[("val", "random prompt (floor)")][i].mean(), 1e-9)
       for i, s in enumerate(run_seeds)}
prompt_gain = float(np.mean(all5[("val", "English prompt (ceiling)")]) - np.mean(all5[("val", "random prompt (floor)")]))
def late_gain(curve) -> float:
    "Share of the validation-loss improvement made in the second half of training (0: flat at the end; 1: all of it)."
    ks, ls = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
    total, late = ls[0] - ls[-1], np.interp(adapter_steps / 2, ks, ls) - ls[-1]
    return float(late / total) if total > 0 else float("nan")
late = {name: float(np.mean([late_gain(R[s]["adapter_curves"][name]) for s in run_seeds])) for name in ADAPTERS}
print("zero-shot share of the floor-to-ceiling gap closed, per seed:", {s: round(float(g), 3) for s, g in gap.items()})
print(f"English ceiling - random floor on validation: {prompt_gain:.3f}")
print("adapters: share of the validation-loss improvement in the last half (mean over seeds):", {k: round(v, 3) for k, v in late.items()})
print(f"generator loss {np.mean([R[s]['gen_loss'][0] for s in run_seeds]):.4f} -> {np.mean([R[s]['gen_loss'][1] for s in run_seeds]):.4f}")
fig, axes = plt.subplots(1, len(ADAPTERS), figsize=(3 * len(ADAPTERS), 2.6), sharey=True)
for ax, name in zip(axes, ADAPTERS):
    for s in run_seeds:
        c = np.array(R[s]["adapter_curves"][name]); ax.plot(c[:, 0], c[:, 1], marker=".", label=f"seed {s}")
    ax.set_title(f"{name}\nlate share {late[name]:.2f}", fontsize=8); ax.set_xlabel("adapter step")
axes[0].set_ylabel("fixed validation loss"); axes[0].legend(fontsize=7); plt.tight_layout(); plt.show()

# %% [markdown]
# ### Images
#
# The first eight test prompts of each language; one row per method (same initial noise in every row, so rows
# differ only through the conditioning), seed `seed`. The top row is a real image of the prompt's scene.

# %%
#| slow
GRID_METHODS = ["English prompt (ceiling)", "Zero-Shot", "Translate Train", "Translate Test (mt_a)", "Translate Test (mt_c)",
                "EnsAd", "EnsAd mean-pool", "EnsAd N=1", "random prompt (floor)"]
for j, lang in enumerate(TARGETS):
    idx = np.flatnonzero(lang_of["test"] == lang)[:GRID]
    fig, axes = plt.subplots(len(GRID_METHODS) + 1, GRID, figsize=(GRID * 0.95, 1.0 * (len(GRID_METHODS) + 1)))
    for c, i in enumerate(idx):
        axes[0, c].imshow(test.images[i].permute(1, 2, 0)); axes[0, c].set_title(textwrap.fill(texts["test"]["source"][i], 16), fontsize=4.5)
        for r, m in enumerate(GRID_METHODS):
            axes[r + 1, c].imshow(torch.tensor(R[run_seeds[0]]["grid"][m][j * GRID + c]).permute(1, 2, 0))
    for r, m in enumerate(["real"] + GRID_METHODS): axes[r, 0].set_ylabel(m, fontsize=6, rotation=0, ha="right")
    for ax in axes.flat: ax.set_xticks([]); ax.set_yticks([])
    fig.suptitle(f"{lang}: a real image of the scene (top) and one generation per method", fontsize=9); plt.tight_layout(); plt.show()


# %% [markdown]
# ### More translations, and what EnsAd learned to trust
#
# Left: all-five accuracy against the number of translations N the adapter sees (attention EnsAd), with 95 %
# bootstrap bands over prompts (seed-averaged), next to zero-shot (no translation), the best Translate Test and
# the English ceiling. Right: mean attention weight per candidate and language, with and without the per-slot
# bias (seed `seed`).

# %%
#| slow
def item_means(m: str, split: str = "test") -> np.ndarray: return all5[(split, m)].mean(0)  # seed-averaged success per prompt
def band(m: str) -> tuple[float, float, float]:
    e = paired_bootstrap(item_means(m), np.zeros(n_eval), seed=seed)
    return e.effect, *e.ci
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
ns = [1, 2, 3]; bands = np.array([band(m) for m in ("EnsAd N=1", "EnsAd N=2", "EnsAd")])
ax.plot(ns, bands[:, 0], "o-", label="EnsAd (attention)"); ax.fill_between(ns, bands[:, 1], bands[:, 2], alpha=0.3)
best_tt = max((m for m in SINGLE if m.startswith("Translate Test")), key=lambda m: val5[m])
for m, st in (("Zero-Shot", ":"), (best_tt, "--"), ("English prompt (ceiling)", "-"), ("random prompt (floor)", "-.")):
    v, lo, hi = band(m); ax.axhline(v, ls=st, color="k", lw=1, label=m); ax.axhspan(lo, hi, color="k", alpha=0.06)
ax.set_xticks(ns); ax.set_xlabel("translations N"); ax.set_ylabel("all-five accuracy (test)"); ax.legend(fontsize=7, loc="lower right")
cand_names = ["source"] + [s_.name for s_ in MT_SYSTEMS]
for v_i, (name, hatch) in enumerate((("EnsAd", ""), ("EnsAd no slot bias", "//"))):
    for j, lang in enumerate(TARGETS):
        ax2.bar(np.arange(K) + (j - 1) * 0.13 + (v_i - 0.5) * 0.42, R[run_seeds[0]]["weights"][name][lang], 0.13, color=f"C{j}", hatch=hatch,
                label=f"{lang} ({name})")
ax2.set_xticks(range(K), cand_names); ax2.set_ylabel("mean weight"); ax2.legend(fontsize=6, ncol=2); plt.tight_layout(); plt.show()
for name in ("EnsAd", "EnsAd no slot bias"):
    for lang in TARGETS: print(name, lang, {n: round(w, 3) for n, w in zip(cand_names, R[run_seeds[0]]["weights"][name][lang])})

# %% [markdown]
# ## Claim check
#
# Each claim's estimate, its baselines (the English-prompt ceiling, the random-prompt floor, zero-shot, the
# real images) and the measured preconditions, judged by the one rule of `moebook.evidence`. The best single
# translation method and the best MT system are chosen on validation, never on test.

# %%
#| slow
best_single = max(SINGLE, key=lambda m: val5[m])
seed_means = {m: all5[("test", m)].mean(1) for m in METHODS}  # (seeds,)
baselines = {f"{m} (all-five, test)": float(all5[("test", m)].mean()) for m in ("English prompt (ceiling)", "random prompt (floor)", "Zero-Shot")}
baselines |= {"real test images (all-five)": real_acc["all"], "Fréchet distance noise floor (real vs real, mean)": float(np.mean(floor_fd))}
pre = [Precondition("evaluation network: all-five accuracy on real test images", real_acc["all"], ">=", MIN_REAL_ALL5),
       Precondition("share of MT outputs with an [UNK] token (max over systems and splits)", max(unk.values()), "<=", MAX_UNK),
       Precondition("generator follows prompts: validation English ceiling - random floor", prompt_gain, ">=", MIN_PROMPT_GAIN),
       Precondition("language gap: share of the floor-to-ceiling gap zero-shot closes on validation (mean over seeds)", float(np.mean(list(gap.values()))), ">=", GAP_RANGE[0]),
       Precondition("language gap: share of the floor-to-ceiling gap zero-shot closes on validation (mean over seeds)", float(np.mean(list(gap.values()))), "<=", GAP_RANGE[1])]
def plateau(*names) -> Precondition:
    return Precondition(f"adapters trained to a plateau: share of the validation-loss gain in the last half ({', '.join(names)})",
                        max(late[n] for n in names), "<=", MAX_LATE_GAIN)
def rows_for(cid: str, treat: str, ctrl: str, pres: list, **kw) -> list[Claim]:
    "The primary bootstrap row, the seeds row and the Fréchet-distance row of one claim."
    c = dataclasses.replace(CLAIMS[cid], baselines=baselines | {f"{treat} (all-five, test)": float(all5[("test", treat)].mean()),
                                                                f"{ctrl} (all-five, test)": float(all5[("test", ctrl)].mean())}, preconditions=pres, **kw)
    out = [c.with_estimate(paired_bootstrap(item_means(treat), item_means(ctrl), seed=seed))]
    out.append(dataclasses.replace(c, id=f"{cid}s", claim=c.claim + " (paired seeds)", primary=False).with_estimate(paired_t(seed_means[treat], seed_means[ctrl])))
    if c.kind == "superiority" and np.isfinite(FD_TARGET):
        out.append(dataclasses.replace(c, id=f"{cid}f", claim=c.claim + " (Fréchet distance)", primary=False, metric="Fréchet distance to real images (normalised eval-net features)",
                                       direction="decrease", target=FD_TARGET, baselines={f"{m} (distance)": float(fd[m].mean()) for m in (treat, ctrl, "English prompt (ceiling)", "random prompt (floor)")}
                                       | {"noise floor (real vs real)": float(np.mean(floor_fd))}).with_estimate(paired_t(fd[treat], fd[ctrl])))
    return out
claims = rows_for("1", best_tt, "Zero-Shot", pre, treatment=f"{best_tt} (best MT on val)")
claims += rows_for("2", "EnsAd", best_single, pre + [plateau("EnsAd")], control=f"{best_single} (best single on val)")
if n_eval // 3 >= 100:  # per-language rows: the bootstrap is trusted from 100 prompts
    for l in TARGETS:
        mask = lang_of["test"] == l
        claims.append(dataclasses.replace(CLAIMS["2"], id=f"2-{l}", claim=f"EnsAd beats the best single-translation baseline in {l}", primary=False,
                                          control=f"{best_single} (best single on val)", preconditions=pre + [plateau("EnsAd")], baselines=baselines)
                      .with_estimate(paired_bootstrap(item_means("EnsAd")[mask], item_means(best_single)[mask], seed=seed)))
claims += rows_for("3a", "EnsAd", "EnsAd N=1", pre + [plateau("EnsAd", "EnsAd N=1")])
claims += rows_for("3b", "EnsAd", "EnsAd mean-pool", pre + [plateau("EnsAd", "EnsAd mean-pool")])
claims += rows_for("3c", "EnsAd no slot bias", "EnsAd", pre + [plateau("EnsAd", "EnsAd no slot bias")])[:1]
params = {k: globals()[k] for k in ("seed", "n_seeds", "workers") + tuple(k for k in run_cfg if k in globals())}
record_metrics(all5_test={m: float(all5[("test", m)].mean()) for m in METHODS}, all5_val=val5, fd_test={m: fd[m].tolist() for m in METHODS},
               fd_floor=floor_fd, fd_sanity=sanity, real_accuracy=real_acc, unk_rate=unk, retrieval=retrieval, retrieval_mt=retrieval_mt,
               gap_closed=gap, adapter_late_gain=late, best_single_on_val=best_single, best_translate_test_on_val=best_tt,
               ensad_weights={n: R[run_seeds[0]]["weights"][n] for n in ("EnsAd", "EnsAd no slot bias")})
records = show_claims(claims, setting=setting, seeds=run_seeds, params=params, device=str(dev), **clock.fields())
for r in records: print(f"claim {r['id']}: {r['verdict']} - {r['reason']}")

# %%
#| slow
forest_plot(records); plt.tight_layout(); plt.show()
_c = clock.fields()
print(f"experiment: {_c['wall_s']:.0f} s wall, {_c['cpu_s']:.0f} s CPU, load {_c['load']:.1f} at the start")
