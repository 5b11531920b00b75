import shutil
import zipfile

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from gunsound import audio, storage
from gunsound.config import load_config
from gunsound.dataset import ManifestError, assign_folds, choose_audio_parameters, load_manifest, num_folds
from tests.conftest import SEED_CONFIG, zip_folder


@pytest.fixture
def cfg():
    return load_config(SEED_CONFIG, ["architecture.pretrained=false"])


def test_seed_config_finds_the_hydrogen_torch_layout_under_data(cfg, synth_dir):
    manifest = load_manifest(cfg, str(synth_dir))
    assert len(manifest.frame) == 95
    assert manifest.classes == sorted(["AK-12", "AK-47", "IMI Desert Eagle", "M16", "M249", "M4", "MG-42",
                                       "MP5", "Zastava M92"])
    targets = manifest.targets("background")
    assert targets.shape == (95, 9)
    assert (targets.sum(axis=1) == (manifest.frame["label"] != "background")).all()





@pytest.mark.parametrize("whole_read_bytes", [64 << 20, 0])  # small members read whole; large ones streamed
def test_zip_of_the_layout_is_read_in_place(cfg, synth_dir, tmp_path, monkeypatch, whole_read_bytes):
    monkeypatch.setattr(storage, "ZIP_MEMBER_WHOLE_READ_BYTES", whole_read_bytes)
    archive = zip_folder(synth_dir, tmp_path / "Gun_sound_detection.zip")
    manifest = load_manifest(cfg, str(archive))
    assert len(manifest.frame) == 95
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Gun_sound_detection.zip"]   # nothing extracted
    first = manifest.frame.iloc[0]
    assert first["path"] == storage.zip_location(str(archive), "Gun_sound_detection/Gun_Classifier/"
                                                 + first["rel_path"])
    from_zip, sr = audio.read(first["path"])
    original, _ = audio.read(str(synth_dir / "Gun_Classifier" / first["rel_path"]))
    np.testing.assert_array_equal(from_zip, original)
    start = len(original) // 3                                          # a range read inside the member
    window, _ = audio.read(first["path"], start=start / sr, duration=0.25)
    np.testing.assert_array_equal(window, original[start:start + len(window)])


@pytest.mark.parametrize("made_by", ["zip", "macOS Finder"])
def test_folder_per_class_zip_with_one_top_folder(cfg, tmp_path, made_by):
    """Finder's Compress adds `__MACOSX/` beside the top folder, `._NAME` resource forks and `.DS_Store`: they
    are not data (with them counted, the top folder became the one class)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "gunshot audio"
    for cls in ("AK-12", "IMI Desert Eagle"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            sf.write(root / cls / f"{i}.wav", rng.normal(0, 0.1, 4800), 48000)
    archive = zip_folder(root, tmp_path / "gunshot audio.zip", prefix="gunshot audio/")
    if made_by == "macOS Finder":
        with zipfile.ZipFile(archive, "a") as zf:
            zf.writestr("gunshot audio/.DS_Store", b"\0\0\0\1Bud1")
            zf.writestr("gunshot audio/AK-12/._0.wav", b"\0\5\26\7 resource fork")
            for member in ("__MACOSX/gunshot audio/._AK-12", "__MACOSX/gunshot audio/AK-12/._0.wav"):
                zf.writestr(member, b"\0\5\26\7 resource fork")
    manifest = load_manifest(cfg, str(archive))
    assert manifest.classes == ["AK-12", "IMI Desert Eagle"]
    assert sorted(manifest.frame["rel_path"]) == ["AK-12/0.wav", "AK-12/1.wav",
                                                  "IMI Desert Eagle/0.wav", "IMI Desert Eagle/1.wav"]


def test_bad_zips_are_clear_errors_and_zips_are_read_only(cfg, synth_dir, tmp_path):
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ValueError, match="corrupt.zip: not a readable zip file"):
        load_manifest(cfg, str(corrupt))
    with pytest.raises(FileNotFoundError, match="missing.zip"):
        load_manifest(cfg, str(tmp_path / "missing.zip"))
    archive = zip_folder(synth_dir, tmp_path / "data.zip")
    with pytest.raises(ValueError, match="read-only"):
        storage.write_text(storage.zip_location(str(archive), "Gun_sound_detection/notes.txt"), "x")


def test_folder_per_class_with_spaces_and_hyphens(cfg, synth_dir, tmp_path):
    root = tmp_path / "gunshot audio"
    for cls in ["AK-47", "IMI Desert Eagle", "Zastava M92"]:
        shutil.copytree(synth_dir / "Gun_Classifier" / cls, root / cls)
    manifest = load_manifest(cfg, str(root))
    assert manifest.classes == ["AK-47", "IMI Desert Eagle", "Zastava M92"]
    assert len(manifest.frame) == 30
    assert all(" " in p for p in manifest.frame.loc[manifest.frame.label == "IMI Desert Eagle", "path"])


def _broken_dataset(synth_dir, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(synth_dir, root)
    frame = pd.read_parquet(root / "train.pq")
    (root / "Gun_Classifier" / frame.loc[0, "image"]).unlink()                      # missing file
    (root / "Gun_Classifier" / frame.loc[1, "image"]).write_bytes(b"garbage" * 50)  # unreadable
    frame.loc[2, "class"] = ""                                                      # empty label
    frame.loc[3, "image"] = frame.loc[4, "image"]                                   # duplicate path
    frame.loc[5, "image"] = "../../etc/passwd"                                      # escapes
    sf.write(root / "Gun_Classifier" / "silent.wav", np.zeros((0, 1)), 48000)
    frame.loc[6, "image"] = "silent.wav"                                            # no samples
    frame.to_parquet(root / "train.pq")
    return root


def test_every_problem_is_reported_together(cfg, synth_dir, tmp_path):
    root = _broken_dataset(synth_dir, tmp_path)
    with pytest.raises(ManifestError) as err:
        load_manifest(cfg, str(root))
    reasons = {p.row: p.reason for p in err.value.problems}
    assert reasons[0] == "file not found"
    assert reasons[1].startswith("unreadable audio")
    assert reasons[2] == "empty label"
    assert reasons[4].startswith("duplicate path (also row 3)")
    assert reasons[5] == "path escapes the data folder"
    assert reasons[6] in ("audio has no samples", "empty file") or reasons[6].startswith("unreadable")
    assert len(reasons) == 6
    assert "row 0" in str(err.value) and "--drop-bad-rows" in str(err.value)


def test_drop_bad_rows_lists_what_was_dropped(cfg, synth_dir, tmp_path):
    root = _broken_dataset(synth_dir, tmp_path)
    manifest = load_manifest(cfg, str(root), drop_bad_rows=True)
    assert len(manifest.frame) == 95 - 6
    assert sorted(p.row for p in manifest.dropped) == [0, 1, 2, 4, 5, 6]
    assert not set(manifest.frame["row"]) & {0, 1, 2, 4, 5, 6}


def test_unknown_label_against_a_fixed_class_list(synth_dir):
    cfg = load_config(SEED_CONFIG, ["dataset.classes=[AK-47, M4]"])
    with pytest.raises(ManifestError, match="unknown label 'AK-12'"):
        load_manifest(cfg, str(synth_dir))


def test_missing_column_is_named(synth_dir):
    cfg = load_config(SEED_CONFIG, ["dataset.label_columns=[gun]"])
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['gun'\]"):
        load_manifest(cfg, str(synth_dir))


def test_missing_data_location_is_clear(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_manifest(cfg, str(tmp_path / "nowhere"))


def test_auto_audio_parameters_do_not_pad_two_second_clips_to_a_minute(cfg, synth_dir):
    manifest = load_manifest(cfg, str(synth_dir))
    choice = choose_audio_parameters(cfg, manifest)
    assert choice.sample_rate == 48000
    assert choice.chunk_seconds == 2.0
    manual = load_config(SEED_CONFIG, ["audio.audio_parameters=Manual"])
    assert choose_audio_parameters(manual, manifest).chunk_seconds == 60.0


def test_folds_are_stratified_and_keep_groups_together(cfg, synth_dir):
    manifest = load_manifest(cfg, str(synth_dir))
    manifest.frame["group"] = [f"g{i // 2}" for i in range(len(manifest.frame))]  # pairs of clips
    folds = assign_folds(manifest, cfg.dataset, seed=1)
    assert num_folds(cfg.dataset) == 5 and set(folds) == set(range(5))
    for _, members in manifest.frame.assign(fold=folds).groupby("group"):
        assert members["fold"].nunique() == 1
    per_class = manifest.frame.assign(fold=folds).groupby(["label", "fold"]).size().unstack(fill_value=0)
    assert (per_class.loc[per_class.index != "background"].max(axis=1) <= 4).all()


def test_too_few_clips_for_the_folds_is_a_clear_error(cfg, synth_dir):
    manifest = load_manifest(cfg, str(synth_dir))  # 10 clips per class, 5 background
    few = load_config(SEED_CONFIG, ["dataset.validation_size=0.05"])  # 20 folds
    with pytest.raises(ValueError, match=r"train.pq: every class has fewer clips than the 20 folds.*has 10"):
        assign_folds(manifest, few.dataset, seed=1)
    assert len(set(assign_folds(manifest, cfg.dataset, seed=1))) == 5


def test_fewer_groups_than_folds_is_a_clear_error(synth_dir, tmp_path):
    shutil.copytree(synth_dir, tmp_path / "data")
    frame = pd.read_parquet(tmp_path / "data" / "train.pq")
    frame["package"] = [f"pkg{i % 3}" for i in range(len(frame))]
    frame.to_parquet(tmp_path / "data" / "train.pq")
    cfg = load_config(SEED_CONFIG, ["dataset.group_fold_column=package"])
    manifest = load_manifest(cfg, str(tmp_path / "data"))
    with pytest.raises(ValueError, match="5 folds .* need at least 5 groups of dataset.group_fold_column='package'"):
        assign_folds(manifest, cfg.dataset, seed=0)


@pytest.mark.parametrize("empty", [None, ""])
def test_a_clip_without_a_group_is_a_problem_row_not_one_big_group(synth_dir, tmp_path, empty):
    """str(NaN) made every clip without a package one group 'nan', all on one side of every split."""
    shutil.copytree(synth_dir, tmp_path / "data")
    frame = pd.read_parquet(tmp_path / "data" / "train.pq")
    frame["package"] = [f"pkg{i % 7}" if i % 2 else empty for i in range(len(frame))]
    frame.to_parquet(tmp_path / "data" / "train.pq")
    cfg = load_config(SEED_CONFIG, ["dataset.group_fold_column=package"])
    with pytest.raises(ManifestError, match=r"row 0: .*empty dataset.group_fold_column \('package'\) value") as caught:
        load_manifest(cfg, str(tmp_path / "data"))
    assert len(caught.value.problems) == (len(frame) + 1) // 2
    kept = load_manifest(cfg, str(tmp_path / "data"), drop_bad_rows=True)
    assert len(kept.frame) == len(frame) // 2 and set(kept.frame["group"]) == {f"pkg{i}" for i in range(7)}


@pytest.mark.parametrize("fraction", [0.3, 0.5])
def test_data_sample_keeps_that_share_of_each_class_on_the_full_datasets_folds(synth_dir, tmp_path, fraction):
    from gunsound.plan import prepare

    seeded = ["architecture.pretrained=false", "environment.seed=3"]
    full = prepare(load_config(SEED_CONFIG, seeded), str(synth_dir), str(tmp_path / "a"))
    cfg = load_config(SEED_CONFIG, [*seeded, f"dataset.data_sample={fraction}"])
    sampled = prepare(cfg, str(synth_dir), str(tmp_path / "b"))
    counts = sampled.manifest.frame["label"].value_counts()
    assert (counts == full.manifest.frame["label"].value_counts().mul(fraction).round().clip(lower=1)).all()
    fold_of = dict(zip(full.manifest.frame["row"], full.folds, strict=True))
    assert [fold_of[r] for r in sampled.manifest.frame["row"]] == list(sampled.folds)  # the same folds
    again = prepare(cfg, str(synth_dir), str(tmp_path / "c"))
    assert list(again.manifest.frame["row"]) == list(sampled.manifest.frame["row"])  # one seed, one sample
    assert any(f"dataset.data_sample {fraction:g}" in note for note in sampled.notes)


def test_data_sample_of_one_side_needs_a_validation_dataframe(synth_dir, tmp_path):
    from gunsound.config import ConfigError
    from gunsound.plan import prepare

    cfg = load_config(SEED_CONFIG, ["architecture.pretrained=false", "dataset.data_sample=0.5",
                                    "dataset.data_sample_choice=[Train]"])
    with pytest.raises(ConfigError, match=r"dataset.data_sample_choice \['Train'\]: with k folds"):
        prepare(cfg, str(synth_dir), str(tmp_path / "out"))


def test_crossentropy_is_refused_for_background_clips_in_the_validation_dataframe_too(synth_dir, tmp_path):
    """CrossEntropy has no target for a clip of no class: refused whether the training or only the validation
    dataframe holds such clips (validation would have scored all-zero targets with it)."""
    from gunsound.config import ConfigError
    from gunsound.plan import prepare

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    frame = pd.read_parquet(data / "train.pq")
    is_background = frame["class"] == "background"
    frame[~is_background].iloc[::2].to_parquet(data / "train_guns.pq")
    pd.concat([frame[~is_background].iloc[1::2], frame[is_background]]).to_parquet(data / "valid.pq")
    custom = ["architecture.pretrained=false", "training.loss_function=CrossEntropy",
              "dataset.validation_strategy=custom", "dataset.validation_dataframe=valid.pq"]
    with pytest.raises(ConfigError, match="and valid.pq holds 'background' clips; use BCE"):
        prepare(load_config(SEED_CONFIG, [*custom, "dataset.train_dataframe=train_guns.pq"]), str(data),
                str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="and the training data holds 'background' clips"):
        prepare(load_config(SEED_CONFIG, ["architecture.pretrained=false", "training.loss_function=CrossEntropy"]),
                str(data), str(tmp_path / "out"))


def test_dropped_rows_of_a_validation_dataframe_are_numbered_after_the_training_rows_and_name_it(synth_dir, tmp_path):
    """With --drop-bad-rows, dropped_rows.parquet keeps `row` a unique key as the manifest does (train row 3 and
    valid row 3 were both "row 3") and says which dataframe a dropped validation row came from."""
    from gunsound.plan import prepare

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    frame = pd.read_parquet(data / "train.pq")
    for name, part in (("train_part.pq", frame.iloc[::2].copy()), ("valid.pq", frame.iloc[1::2].copy())):
        part.loc[part.index[3], "image"] = f"missing_{name}.wav"
        part.to_parquet(data / name)
    cfg = load_config(SEED_CONFIG, ["architecture.pretrained=false", "dataset.train_dataframe=train_part.pq",
                                    "dataset.validation_strategy=custom", "dataset.validation_dataframe=valid.pq"])
    plan = prepare(cfg, str(data), str(tmp_path / "out"), drop_bad_rows=True)
    dropped = {p.row: p for p in plan.manifest.dropped}
    assert len(dropped) == 2 and not set(dropped) & set(plan.manifest.frame["row"])
    valid = max(dropped)
    assert valid > plan.manifest.frame["row"][plan.folds < 0].max()
    assert dropped[valid].reason.startswith("valid.pq row 3: ")


# ---------------------------------------------------------------- labels, groups and layouts read as meant


def _wav(path, seconds: float = 0.2, sr: int = 16000) -> None:
    """A short noise clip: the checks under test read headers, never the sound."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, np.random.default_rng(0).normal(0, 0.1, int(seconds * sr)).astype(np.float32), sr)


def _frame_dataset(root, labels, name: str = "train.pq", **columns):
    """<root>/<name> listing a0.wav.. with `labels` (and other columns), the clips beside it."""
    for i in range(len(labels)):
        _wav(root / f"a{i}.wav")
    frame = pd.DataFrame({"image": [f"a{i}.wav" for i in range(len(labels))], "class": labels, **columns})
    frame.to_csv(root / name, index=False) if name.endswith(".csv") else frame.to_parquet(root / name)
    return root


def _dataset_cfg(**dataset):
    from gunsound.config import check_dataset_sources, config_from_dict

    cfg = config_from_dict({"dataset": {"data_folder": "", "train_dataframe": "train.pq", **dataset},
                            "environment": {"seed": 1}})
    check_dataset_sources(cfg.dataset, "<test>")
    return cfg


@pytest.mark.parametrize("layout", ["one level too high", "train and test splits"])
def test_folder_per_class_refuses_class_folders_that_hold_subfolders_of_audio(tmp_path, layout):
    """Every clip took its class from the top folder: one class 'Gun_Classifier', or 'train' vs 'test'."""
    tops = ["Gun_Classifier"] if layout == "one level too high" else ["train", "test"]
    for top in tops:
        for cls in ("AK-47", "M16"):
            for i in range(3):
                _wav(tmp_path / top / cls / f"{i}.wav")
    with pytest.raises(ManifestError, match=rf"class folder\(s\) hold subfolders with audio \({tops[-1]}/ holds "
                                            r"AK-47, M16.*pass the folder that holds one folder per class"):
        load_manifest(_dataset_cfg(train_dataframe=""), str(tmp_path))
    assert len(load_manifest(_dataset_cfg(train_dataframe=""), str(tmp_path / tops[0])).classes) == 2


def test_folder_per_class_refuses_a_single_class_folder(tmp_path):
    for i in range(3):
        _wav(tmp_path / "recordings" / f"{i}.wav")
    with pytest.raises(ManifestError, match=r"1 class folder \(recordings\); a classifier needs at least 2"):
        load_manifest(_dataset_cfg(train_dataframe=""), str(tmp_path))


def test_folder_per_class_groups_by_file_and_says_a_group_column_is_not_used(tmp_path):
    """The seed config's group_fold_column (`image`, the audio column) means "by file"; any other column cannot be
    read from folders: it was ignored while the plan said "grouped by" it; now the plan says it is not used
    (small_data.yaml, made for dataframes grouped by package, must still train on a folder-per-class dataset)."""
    for cls in ("AK-47", "M16"):
        for i in range(3):
            _wav(tmp_path / cls / f"rec{i // 2}_{i}.wav")
    manifest = load_manifest(_dataset_cfg(train_dataframe="", group_fold_column="recording"), str(tmp_path))
    assert manifest.group_by == "file" and manifest.frame["group"].nunique() == 6
    assert any("dataset.group_fold_column 'recording' is not used" in note for note in manifest.notes)
    manifest = load_manifest(_dataset_cfg(train_dataframe="", group_fold_column="image"), str(tmp_path))
    assert manifest.group_by == "file" and manifest.frame["group"].nunique() == 6
    assert not any("group_fold_column" in note for note in manifest.notes)


def test_group_values_are_normalised_as_labels_are(tmp_path):
    """"session0" and "session0 " were two groups, so one session fell on both sides of a split."""
    sessions = ["session0", "session0 ", "Session0", "session1", " session1", "session  2", "session 2"]
    _frame_dataset(tmp_path, ["AK", "M16"] * 3 + ["AK"], name="train.csv", session=sessions)
    manifest = load_manifest(_dataset_cfg(train_dataframe="train.csv", group_fold_column="session"), str(tmp_path))
    assert list(manifest.frame["group"]) == ["session0"] * 3 + ["session1"] * 2 + ["session 2"] * 2
    assert manifest.group_by == "session"


def test_a_configured_train_dataframe_that_is_not_there_is_not_replaced_by_another(tmp_path):
    """The one dataframe at the top (a table left there to score) was trained on without a word."""
    from gunsound.config import ConfigError

    _frame_dataset(tmp_path, ["AK", "M16"] * 2, name="holdout_to_score.pq")
    with pytest.raises(ConfigError, match=r"dataset.train_dataframe data/anon/train.pq not found under .*, which "
                                          r"holds holdout_to_score.pq"):
        load_manifest(_dataset_cfg(train_dataframe="data/anon/train.pq"), str(tmp_path))
    manifest = load_manifest(_dataset_cfg(train_dataframe=""), str(tmp_path))  # not set: the one there, said so
    assert manifest.source.endswith("holdout_to_score.pq")
    assert manifest.notes and "dataset.train_dataframe is not set: training on" in manifest.notes[0]


def test_several_labels_in_one_cell_is_a_problem_row(tmp_path):
    _frame_dataset(tmp_path, [["AK", "M16"], ["AK"], ["M16"], ["AK"]])
    with pytest.raises(ManifestError) as caught:
        load_manifest(_dataset_cfg(), str(tmp_path))
    assert [(p.row, p.reason) for p in caught.value.problems] == [
        (0, "several labels in one cell (AK, M16); gunsound takes one class per clip")]
    assert load_manifest(_dataset_cfg(), str(tmp_path), drop_bad_rows=True).classes == ["AK", "M16"]


def test_label_spellings_are_one_class_or_a_problem_row(tmp_path):
    """NFC and whitespace runs are one spelling; case or dash variants are refused, naming the rows."""
    import unicodedata

    beretta = "Beretta Mod\u00e8le"
    labels = [beretta, unicodedata.normalize("NFD", beretta), "Desert  Eagle", "Desert Eagle ", "AK-47", "AK-47",
              "ak-47", "AK\u201147"]
    _frame_dataset(tmp_path, labels)
    with pytest.raises(ManifestError) as caught:
        load_manifest(_dataset_cfg(), str(tmp_path))
    assert {p.row: p.reason for p in caught.value.problems} == {
        6: "label 'ak-47' is 'AK-47' (2 row(s)) spelled another way (case or dashes): spell each class one way",
        7: "label 'AK\u201147' is 'AK-47' (2 row(s)) spelled another way (case or dashes): spell each class one way"}
    kept = load_manifest(_dataset_cfg(), str(tmp_path), drop_bad_rows=True)
    assert kept.classes == ["AK-47", beretta, "Desert Eagle"]


@pytest.mark.parametrize("missing", ["NA", "N/A", "null", "None", "NaN"])
def test_missing_value_text_in_a_csv_label_column_is_an_empty_label(tmp_path, missing):
    """R's write.csv writes a missing label as NA, and CSV cells are read as text: NA became a class."""
    root = tmp_path
    for i in range(4):
        _wav(root / f"a{i}.wav")
    (root / "train.csv").write_text(f'"image","class"\n"a0.wav","AK"\n"a1.wav",{missing}\n"a2.wav","M16"\n'
                                    '"a3.wav","M16"\n')
    with pytest.raises(ManifestError) as caught:
        load_manifest(_dataset_cfg(train_dataframe="train.csv"), str(root))
    assert [(p.row, p.reason) for p in caught.value.problems] == [(1, "empty label")]


def test_whole_number_float_labels_are_written_as_ints(tmp_path):
    """A label column read as float64 (it once held a NaN) named the classes "1.0", an int64 one "1"."""
    _frame_dataset(tmp_path, [1.0, 2.0, 1.0, 2.5])
    assert load_manifest(_dataset_cfg(), str(tmp_path)).classes == ["1", "2", "2.5"]


def test_a_data_folder_that_is_not_there_is_named(tmp_path):
    """It fell back to the dataframe's folder, and every row was then "file not found"."""
    from gunsound.config import ConfigError

    _frame_dataset(tmp_path / "Gun_Classifier", ["AK", "M16"])
    (tmp_path / "Gun_Classifier" / "train.pq").rename(tmp_path / "train.pq")
    with pytest.raises(ConfigError, match=r"dataset.data_folder 'data/Gun_Clasifier/' not found under "
                                          rf"{tmp_path} \(looked for data/Gun_Clasifier, Gun_Clasifier\)"):
        load_manifest(_dataset_cfg(data_folder="data/Gun_Clasifier/"), str(tmp_path))
    assert len(load_manifest(_dataset_cfg(data_folder="data/Gun_Classifier/"), str(tmp_path)).frame) == 2


def test_label_columns_that_are_not_one_hot_are_named(tmp_path):
    """Every row was an "empty label", and nothing said why."""
    _frame_dataset(tmp_path, ["AK", "M16"], caliber=["7.62", "5.56"])
    with pytest.raises(ManifestError, match=r"dataset.label_columns \['class', 'caliber'\]: no row sets any of them "
                                            r"to 1 .* not: for a column of class names list that one alone"):
        load_manifest(_dataset_cfg(label_columns=["class", "caliber"]), str(tmp_path))
    _frame_dataset(tmp_path, ["AK", "M16"], name="train.csv", AK=[1, 0], M16=[0, "x"])
    with pytest.raises(ManifestError) as caught:
        load_manifest(_dataset_cfg(train_dataframe="train.csv", label_columns=["AK", "M16"]), str(tmp_path))
    assert [(p.row, p.reason) for p in caught.value.problems] == [
        (1, "label column 'M16' holds 'x', not 0 or 1 (several dataset.label_columns are one-hot columns)")]
