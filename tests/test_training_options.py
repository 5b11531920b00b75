"""Every training option of the seed config, as unit tests of the loop's parts (one run with all of them on is
test_s3.py's training run)."""

import math

import numpy as np
import pytest
import torch

from gunsound.augment import colour, mixup, spec_augment
from gunsound.config import load_config
from gunsound.model import build_model
from gunsound.optim import lr_lambda, make_optimizer
from gunsound.train_loop import LoopSettings, loss_fn
from gunsound.worker_data import load_shard, shuffled_batches
from tests.conftest import LAPTOP_CONFIG, SEED_CONFIG


def cfg_with(*overrides):
    return load_config(SEED_CONFIG, list(overrides))


def test_differential_learning_rate_for_listed_layers():
    model = build_model(load_config(LAPTOP_CONFIG).architecture, 9)
    opt = make_optimizer(model, kind="AdamW", learning_rate=0.01, differential_layers=["backbone"],
                         differential_learning_rate=0.001)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.001]
    head = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in opt.param_groups[0]["params"]} == head
    assert isinstance(opt, torch.optim.AdamW)
    assert len(make_optimizer(model, kind="AdamW", learning_rate=0.01).param_groups) == 1  # no layers: one rate
    assert isinstance(make_optimizer(model, kind="SGD", learning_rate=0.01), torch.optim.SGD)


def test_warmup_then_cosine_schedule():
    f = lr_lambda(epochs=4, steps_per_epoch=10, warmup_epochs=1, schedule="Cosine")
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(25) == pytest.approx(0.5, abs=0.03)
    assert f(40) == pytest.approx(0.0, abs=1e-9)
    assert lr_lambda(epochs=5, steps_per_epoch=10, schedule="Constant")(30) == 1.0
    assert lr_lambda(epochs=2, steps_per_epoch=10, schedule="Linear")(10) == pytest.approx(0.5)


def test_time_and_frequency_masks():
    x = torch.randn(8, 1, 32, 50)
    assert torch.equal(spec_augment(x, time_mask_frames=0, frequency_mask_bins=0), x)  # widths 0: off
    torch.manual_seed(0)
    masked = spec_augment(x, time_mask_frames=10, frequency_mask_bins=6)
    changed = masked != x
    assert changed.any()
    for clip in changed[:, 0]:
        rows, cols = clip.all(dim=1), clip.all(dim=0)  # fully masked mel bins and frames
        assert rows.sum() <= 6 and cols.sum() <= 10


def test_mixup_mixes_power_and_targets():
    x = torch.log(torch.rand(6, 1, 8, 10) + 0.1)
    y = torch.eye(3)[[0, 1, 2, 0, 1, 2]]
    on = {"iterations": 1, "probability": 1.0, "concentration": 1.0, "target": "Ratio"}
    assert mixup(x, y, **{**on, "iterations": 0})[0] is x  # 0 iterations: off
    torch.manual_seed(1)
    np.random.seed(1)
    mx, my = mixup(x, y, **on)
    assert torch.allclose(my.sum(dim=1), torch.ones(6))  # Ratio targets stay a distribution
    lam = my.max(dim=1).values.min().item()
    assert 0 < lam <= 1
    assert torch.allclose(mx.amax(dim=(-2, -1)), x.amax(dim=(-2, -1)), atol=1.0)  # each mix keeps its first clip's level
    _, ymax = mixup(x, y, **{**on, "target": "Max"})
    assert set(ymax.unique().tolist()) <= {0.0, 1.0}
    never = mixup(x, y, **{**on, "probability": 0.0})
    assert torch.equal(never[0], x)


def test_mixup_hears_both_sources_at_the_ratio_whatever_their_recorded_levels(monkeypatch):
    """A clip recorded 40 dB quieter, mixed in at 0.3: its cells hold 0.3 of the first clip's peak power, as its
    share of the target says (mixed as recorded, it would be 40 dB under the first clip and not heard)."""
    silent = math.log(1e-8)
    loud = torch.full((1, 1, 4, 6), silent)
    loud[..., :2, :] = 0.0  # power 1 in the low bands
    quiet = torch.full((1, 1, 4, 6), silent)
    quiet[..., 2:, :] = math.log(1e-4)  # 40 dB down, in the high bands
    monkeypatch.setattr(np.random, "beta", lambda *_: 0.7)
    monkeypatch.setattr(torch, "randperm", lambda n, device=None: torch.tensor([1, 0]))
    mx, my = mixup(torch.cat([loud, quiet]), torch.eye(2), iterations=1, probability=1.0, concentration=1.0,
                   target="Ratio")
    assert torch.allclose(mx[0, 0, :2], torch.full((2, 6), math.log(0.7)), atol=1e-3)
    assert torch.allclose(mx[0, 0, 2:], torch.full((2, 6), math.log(0.3)), atol=1e-3)
    assert torch.allclose(my[0], torch.tensor([0.7, 0.3]))


def test_colouring_is_a_smooth_curve_over_the_bands_within_its_limit():
    x = torch.zeros(64, 1, 32, 5)
    assert colour(x, max_db=0) is x  # 0: off
    torch.manual_seed(0)
    gain_db = colour(x, max_db=9.0)[:, 0] * 10 / math.log(10)
    assert torch.equal(gain_db, gain_db[..., :1].expand_as(gain_db))  # one gain per band, the same in every frame
    curves = gain_db[..., 0]
    assert curves.abs().max() <= 9.0 + 1e-4 and curves.abs().amax(dim=1).max() > 6.0
    assert curves.std(dim=0).min() > 0.5  # each clip its own curve
    # Smooth: from one band to the next no steeper than the highest cosine would be at the full 9 dB.
    assert curves.diff(dim=1).abs().max() < 9.0 * 3 * math.pi / 31


def test_loop_settings_carry_the_config_as_plain_values_and_pickle():
    import pickle

    cfg = cfg_with("augmentation.mix_audio=Mixup", "augmentation.mix_iterations=2", "training.evaluation_epochs=2",
                   "training.differential_learning_rate_layers=[backbone]", "augmentation.time_mask_frames=8")
    s = LoopSettings.from_config(cfg, classes=["a", "b"], fold_dir="/tmp/fold_0", optimizer_steps_per_epoch=7,
                                 cache_shards=True)
    assert s.classes == ("a", "b") and s.differential_layers == ("backbone",) and s.optimizer_steps_per_epoch == 7
    assert s.mix_iterations == 2 and s.evaluate_every == 2 and s.time_mask_frames == 8 and s.cache_shards
    assert (s.normalize, s.relative_to_peak) == (False, False) and s.colouring_db == 0  # the seed: 'No', no colouring
    peak = LoopSettings.from_config(cfg_with("audio.spectrogram_normalization=Peak", "augmentation.colouring_db=6"),
                                    classes=["a"], fold_dir="f", optimizer_steps_per_epoch=1)
    assert (peak.normalize, peak.relative_to_peak, peak.colouring_db) == (False, True, 6.0)
    assert s.epochs == cfg.training.epochs and s.architecture == cfg.architecture and s.run_dir is None
    assert pickle.loads(pickle.dumps(s)) == s  # Ray sends it to every worker
    assert LoopSettings.from_config(cfg_with(), classes=["a"], fold_dir="f",
                                    optimizer_steps_per_epoch=1).mix_iterations == 0  # Disabled in the seed
    with pytest.raises(AttributeError):
        s.epochs = 3  # frozen


def test_losses():
    logits, targets = torch.tensor([[2.0, -1.0]]), torch.tensor([[1.0, 0.0]])
    assert loss_fn(logits, targets, "BCE").item() == pytest.approx(
        -(math.log(1 / (1 + math.exp(-2))) + math.log(1 - 1 / (1 + math.exp(1)))) / 2)
    assert loss_fn(logits, targets, "CrossEntropy").item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + math.exp(-1))))


def test_in_memory_shard_gives_every_clip_once_per_epoch_in_a_new_order():
    n = 10
    arrays = {"features": np.arange(n, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32),
              "target": np.eye(n, dtype=np.float32)}
    epoch = list(shuffled_batches(arrays, 4, drop_last=False, seed=1))
    assert [len(b["target"]) for b in epoch] == [4, 4, 2]
    labels = torch.cat([b["target"].argmax(1) for b in epoch])
    assert sorted(labels.tolist()) == list(range(n))
    assert all(torch.equal(b["features"][:, 0, 0], b["target"].argmax(1).float()) for b in epoch)  # rows kept whole
    assert [len(b["target"]) for b in shuffled_batches(arrays, 4, drop_last=True, seed=1)] == [4, 4]

    def order(seed):
        return torch.cat([b["target"].argmax(1) for b in shuffled_batches(arrays, 2, False, seed)]).tolist()
    assert order(1) == order(1) and order(1) != order(2)


@pytest.mark.ray
def test_load_shard_reads_a_dataset_into_arrays(ray_local):
    import ray.data

    ds = ray.data.from_items([{"features": np.full((2, 3), i, np.float32), "target": np.eye(4, dtype=np.float32)[i % 4]}
                              for i in range(70)], override_num_blocks=3)
    arrays = load_shard(ds, ["features", "target"])
    assert arrays["features"].shape == (70, 2, 3) and arrays["target"].shape == (70, 4)
    assert sorted(arrays["features"][:, 0, 0].tolist()) == list(range(70))
    with pytest.raises(RuntimeError, match="empty"):
        load_shard(ds.filter(lambda row: False), ["features", "target"])


def test_a_training_rerun_that_changes_how_validation_is_computed_is_refused():
    """`environment.mixed_precision_inference` decides the precision of validation on a GPU, so the folds'
    predictions and the best epoch: a rerun that flips it would pool folds predicted differently. How many CPUs
    a worker holds changes nothing and resumes."""
    import pandas as pd

    from gunsound import fingerprint
    from tests.conftest import LAPTOP_CONFIG

    manifest = pd.DataFrame({"row": [0], "path": ["a.wav"], "label": ["x"], "fold": [0]})

    def made(*overrides):
        return fingerprint.training_fingerprint(load_config(LAPTOP_CONFIG, list(overrides)), manifest, "data")

    flipped = made("environment.mixed_precision_inference=true").differences(
        made("environment.mixed_precision_inference=false"))
    assert [d.split()[0] for d in flipped] == ["environment.mixed_precision_inference"]
    assert not made("environment.cpus_per_worker=1").differences(made("environment.cpus_per_worker=2"))


def test_masks_reach_both_ends_of_each_axis():
    """Every start a mask of its width can take is drawn: the last frame and the top mel bin too."""
    torch.manual_seed(0)
    mels, frames = 8, 12
    x = torch.arange(mels * frames, dtype=torch.float32).view(1, 1, mels, frames).expand(2000, 1, mels, frames)
    time_hit = spec_augment(x, time_mask_frames=3, frequency_mask_bins=0) != x
    freq_hit = spec_augment(x, time_mask_frames=0, frequency_mask_bins=3) != x
    assert time_hit[..., 0].any() and time_hit[..., -1].any()
    assert freq_hit[..., 0, :].any() and freq_hit[..., -1, :].any()
    # Each position is about equally likely to be masked at the ends as one step in.
    assert time_hit[..., -1].any(dim=-1).sum() > 0.5 * time_hit[..., -2].any(dim=-1).sum()


def test_a_mask_wider_than_its_axis_never_hides_the_whole_clip():
    torch.manual_seed(0)
    x = torch.randn(500, 1, 6, 10)
    masked = spec_augment(x, time_mask_frames=50, frequency_mask_bins=0) != x
    frames_hidden = masked[:, 0].all(dim=1).sum(dim=-1)
    assert frames_hidden.max() == 9  # as wide as the axis less one, and no wider
    masked = spec_augment(x, time_mask_frames=0, frequency_mask_bins=50) != x
    assert masked[:, 0].all(dim=2).sum(dim=-1).max() == 5


def test_colouring_leaves_digital_silence_and_padding_as_they_are():
    """Bins at the log floor (digital silence, zero padding) are flat at validation and scoring: colouring would
    draw its curve there, and per-clip standardisation turns a silent clip's curve into a unit-variance stripe."""
    from gunsound.features import LOG_FLOOR, normalized

    torch.manual_seed(0)
    floor = math.log(LOG_FLOOR)
    x = torch.full((16, 1, 24, 30), floor)
    x[8:, ..., :10] = torch.randn(8, 1, 24, 10) - 3  # the second half: 10 frames of sound, then padding
    coloured = colour(x, max_db=9.0)
    assert torch.equal(coloured[..., 10:], x[..., 10:])  # padding and silence untouched
    assert not torch.equal(coloured[8:, ..., :10], x[8:, ..., :10])  # the sound still coloured
    silent = normalized(coloured[:8], normalize=True, relative_to_peak=False)
    assert silent.std(dim=(-2, -1)).max() == 0
