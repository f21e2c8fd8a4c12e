"Package tests for moebook.mtti: data, lexicons, MT error profiles, EnsAd, pipeline round trip, the metrics, bad input."
import itertools, json, socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import scipy.linalg
from moebook.mtti import (ATTRIBUTES, EN_SYNONYMS, EVAL_DATA_SEED, LANGUAGES, LEXICONS, MT_SYSTEMS, TEMPLATES, CaptionedScenes,
                          DDIMScheduler, EnsembleAdapter, EvalFeatures, MTSystem, MTTIPipeline, attribute_accuracy, build_tokenizer,
                          dataset_manifest, denoising_loss, eval_dir, frechet_distance, frechet_metric, freeze, load_eval_network,
                          make_dataset, mt_error_rates, new_caption_encoder, new_sampler, new_scheduler, new_unet, parse_caption, realise,
                          render_scene, sample_images, scene_dict, train_eval_network, unk_rate)

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


class _Passthrough(torch.nn.Module):
    "A 'feature extractor' that hands the metric its input rows: the features are what we sample."
    num_features = 4
    def forward(self, x): return x.double()


def _scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    "The reference formula with scipy's matrix square root, from two samples."
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real))


def test_torchmetrics_frechet_matches_scipy_offline(monkeypatch):
    def no_network(*a, **k): raise OSError("network blocked by the test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g)
    x, y = torch.randn(5000, 4, generator=g), torch.randn(5000, 4, generator=g) @ A + torch.tensor([1.0, -2.0, 0.0, 0.5])
    metric = frechet_metric(_Passthrough())
    metric.update(x, real=True); metric.update(y, real=False)
    got = float(metric.compute())
    assert got == pytest.approx(_scipy_frechet(x.double().numpy(), y.double().numpy()), rel=1e-6)
    # and the population value of the two known Gaussians: N(0, I) vs N(m, A^T A)
    S = (A.T @ A).double().numpy()
    closed = 1 + 4 + 0 + 0.25 + 4 + np.trace(S) - 2 * np.trace(scipy.linalg.sqrtm(S).real)
    assert got == pytest.approx(closed, rel=0.05)
    # reset keeps the real statistics: the same fake sample gives the same distance
    metric.reset(); metric.update(y, real=False)
    assert float(metric.compute()) == pytest.approx(got, rel=1e-9)


@pytest.fixture(scope="module")
def eval_net():
    return load_eval_network()


def test_committed_eval_network_matches_its_manifest_and_reads_real_images(eval_net):
    clf, man = eval_net
    assert man["data_seed"] == EVAL_DATA_SEED and man["command"] and man["commit"]
    assert (eval_dir() / man["file"]).stat().st_size < 1_000_000
    real = make_dataset(1000, 5)  # a seed the experiments use: images disjoint from the network's training images
    acc = attribute_accuracy(clf, real.images, real.scenes)
    assert acc["all"] >= 0.85 and acc["colour"] > 0.98, acc


def test_metrics_move_the_right_way_under_blur_and_attribute_swap(eval_net):
    clf, _ = eval_net
    metric = frechet_metric(EvalFeatures(clf))
    metric.update(make_dataset(1000, 20).images, real=True)
    real = make_dataset(500, 21)
    floor = [frechet_distance(metric, make_dataset(500, 22 + k).images) for k in range(3)]
    blurred = F.avg_pool2d(F.pad(real.images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    swapped_scenes = real.scenes.copy(); swapped_scenes[:, 0] = (swapped_scenes[:, 0] + 1) % 4  # every colour shifted by one
    rng = np.random.default_rng(0)
    swapped = torch.from_numpy(np.stack([render_scene(r, rng) for r in swapped_scenes]))
    acc_real, acc_blur, acc_swap = (attribute_accuracy(clf, x, real.scenes)["all"] for x in (real.images, blurred, swapped))
    fd_real, fd_blur, fd_swap = (frechet_distance(metric, x) for x in (real.images, blurred, swapped))
    spread = max(floor) - min(floor) + 1e-9
    assert fd_real <= max(floor) + spread, (fd_real, floor)
    assert fd_blur > max(floor) + 5 * spread, (fd_blur, floor)
    assert acc_blur <= acc_real
    assert acc_swap < 0.05 < acc_real - 0.5, (acc_swap, acc_real)  # every colour is wrong
    # a swap that changes which colours occur (every red drawn blue) moves the distribution
    red_blue = real.scenes.copy(); red_blue[red_blue[:, 0] == 0, 0] = 2
    shifted = torch.from_numpy(np.stack([render_scene(r, rng) for r in red_blue]))
    assert frechet_distance(metric, shifted) > max(floor) + 5 * spread


@pytest.mark.retrain
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_retraining_the_eval_network_reproduces_the_committed_one(eval_net):
    committed, man = eval_net
    torch.set_num_threads(man["torch_threads"])
    clf, _ = train_eval_network(man["n_images"], man["steps"], man["batch"], man["seed"])
    for (k, a), b in zip(committed.state_dict().items(), clf.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-3, msg=k)
    held = make_dataset(man["heldout"]["n"], man["heldout"]["data_seed"])
    assert attribute_accuracy(clf, held.images, held.scenes)["all"] == pytest.approx(man["heldout"]["accuracy"]["all"], abs=0.01)


def test_machine_translations_hit_no_unknown_words(data):
    tok = build_tokenizer([c for cs in data.captions.values() for c in cs])
    other = make_dataset(300, 99)
    for system in MT_SYSTEMS:
        for lang in ("de", "es", "ru"):
            outs = [system.translate(c, lang) for c in other.captions[lang]]
            assert unk_rate(tok, outs) == 0.0, (system.name, lang)
    # the reference: a text has an unknown word iff one of its lower-cased words is outside the vocabulary
    vocab = set(tok.get_vocab())
    texts = ["two crimson rings to the west", "zwei blaue Kreise", "three purple hexagons", "ein kleiner roter Kreis oben"]
    want = np.mean([any(w.lower() not in vocab for w in t.split()) for t in texts])
    assert unk_rate(tok, texts) == want == 0.25


def test_adapter_without_slot_bias_weighs_by_content_only():
    torch.manual_seed(0)
    ad = EnsembleAdapter(dim=64, n_candidates=4, use_slot_bias=False)
    with torch.no_grad(): ad.query.weight.normal_(); ad.key.weight.normal_()
    cand = F.normalize(torch.randn(6, 4, 64), dim=-1)
    want = F.scaled_dot_product_attention(ad.query(cand[:, :1]), ad.key(cand), torch.eye(4).expand(6, 4, 4))[:, 0]
    torch.testing.assert_close(ad.weights(cand), want)
    assert ad.slot_bias is None and "slot_bias" not in dict(ad.named_parameters())
    perm = cand[:, [0, 2, 1, 3]]  # swapping two translations swaps their weights: no slot carries a prior
    torch.testing.assert_close(ad.weights(perm), ad.weights(cand)[:, [0, 2, 1, 3]])


def test_bad_inputs_raise_clear_errors():
    pipe, d = _tiny_pipeline()
    with pytest.raises(ValueError, match="unknown language 'fr'"): pipe("un cercle", language="fr")
    with pytest.raises(ValueError, match="unknown language"): realise(scene_dict([0] * 5), "xx", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown language"): MT_SYSTEMS[0].translate("zwei", "klingon")
    with pytest.raises(TypeError, match="prompt must be"): pipe([1, 2], language="de")
    with pytest.raises(ValueError, match=r"candidates must be \(B, 4, 64\)"): pipe.adapter(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match="must be a \\(B, 3, 16, 16\\)"): denoising_loss(pipe.unet, new_scheduler(), torch.rand(2, 3, 8, 8), torch.randn(2, 64))
    with pytest.raises(ValueError, match="cond must be"): sample_images(pipe.unet, pipe.scheduler, torch.randn(64))
    with pytest.raises(ValueError, match="must be a \\(B, 3, 16, 16\\)"): frechet_distance(frechet_metric(_Passthrough()), torch.rand(4, 3, 8, 8))
    with pytest.raises(FileNotFoundError, match="manifest.json missing"): load_eval_network("/nonexistent/dir")
    with pytest.raises(ValueError, match="adapter expects 3 translations"): MTTIPipeline(pipe.unet, pipe.scheduler, pipe.text_encoder, pipe.tokenizer, pipe.adapter, MT_SYSTEMS[:2])
    with pytest.raises(FileNotFoundError, match="mtti_pipeline.json"): MTTIPipeline.from_pretrained("/nonexistent/dir")
    with pytest.raises(ValueError, match="n must be a positive int"): make_dataset(0, 0)


@pytest.mark.slow
def test_manifest_matches_generator():
    committed = json.loads((ROOT / "data" / "mtti_manifest.json").read_text())
    fresh = json.loads(json.dumps(dataset_manifest(committed["n_scenes"], committed["seed"]), ensure_ascii=False))
    assert fresh == committed, "data/mtti_manifest.json is stale: regenerate it with moebook.mtti.write_manifest"
