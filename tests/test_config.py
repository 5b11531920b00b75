import re

import pytest
import yaml

from gunsound.config import ConfigError, config_from_dict, load_config, parse_config_yaml
from tests.conftest import LAPTOP_CONFIG, REPO, SEED_CONFIG


def test_seed_config_is_the_seed_yaml_unchanged():
    seed_text = (REPO.parent / "shared" / "seed" / "000_5e48f5e7a1c78dcf.txt")
    if not seed_text.exists():
        pytest.skip("shared/seed not beside the checkout")
    embedded = seed_text.read_text().split("```yaml\n")[1].split("```")[0]
    assert SEED_CONFIG.read_text() == embedded


def test_seed_config_loads_with_every_section_typed():
    cfg = load_config(SEED_CONFIG)
    assert cfg.architecture.backbone == "resnet50" and cfg.architecture.pretrained is True
    assert cfg.architecture.pool == "Average" and cfg.architecture.dropout == 0.0
    assert cfg.audio.sample_rate == 48000 and cfg.audio.stft_window_size == 2048 and cfg.audio.hop_size == 512
    assert cfg.audio.spectrogram_normalization == "No" and cfg.audio.training_chunk_seconds == 60.0
    assert cfg.augmentation.mix_audio == "Disabled" and cfg.augmentation.mix_target == "Ratio"
    assert cfg.dataset.folds == [4] and cfg.dataset.label_columns == ["class"]
    assert cfg.dataset.data_folder_test is None and cfg.dataset.validation_dataframe is None
    assert cfg.environment.seed == -1 and cfg.environment.mixed_precision_training is True
    assert cfg.logging.logger is None and cfg.logging.number_of_audios == 8
    assert cfg.prediction.inference_chunk_method == "Fix" and cfg.prediction.probability_threshold == 0.5
    assert cfg.training.batch_size == 16 and cfg.training.loss_function == "BCE"
    assert cfg.training.differential_learning_rate_layers == []
    assert cfg.experiment_name == "87_gun_sound_classification"


def test_laptop_config_loads():
    cfg = load_config(LAPTOP_CONFIG)
    assert cfg.architecture.pretrained is False


def test_overrides_are_typed_and_repeatable():
    cfg = load_config(SEED_CONFIG, ["training.epochs=2", "architecture.backbone=resnet18",
                                    "dataset.folds=[0, 1]", "training.learning_rate=3e-4"])
    assert cfg.training.epochs == 2 and cfg.architecture.backbone == "resnet18"
    assert cfg.dataset.folds == [0, 1] and cfg.training.learning_rate == pytest.approx(3e-4)


def _write(tmp_path, data):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, {"training": {"epochz": 3}})
    with pytest.raises(ConfigError, match=r"exp\.yaml.*'training\.epochz'"):
        load_config(path)


def test_unknown_section_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="'trainning'"):
        load_config(_write(tmp_path, {"trainning": {}}))


def test_wrong_type_names_key_and_file(tmp_path):
    with pytest.raises(ConfigError, match=r"exp\.yaml.*'training\.epochs' must be an integer"):
        load_config(_write(tmp_path, {"training": {"epochs": "five"}}))
    with pytest.raises(ConfigError, match="'training.drop_last_batch' must be true or false"):
        load_config(_write(tmp_path, {"training": {"drop_last_batch": "maybe"}}))
    with pytest.raises(ConfigError, match="'architecture.pool' must be one of"):
        load_config(_write(tmp_path, {"architecture": {"pool": "Median"}}))


def test_bad_override_names_key():
    with pytest.raises(ConfigError, match="'training.batch_size' must be an integer"):
        load_config(SEED_CONFIG, ["training.batch_size=big"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(SEED_CONFIG, ["training.epochs"])


def test_out_of_range_value(tmp_path):
    with pytest.raises(ConfigError, match="'dataset.validation_size' must be between 0 and 1"):
        load_config(_write(tmp_path, {"dataset": {"validation_size": 1.5}}))


def test_unquoted_yaml_no_is_read_as_the_option(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("audio:\n    spectrogram_normalization: No\n")
    assert load_config(path).audio.spectrogram_normalization == "No"


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(("override", "message"), [
    ("logging.logger=Wandb", "'logging.logger' must be one of 'MLflow', 'TensorBoard', 'Neptune'"),
    ("logging.tracking_uri=http://mlflow:5000", "'logging.tracking_uri' must be left out unless logging.logger is MLflow"),
    ("logging.neptune_project=''", None),
])
def test_logging_logger_is_one_of_the_trackers(override, message):
    if message is None:
        assert load_config(SEED_CONFIG, [override]).logging.logger is None  # the seed's None: nothing tracked
        return
    with pytest.raises(ConfigError, match=message):
        load_config(SEED_CONFIG, [override])


def test_tracking_credentials_are_refused_in_the_config():
    with pytest.raises(ConfigError, match="'logging.tracking_uri' must be free of credentials"):
        load_config(SEED_CONFIG, ["logging.logger=MLflow", "logging.tracking_uri=https://me:secret@mlflow:5000"])


@pytest.mark.parametrize(("uri", "key"), [
    ("postgresql://mlflow-db/mlflow?user=mlflow&password=hunter2", "password"),
    ("mysql+pymysql://mlflow-db/mlflow?PassWd=hunter2", "PassWd"),
    ("https://mlflow.example:5000/?token=hunter2", "token"),
    ("https://mlflow.example:5000/?x-api-key=hunter2", "x-api-key"),
    ("https://mlflow.example:5000/?sv=2024&sig=hunter2", "sig"),
    ("https://mlflow.example:5000/?AWS_SECRET_KEY=hunter2", "AWS_SECRET_KEY"),
    ("https://mlflow.example:5000/?credentials=hunter2", "credentials"),
    ("https://mlflow.example:5000/?authToken=hunter2", "authToken"),  # camelCase
    ("https://mlflow.example:5000/?apiToken=hunter2", "apiToken"),
    ("https://mlflow.example:5000/?accessToken=hunter2", "accessToken"),
    ("https://mlflow.example:5000/?sasToken=hunter2", "sasToken"),
    ("postgresql://mlflow-db/mlflow?sslpassword=hunter2", "sslpassword"),  # a secret's name inside one word
])
def test_secrets_in_a_tracking_uris_query_are_refused_and_never_printed(uri, key):
    """The URI is logged and written to OUTPUT/tracking.json: a secret in its query would go there too. The
    error names the key, and shows neither the value nor the override that carried it."""
    with pytest.raises(ConfigError, match=rf"'logging.tracking_uri' must be free of credentials, found query "
                                          rf"key\(s\) '{re.escape(key)}'") as refused:
        load_config(SEED_CONFIG, ["logging.logger=MLflow", f"logging.tracking_uri={uri}"])
    assert "hunter2" not in str(refused.value)
    # Keys that only look alike, and settings that are no secret, load.
    plain = "postgresql://mlflow-db/mlflow?sslmode=require&user=mlflow&keyspace=x&sslkey=/etc/client.key"
    assert load_config(SEED_CONFIG, ["logging.logger=MLflow", f"logging.tracking_uri={plain}"]).logging.tracking_uri \
        == plain


def test_user_information_in_a_tracking_uri_is_not_printed():
    with pytest.raises(ConfigError, match="found user information") as refused:
        load_config(SEED_CONFIG, ["logging.logger=MLflow", "logging.tracking_uri=https://me:hunter2@mlflow:5000"])
    assert "hunter2" not in str(refused.value) and "me:" not in str(refused.value)


@pytest.mark.parametrize(("uri", "shown"), [
    ("https://me:pw@mlflow:5000/api?a=1&b&c=#frag", "https://mlflow:5000/api?a=***&***&c=***"),
    ("postgresql://db/mlflow?user=mlflow", "postgresql://db/mlflow?user=***"),
    ("sqlite:////runs/a b/mlflow.db", "sqlite:////runs/a b/mlflow.db"),
    ("databricks", "databricks"),
])
def test_redact_uri_keeps_no_user_information_and_no_query_values(uri, shown):
    from gunsound.config import redact_uri

    assert redact_uri(uri) == shown


def test_a_logger_whose_package_is_missing_fails_at_config_time():
    import importlib.util

    if importlib.util.find_spec("neptune") is not None:
        pytest.skip("neptune is installed here")
    with pytest.raises(ConfigError, match=r"'logging.logger' is Neptune, which needs the neptune package"):
        load_config(SEED_CONFIG, ["logging.logger=Neptune", "logging.neptune_project=team/guns"])
    with pytest.raises(ConfigError, match="'logging.neptune_project' must be a Neptune project"):
        load_config(SEED_CONFIG, ["logging.logger=Neptune"])
    assert load_config(SEED_CONFIG, ["logging.logger=MLflow"]).logging.logger == "MLflow"


@pytest.mark.parametrize("key", ["scoring.batch_size", "scoring.shard_files"])
@pytest.mark.parametrize("value", [0, -3])
def test_scoring_batch_and_shard_sizes_must_be_positive(key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' must be at least 1"):
        load_config(SEED_CONFIG, [f"{key}={value}"])


@pytest.mark.parametrize(("window", "hop"), [(1, 4), (2, 2.5), (0.5, 0.51)])
def test_a_scoring_hop_longer_than_the_window_is_refused(window, hop):
    """A longer hop leaves audio unscored and can start a window past a file's end, whose negative weight then
    skews the file's means. A hop of a whole window, or one without a window (the model's chunk, resolved when
    scoring), loads."""
    with pytest.raises(ConfigError, match=r"'scoring.hop_seconds' must be at most scoring.window_seconds"):
        load_config(SEED_CONFIG, [f"scoring.window_seconds={window}", f"scoring.hop_seconds={hop}"])
    assert load_config(SEED_CONFIG, [f"scoring.window_seconds={window}", f"scoring.hop_seconds={window}"])
    assert load_config(SEED_CONFIG, [f"scoring.hop_seconds={hop}"]).scoring.window_seconds is None


@pytest.mark.parametrize("override", ["logging.number_of_audios=3", "storage.region=eu-west-1"])
def test_an_empty_section_takes_overrides(tmp_path, override):
    # `logging:` with nothing under it is YAML's None; _build reads it as the defaults, and so must --set.
    path = tmp_path / "exp.yaml"
    path.write_text("logging:\nstorage:\ntraining:\n    epochs: 2\n")
    cfg = load_config(path, [override])
    section, key = override.split("=")[0].split(".")
    assert str(getattr(getattr(cfg, section), key)) == override.split("=")[1]


def test_an_override_below_a_plain_value_names_the_key_and_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("experiment_name: guns\n")
    with pytest.raises(ConfigError, match=r"exp\.yaml.*'experiment_name' is not a section"):
        load_config(path, ["experiment_name.x=1"])


@pytest.mark.parametrize("value", ["--16", "²", "-²", "٣"])
def test_an_integer_key_refuses_a_string_that_is_not_a_plain_integer(value):
    with pytest.raises(ConfigError, match=r"gun_sound_resnet50\.yaml.*'training\.batch_size' must be an integer"):
        load_config(SEED_CONFIG, [f"training.batch_size={value}"])


@pytest.mark.parametrize(("text", "key", "lines"), [
    ("training:\n    epochs: 30\narchitecture:\n    backbone: resnet18\ntraining:\n    epochs: 2\n", "training", (1, 5)),
    ("architecture:\n    backbone: resnet18\n    backbone: resnet50\n", "architecture.backbone", (2, 3)),
    ("dataset:\n    folds: [0]\n    'folds': [1]\n", "dataset.folds", (2, 3)),
    ("search_space: {training.epochs: {choice: [1]}, training.epochs: {choice: [2]}}\n",
     "search_space.training.epochs", (1, 1)),
])
def test_a_repeated_key_is_refused_with_both_lines(tmp_path, text, key, lines):
    # yaml.safe_load keeps the last of two equal keys: the first block's settings would vanish without a word.
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"exp\.yaml: key '{re.escape(key)}' appears twice "
                                          rf"\(lines {lines[0]} and {lines[1]}\)"):
        load_config(path)


def test_a_repeated_key_in_an_override_value_is_refused():
    with pytest.raises(ConfigError, match="key 'a' appears twice"):
        load_config(SEED_CONFIG, ['search_space={"a": {"choice": [1]}, "a": {"choice": [2]}}'])


def test_a_merge_key_may_be_overridden_by_its_mapping():
    # `<<: *base` then an explicit key is YAML's way to override a merged value, not a repeated key.
    data = parse_config_yaml("base: &b {x: 1, y: 2}\nderived:\n    <<: *b\n    x: 3\n", "exp.yaml")
    assert data["derived"] == {"x": 3, "y": 2}


@pytest.mark.parametrize(("override", "message"), [
    ("architecture.dropout=1.5", "'architecture.dropout' must be in [0, 1)"),
    ("architecture.dropout=1", "'architecture.dropout' must be in [0, 1)"),
    ("architecture.dropout=-0.1", "'architecture.dropout' must be in [0, 1)"),
    ("prediction.inference_chunk_seconds=0", "'prediction.inference_chunk_seconds' must be positive"),
    ("prediction.max_inference_chunk_seconds=-1", "'prediction.max_inference_chunk_seconds' must be positive"),
    ("augmentation.mix_concentration=0", "'augmentation.mix_concentration' must be positive"),
    ("training.warmup_epochs=-1", "'training.warmup_epochs' must be at least 0"),
    ("training.weight_decay=-0.01", "'training.weight_decay' must be at least 0"),
    ("training.gradient_clip=-1", "'training.gradient_clip' must be at least 0"),
    ("environment.workers_per_fold=0", "'environment.workers_per_fold' must be at least 1"),
])
def test_numbers_the_workers_would_refuse_fail_at_load(override, message):
    with pytest.raises(ConfigError, match=r"gun_sound_resnet50\.yaml.*" + re.escape(message)):
        load_config(SEED_CONFIG, [override])


def test_numbers_at_their_limits_load():
    cfg = load_config(SEED_CONFIG, ["architecture.dropout=0.99", "training.warmup_epochs=0", "training.weight_decay=0",
                                    "training.gradient_clip=0", "environment.workers_per_fold=1",
                                    "augmentation.mix_concentration=0.1", "prediction.inference_chunk_seconds=0.5"])
    assert cfg.architecture.dropout == 0.99 and cfg.environment.workers_per_fold == 1


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.classes=[AK-12, M4, AK-12]"], "'dataset.classes' lists 'AK-12' twice"),
    (["dataset.classes=[AK-12, background]"], "'dataset.classes' must be a list without dataset.background_label 'background'"),
    (["dataset.background_label=silence", "dataset.classes=[silence, M4]"],
     "'dataset.classes' must be a list without dataset.background_label 'silence'"),
    (["dataset.folds=[0, 1, 0]"], "'dataset.folds' lists fold 0 twice"),
])
def test_repeated_classes_or_folds_and_a_background_class_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=r"gun_sound_resnet50\.yaml.*" + re.escape(message)):
        load_config(SEED_CONFIG, overrides)


@pytest.mark.parametrize("key", ["dataset.test_dataframe", "dataset.unlabeled_dataframe"])
def test_dataframes_gunsound_does_not_read_are_refused(key):
    with pytest.raises(ConfigError, match=rf"gun_sound_resnet50\.yaml.*'{re.escape(key)}'.*gunsound does not use it"
                                          r".*gunsound score"):
        load_config(SEED_CONFIG, [f"{key}=data/other.pq"])
    assert getattr(load_config(SEED_CONFIG, [f"{key}=None"]).dataset, key.split(".")[1]) is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["dataset.validation_strategy=custom"],
     "'dataset.validation_strategy' is custom, which needs dataset.validation_dataframe"),
    (["dataset.validation_dataframe=data/valid.pq"],
     "'dataset.validation_dataframe' is set, which needs dataset.validation_strategy: custom"),
])
def test_validation_strategy_must_agree_with_validation_dataframe(overrides, message):
    with pytest.raises(ConfigError, match=r"gun_sound_resnet50\.yaml.*" + re.escape(message)):
        load_config(SEED_CONFIG, overrides)
    cfg = load_config(SEED_CONFIG, ["dataset.validation_strategy=custom", "dataset.validation_dataframe=data/valid.pq"])
    assert cfg.dataset.validation_dataframe == "data/valid.pq"
    # A run's saved config.yaml, written before this check, still loads for scoring and reports.
    assert config_from_dict({"dataset": {"validation_dataframe": "v.pq"}}).dataset.validation_strategy == "kfold"


@pytest.mark.parametrize(("text", "says"), [
    ("", "run/config.yaml: empty"),
    ("audio: [unclosed\n", "run/config.yaml: not valid YAML"),
    ("- a list\n", "run/config.yaml: the top level must be a mapping"),
    ("training:\n  epochs: 2\ntraining:\n  epochs: 3\n", "run/config.yaml: key 'training' appears twice"),
    ("training:\n  epochz: 2\n", "run/config.yaml: unknown key"),
])
def test_a_runs_config_that_cannot_be_used_is_named_where_it_lies(tmp_path, text, says):
    """Scoring reads the run's config.yaml one or two folders above a fold's model file: its errors name that
    file (they named MODEL/config.yaml, which does not exist), and a cut one is not "the defaults"."""
    from gunsound.scoring import scoring_config

    (tmp_path / "run" / "fold_0").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(text)
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / says))):
        scoring_config(str(tmp_path / "run" / "fold_0"), [])


def test_a_bad_scoring_override_without_a_run_config_names_the_override(tmp_path):
    from gunsound.scoring import scoring_config

    with pytest.raises(ConfigError, match=r"the default settings \(no config.yaml beside .*\) \(with overrides "
                                          r"scoring.hop_seconds=-1\): key 'scoring.hop_seconds' must be positive"):
        scoring_config(str(tmp_path / "model.pt"), ["scoring.hop_seconds=-1"])


def test_a_runs_saved_config_with_repeated_folds_still_loads_for_scoring(tmp_path):
    """Repeated folds or classes are refused in a config a user writes, not in a run's saved config.yaml,
    which earlier versions wrote unchecked and which scoring and reports must still read."""
    from gunsound.scoring import scoring_config

    saved = yaml.safe_load(SEED_CONFIG.read_text())
    saved["dataset"]["folds"] = [0, 0]
    (tmp_path / "run" / "fold_0").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    assert scoring_config(str(tmp_path / "run" / "fold_0"), []).dataset.folds == [0, 0]
    with pytest.raises(ConfigError, match="key 'dataset.folds' lists fold 0 twice"):
        load_config(tmp_path / "run" / "config.yaml")


@pytest.mark.parametrize(("value", "ok"), [(1, True), (3, True), (0.5, False), (2.5, False), (0, False)])
def test_evaluation_epochs_is_a_whole_number_of_epochs(value, ok):
    """Validation runs at an epoch's end: 0.5 was rounded to 1 and 2.5 to 2 without a word."""
    overrides = [f"training.evaluation_epochs={value}"]
    if ok:
        assert load_config(LAPTOP_CONFIG, overrides).training.evaluation_epochs == value
    else:
        with pytest.raises(ConfigError, match="key 'training.evaluation_epochs' must be a whole number"):
            load_config(LAPTOP_CONFIG, overrides)


def test_a_hop_longer_than_the_models_chunk_is_refused_where_the_window_is_resolved():
    from gunsound.scoring import ScoringSettings

    cfg = load_config(LAPTOP_CONFIG, ["prediction.inference_chunk_method=Sliding", "scoring.hop_seconds=3"])
    with pytest.raises(ConfigError, match=r"scoring.hop_seconds \(3\) must be at most the window \(2 s, the model"):
        ScoringSettings.from_config(cfg, model_chunk_seconds=2.0)
    assert ScoringSettings.from_config(cfg, model_chunk_seconds=4.0).hop_seconds == 3.0


@pytest.mark.parametrize("model", ["fold_0", "fold_0/model.pt", "./fold_0/"])
def test_a_model_named_from_inside_its_run_scores_with_the_runs_settings(tmp_path, monkeypatch, model):
    """`gunsound score fold_0 ...` from inside the run's folder: its config.yaml is one folder up, whatever the
    spelling (the relative path was walked up as text, and scoring fell back to the defaults without a word)."""
    from gunsound.scoring import scoring_config

    saved = yaml.safe_load(SEED_CONFIG.read_text())
    saved["scoring"] = {"hop_seconds": 0.25, "window_seconds": 1.0}
    (tmp_path / "run" / "fold_0").mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.chdir(tmp_path / "run")
    assert scoring_config(model, []).scoring.hop_seconds == 0.25


@pytest.mark.parametrize(("key", "uri"), [
    ("storage.endpoint_url", "http://minioadmin:hunter2@minio:9000"),
    ("storage.endpoint_url", "https://s3.example/?X-Amz-Signature=hunter2"),
    ("environment.ray_address", "ray://admin:hunter2@head:10001"),
])
def test_credentials_in_an_s3_endpoint_or_a_ray_address_are_refused(key, uri):
    """The resolved config is printed by --dry-run and written to the run's config.yaml."""
    with pytest.raises(ConfigError, match=rf"key '{re.escape(key)}' must be free of credentials") as refused:
        load_config(SEED_CONFIG, [f"{key}={uri}"])
    assert "hunter2" not in str(refused.value)
    assert load_config(SEED_CONFIG, [f"{key}={uri.replace('hunter2', 'x').split('@')[-1].split('?')[0]}"])


def test_a_run_of_no_folds_is_refused():
    with pytest.raises(ConfigError, match="key 'dataset.folds' must be a non-empty list"):
        load_config(SEED_CONFIG, ["dataset.folds=[]"])


def test_numbers_in_exponent_form_are_numbers_wherever_they_stand():
    """PyYAML (YAML 1.1) read 1e-05 as text: typed settings were converted, but a search_space sampler's bounds
    stayed text and the sweep was refused ("needs numbers")."""
    from gunsound.tuning import search_space

    cfg = load_config(SEED_CONFIG, ['search_space={"training.learning_rate": {"loguniform": [1e-05, 1e-2]}}',
                                    "training.learning_rate=3e-4"])
    assert search_space(cfg)["training.learning_rate"] == {"loguniform": [1e-05, 0.01]}
    assert cfg.training.learning_rate == 3e-4
    assert load_config(SEED_CONFIG, ['experiment_name="1e5"']).experiment_name == "1e5"  # quoted: text


def test_string_keys_keep_the_text_yaml_reads_as_a_number(tmp_path):
    """YAML 1.1 reads 2024_01 as 202401, 010 as 8 and 1e3 as 1000.0: a folder, class or column name was lost."""
    cfg = load_config(SEED_CONFIG, ["dataset.data_folder=2024_01", "dataset.classes=[AK-47, 010, .22]",
                                    "dataset.group_fold_column=1e3", "training.epochs=0x3"])
    assert cfg.dataset.data_folder == "2024_01" and cfg.dataset.classes == ["AK-47", "010", ".22"]
    assert cfg.dataset.group_fold_column == "1e3"
    assert cfg.training.epochs == 3 and type(cfg.training.epochs) is int  # numbers stay plain numbers
    path = tmp_path / "exp.yaml"
    path.write_text("dataset:\n    data_folder: 2024_01\n    audio_column: 00012\n")
    cfg = load_config(path)
    assert (cfg.dataset.data_folder, cfg.dataset.audio_column) == ("2024_01", "00012")
    assert "data_folder: '2024_01'" in cfg.to_yaml()


def test_a_repeated_label_column_is_refused():
    """Two label columns are read as one-hot: every row was an "empty label"."""
    with pytest.raises(ConfigError, match="key 'dataset.label_columns' lists 'class' twice"):
        load_config(SEED_CONFIG, ["dataset.label_columns=[class, class]"])


@pytest.mark.parametrize(("override", "message"), [
    ("environment.number_of_workers=0", "'environment.number_of_workers' must be at least 1"),
    ("augmentation.mix_iterations=-3", "'augmentation.mix_iterations' must be at least 1"),
    ("environment.gpus_per_worker=-1", "'environment.gpus_per_worker' must be positive"),
    ("augmentation.time_mask_frames=-5", "'augmentation.time_mask_frames' must be at least 0"),
    ("augmentation.frequency_mask_bins=-1", "'augmentation.frequency_mask_bins' must be at least 0"),
    ("audio.training_chunk_seconds=.inf", "'audio.training_chunk_seconds' must be a finite number, got inf"),
    ("training.differential_learning_rate=.nan", "'training.differential_learning_rate' must be a finite number"),
    ("training.warmup_epochs=5", "'training.warmup_epochs' must be less than training.epochs (5 >= 5)"),
    ("training.warmup_epochs=7.5", "'training.warmup_epochs' must be less than training.epochs (7.5 >= 5)"),
])
def test_settings_out_of_range_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=r"gun_sound_resnet50\.yaml.*" + re.escape(message)):
        load_config(SEED_CONFIG, [override])


def test_a_warmup_as_long_as_training_is_refused_in_the_plan_too(synth_dir, tmp_path):
    """A config built in code skips load_config; the plan checks it before anything trains."""
    from gunsound.plan import prepare

    cfg = load_config(SEED_CONFIG, ["environment.seed=1"])
    cfg.training.warmup_epochs = cfg.training.epochs
    with pytest.raises(ConfigError, match="'training.warmup_epochs' must be less than training.epochs"):
        prepare(cfg, str(synth_dir), str(tmp_path / "out"))


def _catalog_page(tmp_path):
    """A copy of the Hydrogen Torch catalog page the seed config comes from (a Markdown page with one ```yaml
    block), or one made like it where shared/seed is not beside the checkout."""
    seed_page = REPO.parent / "shared" / "seed" / "000_5e48f5e7a1c78dcf.txt"
    text = (seed_page.read_text() if seed_page.exists() else
            "## Use Case 87: Gun Type Classification\n\n- `Data Type: Audio`\n\n### Config\n\n```yaml\n"
            + SEED_CONFIG.read_text() + "```\n\n### Notes\n\nTrained on: gun sounds.\n")
    page = tmp_path / "000_5e48f5e7a1c78dcf.txt"
    page.write_text(text)
    return page, text


def test_a_markdown_page_with_one_yaml_block_is_read_as_its_block(tmp_path):
    page, text = _catalog_page(tmp_path)
    cfg = load_config(page, ["training.epochs=2"])
    assert cfg.to_dict() == load_config(SEED_CONFIG, ["training.epochs=2"]).to_dict()
    with pytest.raises(ConfigError, match=r"000_5e48f5e7a1c78dcf.txt \(with overrides .*'training.epochz'"):
        load_config(page, ["training.epochz=2"])


def test_a_markdown_page_with_two_yaml_blocks_or_a_bad_block_is_still_not_valid_yaml(tmp_path):
    page, text = _catalog_page(tmp_path)
    block = text.split("```yaml\n")[1].split("```")[0]
    page.write_text(text + "\n```yaml\ntraining:\n    epochs: 3\n```\n")
    with pytest.raises(ConfigError, match="000_5e48f5e7a1c78dcf.txt: not valid YAML"):
        load_config(page)
    page.write_text(text.replace(block, block + "training:\n    epochs: 3\n"))
    first = text.splitlines().index("training:") + 1
    second = text[:text.index(block)].count("\n") + block.count("\n") + 1
    with pytest.raises(ConfigError, match=rf"its ```yaml block\): key 'training' appears twice \(lines {first} and "
                                          rf"{second}\)"):  # the page's lines
        load_config(page)
