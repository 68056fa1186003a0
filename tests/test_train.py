"""Decoder training (both modes), checkpoints, exact resume, the feature cache and per-image adaptation."""
import json

import numpy as np
import pytest
import torch

import rfm
from rfm import train as train_module
from rfm.cli import main
from rfm.data import load_image, voc_samples
from rfm.decoder import Decoder, load_decoder
from rfm.params import RefineParams
from rfm.text import VOC
from rfm.params import TrainConfig
from rfm.pipeline import decoder_loss
from rfm.train import FeatureCache, augment, batch_indices, exact_view, step_generator, train
from rfm.text import vocabulary_features

PARAMS = RefineParams(n0=2, static_layers=3, par_iterations=3)
TINY = dict(batch_size=2, crop=96, embed_dim=32, decoder_layers=1, cache_side=128, warmup_steps=2)


@pytest.fixture(scope="module")
def samples(voc_mini):
    return voc_samples(voc_mini, labels_from="mask")[:4]


def _weights(decoder):
    return {k: v.detach().clone() for k, v in decoder.state_dict().items()}


def _fixed_views(clip, samples, config, cache=None):
    text = vocabulary_features(clip, VOC)
    gen = step_generator(123, 0)
    return [cache.view(s, config, gen) if cache else exact_view(clip, s, text, config, gen) for s in samples]


@pytest.mark.parametrize("cached", [True, False])
def test_training_lowers_the_loss_on_fixed_views(cached, small_clip, samples, tmp_path):
    # static pseudo labels throughout (switch after the last step): the labels do not move with the decoder,
    # so the loss before and after training is measured against the same targets
    config = TrainConfig(steps=16, switch_step=16, cache_features=cached, **TINY)
    torch.manual_seed(0)
    start = Decoder(width=128, num_blocks=3, embed_dim=32, layers=1)
    cache = FeatureCache(tmp_path / "out" / "feature_cache", small_clip, VOC, config.cache_side, "") if cached else None
    if cache:
        cache.build(samples, progress=False)
    views = _fixed_views(small_clip, samples, config, cache)
    with torch.no_grad():
        before, _ = decoder_loss(start.eval(), views, PARAMS, False, 8)
    trained = train(samples, small_clip, VOC, PARAMS, config, tmp_path / "out", decoder=start, progress=False)
    with torch.no_grad():
        after, _ = decoder_loss(trained.eval(), views, PARAMS, False, 8)
    assert float(after) < 0.8 * float(before), (float(before), float(after))
    rows = (tmp_path / "out" / "log.csv").read_text().splitlines()
    assert len(rows) == 17 and rows[0].startswith("step,loss,seg,aff,lr,kept_fraction,rfm,seconds")
    assert (tmp_path / "out" / "losses.png").read_bytes()[:4] == b"\x89PNG"


def test_checkpoint_round_trip_and_use_in_export(small_clip, samples, tmp_path, voc_mini, capsys):
    config = TrainConfig(steps=4, cache_features=True, **TINY)
    trained = train(samples, small_clip, VOC, PARAMS, config, tmp_path / "run", progress=False)
    loaded = load_decoder(tmp_path / "run" / "decoder.safetensors")
    for key, value in trained.state_dict().items():
        assert torch.equal(value.cpu(), loaded.state_dict()[key]), key
    meta = json.loads((tmp_path / "run" / "decoder.json").read_text())
    assert meta["config"]["num_blocks"] == 3 and meta["config"]["num_classes"] == 21
    # the trained decoder drives RFM in the library and in `rfm export`
    p = rfm.Predictor(small_clip, decoder=loaded, device="cpu", max_side=128)
    p.set_image(load_image(samples[0].image), labels=list(samples[0].labels))
    assert p.refine(PARAMS).cam_rfm is not None
    torch.save(rfm.backbone.random_clip_state_dict(seed=0, width=128, layers=4, embed_dim=64, text_width=64,
                                                  text_layers=1), tmp_path / "clip.pt")
    code = main(["export", "--voc", str(voc_mini), "--labels-from", "mask", "--out", str(tmp_path / "pl"),
                         "--clip", str(tmp_path / "clip.pt"), "--decoder", str(tmp_path / "run" / "decoder.safetensors"),
                         "--n0", "2", "--static-layers", "3", "--max-side", "128", "--workers", "0"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "pl" / "summary.json").read_text())["done"] == 11


def test_resume_continues_the_same_trajectory(small_clip, samples, tmp_path, monkeypatch):
    config = TrainConfig(steps=8, save_every=3, switch_step=4, cache_features=True, **TINY)
    reference = train(samples, small_clip, VOC, PARAMS, config, tmp_path / "a", progress=False)

    calls = {"n": 0}
    original = train_module.decoder_step

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # after the checkpoint of step 3, in the middle of the run
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "decoder_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(samples, small_clip, VOC, PARAMS, config, tmp_path / "b", progress=False)
    monkeypatch.setattr(train_module, "decoder_step", original)
    with pytest.raises(FileExistsError, match="--resume"):
        train(samples, small_clip, VOC, PARAMS, config, tmp_path / "b", progress=False)
    other = TrainConfig(steps=8, save_every=3, switch_step=4, cache_features=True, **{**TINY, "crop": 64})
    with pytest.raises(ValueError, match="other settings"):
        train(samples, small_clip, VOC, PARAMS, other, tmp_path / "b", resume=True, progress=False)
    resumed = train(samples, small_clip, VOC, PARAMS, config, tmp_path / "b", resume=True, progress=False)
    for key, value in reference.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[key], atol=1e-6), key
    log_a = (tmp_path / "a" / "log.csv").read_text().splitlines()
    log_b = (tmp_path / "b" / "log.csv").read_text().splitlines()
    assert [r.split(",")[:3] for r in log_a] == [r.split(",")[:3] for r in log_b]  # step, loss, seg


def test_cached_view_is_a_consistent_crop_and_flip(small_clip, samples, tmp_path):
    config = TrainConfig(steps=1, **TINY)
    cache = FeatureCache(tmp_path, small_clip, VOC, 128, "")
    cache.build(samples[:1], progress=False)
    full = {k: np.load(tmp_path / f"{samples[0].stem}.{k}.npy") for k in ("tokens", "attn", "cams", "image")}
    _, h, w = full["cams"].shape
    seen_flip = set()
    for seed in range(12):
        gen = step_generator(seed, 0)
        view = cache.view(samples[0], config, gen)
        ch, cw = view.grid
        assert (ch, cw) == (min(h, 6), min(w, 6))
        # find the window: the view's CAM is a (possibly mirrored) block of the full CAM
        matches = [(r, c, f) for r in range(h - ch + 1) for c in range(w - cw + 1) for f in (False, True)
                   if np.array_equal(full["cams"][:, r:r + ch, c:c + cw][:, :, ::-1 if f else 1], view.cams.numpy())]
        assert matches, "the CAM view is not a crop of the cached CAM"
        r, c, flip = matches[0]
        seen_flip.add(flip)
        cols = np.arange(c, c + cw)[::-1] if flip else np.arange(c, c + cw)
        idx = (np.arange(r, r + ch)[:, None] * w + cols).ravel()
        np.testing.assert_array_equal(view.patch_tokens[:, 0].numpy(), full["tokens"][:, idx].astype(np.float32))
        np.testing.assert_array_equal(view.attn.numpy(), full["attn"][:, idx][:, :, idx].astype(np.float32))
        pixels = full["image"][r * 16:(r + ch) * 16, c * 16:(c + cw) * 16]
        np.testing.assert_array_equal(view.work_image, pixels[:, ::-1] if flip else pixels)
    assert seen_flip == {False, True}


def test_augment_and_batch_order():
    image = np.full((40, 60, 3), 200, np.uint8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(10):
        crop, valid = augment(image, 96, (0.5, 2.0), gen)
        assert crop.shape == (96, 96, 3) and valid.shape == (96, 96)
        assert (crop[~valid] == 0).all() and (crop[valid] > 0).all()
    order = [i for step in range(3) for i in batch_indices(7, step, 2, 3)]  # 2 epochs of 3 samples
    assert sorted(order[:3]) == [0, 1, 2] and sorted(order[3:]) == [0, 1, 2]
    assert batch_indices(7, 2, 2, 3) == batch_indices(7, 2, 2, 3)


def test_adapt_decoder_fits_the_image_and_replays(small_clip, samples):
    shared = Decoder(width=128, num_blocks=3, embed_dim=32, layers=1).eval()
    before = _weights(shared)
    p = rfm.Predictor(small_clip, decoder=shared, device="cpu", max_side=128)
    p.set_image(load_image(samples[0].image), labels=list(samples[0].labels))
    before_row = p.attention_rows(0, 0).decoder  # A_f row of patch 0 with the shared decoder
    progress = []
    history = p.adapt_decoder(steps=12, params=PARAMS, switch_step=12, snapshot_every=4,
                              callback=lambda step, total, losses: progress.append((step, total, losses["total"])))
    assert [s.step for s in history] == [0, 4, 8, 12] and [x[0] for x in progress] == list(range(1, 13))
    gh, gw = before_row.shape
    assert history[0].losses == {}
    np.testing.assert_allclose(history[0].aff_f[0].reshape(gh, gw).numpy(), before_row)  # step 0 = before
    assert progress[-1][2] < progress[0][2]
    assert all(torch.equal(v, shared.state_dict()[k]) for k, v in before.items())  # the shared decoder is untouched
    assert p.decoder is not shared
    final = p.refine(PARAMS).patch.cam_rfm
    p.show_snapshot(history[1])
    early = p.refine(PARAMS).patch.cam_rfm
    assert not np.allclose(final, early)
    p.show_snapshot(history[-1])
    np.testing.assert_allclose(p.refine(PARAMS).patch.cam_rfm, final, atol=1e-6)
    fresh = rfm.Predictor(small_clip, device="cpu", max_side=128)  # no decoder: adaptation starts a new one
    fresh.set_image(load_image(samples[1].image), labels=list(samples[1].labels))
    fresh_history = fresh.adapt_decoder(steps=2, params=PARAMS)
    assert fresh.refine(PARAMS).cam_rfm is not None
    fresh.show_snapshot(fresh_history[0])  # before: there was no decoder, so no RFM
    assert fresh.refine(PARAMS).cam_rfm is None
    with pytest.raises(ValueError, match="another image"):
        fresh.show_snapshot(history[1])


def test_trained_decoder_loads_in_the_app(small_clip, samples, tmp_path, weight_files):
    from rfm.ui import Models

    train(samples, small_clip, VOC, PARAMS, TrainConfig(steps=2, cache_features=True, **TINY), tmp_path / "run",
          progress=False)
    models = Models.load(clip=str(weight_files / "clip.pt"), decoder=str(tmp_path / "run" / "decoder.safetensors"),
                         device="cpu")
    assert models.error is None and models.decoder is not None
    p = rfm.Predictor(models.clip, decoder=models.decoder, device="cpu", max_side=128)
    p.set_image(load_image(samples[0].image), labels=list(samples[0].labels))
    assert np.isfinite(p.refine(PARAMS).layer_scores[1:]).all()
