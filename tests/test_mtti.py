"Package tests for moebook.mtti: data, lexicons, MT error profiles, EnsAd, pipeline round trip, FID, bad input."
import itertools, json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from moebook.mtti import (ATTRIBUTES, EN_SYNONYMS, LANGUAGES, LEXICONS, MT_SYSTEMS, TEMPLATES, CaptionedScenes, DDIMScheduler,
                          EnsembleAdapter, MTSystem, MTTIPipeline, build_tokenizer, dataset_manifest, denoising_loss,
                          fid_from_features, frechet_distance, freeze, make_dataset, mt_error_rates, new_caption_encoder,
                          new_sampler, new_scheduler, new_unet, parse_caption, realise, render_scene, sample_images, scene_dict)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data():
    return make_dataset(600, 7)


def test_dataset_is_deterministic_and_seed_dependent(data):
    again = make_dataset(600, 7)
    assert torch.equal(again.images, data.images) and np.array_equal(again.scenes, data.scenes)
    assert again.captions == data.captions
    other = make_dataset(600, 8)
    assert not torch.equal(other.images, data.images) and other.captions != data.captions
    assert data.images.shape == (600, 3, 16, 16) and 0 <= data.images.min() and data.images.max() <= 1


def test_every_attribute_value_and_template_is_used_in_every_language(data):
    for lang in LANGUAGES:
        caps = data.captions[lang]
        parsed = [parse_caption(c, lang) for c in caps]
        assert parsed == [scene_dict(s) for s in data.scenes], f"{lang}: a caption does not read back to its scene"
        for attr, values in ATTRIBUTES.items():
            assert {p[attr] for p in parsed} == set(values), f"{lang}: {attr} values missing"
        # every paraphrase of every lexicon entry occurs somewhere (word-level check)
        words = {w for c in caps for w in c.lower().split()}
        for attr, vals in LEXICONS[lang].items():
            for forms in vals.values():
                for form in forms:
                    variants = form if isinstance(form, tuple) else (form,)
                    assert any(set(v.lower().split()) <= words for v in variants), f"{lang}: form {form!r} never used"
    # the non-Latin script is really there
    assert any("\u0400" <= ch <= "\u04ff" for ch in data.captions["ru"][0])


def test_rendered_counts_and_positions():
    rng = np.random.default_rng(0)
    for row in [[1, 1, 0, 1, 3], [1, 1, 2, 0, 1]]:  # one big green square at the bottom; three small ones right
        img = render_scene(row, rng)
        green = (img[1] > 0.5) & (img[0] < 0.4) & (img[2] < 0.5)
        side = {"small": 3, "big": 5}[scene_dict(row)["size"]]
        assert abs(green.sum() - scene_dict(row)["count"] * side**2) <= 3
        if row[4] == 3: assert not green[:8].any()
        else: assert not green[:, :8].any()


@pytest.mark.parametrize("system", MT_SYSTEMS, ids=lambda s: s.name)
@pytest.mark.parametrize("lang", ["de", "es", "ru"])
def test_mt_error_rates_match_documentation(data, system, lang):
    rates, measured = system.rates(lang), mt_error_rates(data, system, lang)
    n_attr = len(data) * len(ATTRIBUTES)
    for key, n in (("drop", n_attr), ("mistranslate", n_attr), ("reorder", len(data))):
        tol = 4 * np.sqrt(rates[key] * (1 - rates[key]) / n) + 0.01  # four binomial standard errors
        assert abs(measured[key] - rates[key]) < tol, f"{system.name}/{lang} {key}: measured {measured[key]:.3f}, documented {rates[key]:.3f}"


def test_mt_synonyms_and_word_order_errors_show_up(data):
    caps = data.captions["de"][:300]
    syn = {w for (a, v), f in EN_SYNONYMS.items() for w in (f if isinstance(f, tuple) else (f,)) for w in w.split()} - {"a", "of", "to", "the"}
    for system in MT_SYSTEMS:
        outs = [system.translate(c, "de", return_errors=True) for c in caps]
        n_syn = sum(e == "synonym" for _, ev in outs for e, _ in ev) / (len(caps) * len(ATTRIBUTES))
        assert abs(n_syn - system.synonym * (1 - system.rates("de")["drop"])) < 0.04
        assert sum(any(w in syn for w in o.split()) for o, _ in outs) > 0
    # systems disagree with each other on the same captions, and each is deterministic
    trans = [[s.translate(c, "de") for c in caps] for s in MT_SYSTEMS]
    for i, j in itertools.combinations(range(len(MT_SYSTEMS)), 2):  # every pair, not only neighbours
        differ = sum(a != b for a, b in zip(trans[i], trans[j]))
        assert differ > 0.1 * len(caps), f"{MT_SYSTEMS[i].name} and {MT_SYSTEMS[j].name} differ on only {differ} captions"
    assert trans[0] == [MT_SYSTEMS[0].translate(c, "de") for c in caps]


def test_ensad_weights_are_softmax_and_only_adapter_trains():
    torch.manual_seed(0)
    ad = EnsembleAdapter(dim=64, n_candidates=4)
    with torch.no_grad():
        for p in (ad.query.weight, ad.key.weight, ad.slot_bias): p.normal_()
    cand = F.normalize(torch.randn(6, 4, 64), dim=-1)
    # reference: torch's scaled dot-product attention, the source caption as the one query, the slot bias as the mask
    q, k, bias = ad.query(cand[:, :1]), ad.key(cand), ad.slot_bias.expand(1, 4)
    want_w = F.scaled_dot_product_attention(q, k, torch.eye(4).expand(6, 4, 4), attn_mask=bias)[:, 0]  # values one-hot
    want_pooled = F.scaled_dot_product_attention(q, k, cand, attn_mask=bias)[:, 0]
    torch.testing.assert_close(ad.weights(cand), want_w)
    torch.testing.assert_close(ad(cand), want_pooled + ad.mlp(want_pooled))
    unet, enc = new_unet(16), new_caption_encoder(20)
    freeze(unet, enc)
    loss = denoising_loss(unet, new_scheduler(), torch.rand(6, 3, 16, 16), ad(cand), torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is None for p in [*unet.parameters(), *enc.parameters()])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [ad.query.weight, ad.key.weight, ad.slot_bias, ad.mlp[2].weight])
    mean = EnsembleAdapter(n_candidates=4, pooling="mean")
    torch.testing.assert_close(mean.weights(cand), torch.full((6, 4), 0.25))


def _tiny_pipeline():
    torch.manual_seed(0)
    d = make_dataset(40, 0)
    tok = build_tokenizer([c for cs in d.captions.values() for c in cs])
    ddim = new_sampler(new_scheduler())
    ad = EnsembleAdapter(n_candidates=4)
    with torch.no_grad():
        for p in ad.parameters(): p.normal_(0, 0.2)
    pipe = MTTIPipeline(new_unet(16), ddim, new_caption_encoder(len(tok)), tok, ad)
    pipe.set_progress_bar_config(disable=True)
    return pipe, d


@pytest.mark.slow
def test_pipeline_save_load_round_trip(tmp_path):
    pipe, d = _tiny_pipeline()
    prompts = d.captions["es"][:3]
    kw = dict(language="es", num_inference_steps=3, output_type="np")
    a = pipe(prompts, generator=torch.Generator().manual_seed(3), **kw).images
    assert a.shape == (3, 16, 16, 3)
    pipe.save_pretrained(tmp_path / "p")
    loaded = MTTIPipeline.from_pretrained(tmp_path / "p"); loaded.set_progress_bar_config(disable=True)
    b = loaded(prompts, generator=torch.Generator().manual_seed(3), **kw).images
    np.testing.assert_array_equal(a, b)
    c = loaded(prompts, generator=torch.Generator().manual_seed(4), **kw).images
    assert not np.array_equal(a, c)
    assert loaded.mt_systems == pipe.mt_systems
    _, w = loaded.encode_prompts(prompts, "es")
    torch.testing.assert_close(w.sum(-1), torch.ones(3))
    assert len(loaded(d.captions["ru"][0], language="ru", num_inference_steps=2, output_type="pil").images) == 1


def test_frechet_distance_known_gaussians():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(4, 4)); S = A @ A.T + np.eye(4)
    # equal covariances: only the mean term remains
    assert frechet_distance(np.zeros(4), S, np.ones(4), S) == pytest.approx(4.0, abs=1e-6)
    # isotropic: ||mu||^2 + d (s1 + s2 - 2 sqrt(s1 s2))
    assert frechet_distance(np.zeros(3), np.eye(3), np.full(3, 2.0), 9 * np.eye(3)) == pytest.approx(12 + 3 * (1 + 9 - 6), abs=1e-8)
    # sample version converges to the closed form
    x, y = rng.normal(size=(20000, 2)), rng.normal(size=(20000, 2)) * 2 + 1
    assert fid_from_features(x, y) == pytest.approx(2 + 2 * (1 + 4 - 4), abs=0.1)


def test_bad_inputs_raise_clear_errors():
    pipe, d = _tiny_pipeline()
    with pytest.raises(ValueError, match="unknown language 'fr'"): pipe("un cercle", language="fr")
    with pytest.raises(ValueError, match="unknown language"): realise(scene_dict([0] * 5), "xx", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown language"): MT_SYSTEMS[0].translate("zwei", "klingon")
    with pytest.raises(TypeError, match="prompt must be"): pipe([1, 2], language="de")
    with pytest.raises(ValueError, match=r"candidates must be \(B, 4, 64\)"): pipe.adapter(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="must be a \\(B, 3, 16, 16\\)"): denoising_loss(pipe.unet, new_scheduler(), torch.rand(2, 3, 8, 8), torch.randn(2, 64))
    with pytest.raises(ValueError, match="cond must be"): sample_images(pipe.unet, pipe.scheduler, torch.randn(64))
    with pytest.raises(ValueError, match="shape mismatch"): frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(3))
    with pytest.raises(ValueError, match="feature arrays"): fid_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="adapter expects 3 translations"): MTTIPipeline(pipe.unet, pipe.scheduler, pipe.text_encoder, pipe.tokenizer, pipe.adapter, MT_SYSTEMS[:2])
    with pytest.raises(FileNotFoundError, match="mtti_pipeline.json"): MTTIPipeline.from_pretrained("/nonexistent/dir")
    with pytest.raises(ValueError, match="n must be a positive int"): make_dataset(0, 0)


@pytest.mark.slow
def test_manifest_matches_generator():
    committed = json.loads((ROOT / "data" / "mtti_manifest.json").read_text())
    fresh = json.loads(json.dumps(dataset_manifest(committed["n_scenes"], committed["seed"]), ensure_ascii=False))
    assert fresh == committed, "data/mtti_manifest.json is stale: regenerate it with moebook.mtti.write_manifest"
