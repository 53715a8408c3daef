"""Config loading: every shipped config validates; each rejected input names key, value and what is allowed."""

import glob
import os

import pytest
import yaml

from pipeline.train.config import Config, ConfigError, apply_overrides, dump, from_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def base(**changes):
    raw = {"model": {"name": "digits_cnn"}, "split": {"cuts": ["flatten"]}, "data": {"source": "digits"}}
    for key, value in changes.items():
        raw = apply_overrides(raw, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"])
    return raw


def test_shipped_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"digits_cnn.yaml", "cats_vs_dogs.yaml", "image_folder.yaml", "resnet_synthetic.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_loads(path, tmp_path):
    overrides = []
    if "image_folder" in path:  # its default folder is the user's; point it at a real one
        for cls in ("a", "b"):
            (tmp_path / cls).mkdir()
        overrides = [f"data.path={tmp_path}"]
    cfg = load_config(path, overrides)
    assert isinstance(cfg, Config)
    assert cfg.split.stages >= 2
    assert cfg.train.validate and cfg.data.validation_split > 0  # validates on a validation set, never the test set


def test_image_folder_config_rejects_its_placeholder_folder():
    with pytest.raises(ConfigError, match=r"data\.path: got 'data/my_pictures'; the folder does not exist"):
        load_config(os.path.join(ROOT, "configs", "image_folder.yaml"), ["data.path=data/my_pictures"])


def test_overrides_parse_yaml_values():
    cfg = from_dict(base(), ["train.epochs=3", "optimizer.learning_rate=0.5", "split.cuts=[conv2, flatten]",
                             "pipeline.devices=cpu", "checkpoint.requeue=true"])
    assert cfg.train.epochs == 3 and cfg.optimizer.learning_rate == 0.5
    assert cfg.split.cuts == ("conv2", "flatten") and cfg.split.stages == 3
    assert cfg.checkpoint.requeue is True


def test_config_is_frozen():
    cfg = from_dict(base())
    with pytest.raises(Exception, match="cannot assign"):
        cfg.seed = 3


def test_dump_round_trips(tmp_path):
    cfg = from_dict(base(), ["train.epochs=2"])
    dump(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


REJECTIONS = [
    ("unknown_top_key", {"modle": 1}, r"modle: unknown key \(value 1\); allowed keys here: name, run_dir"),
    ("unknown_nested_key", {"train.epoch": 3}, r"train\.epoch: unknown key \(value 3\); allowed keys here: epochs"),
    ("wrong_type_int", {"train.epochs": "many"}, r"train\.epochs: got 'many'; expected an integer"),
    ("bool_is_not_int", {"data.batch_size": True}, r"data\.batch_size: got True; expected an integer"),
    ("wrong_type_bool", {"deterministic": "yes please"}, r"deterministic: got 'yes please'; expected true or false"),
    ("wrong_type_list", {"metrics": "accuracy"}, r"metrics: got 'accuracy'; expected a list of strings"),
    ("section_not_mapping", {"train": 5}, r"train: got 5; expected a mapping with keys epochs"),
    ("unknown_model", {"model.name": "resnet9000"}, r"model\.name: got 'resnet9000'; allowed: digits_cnn, mlp"),
    ("bad_model_arg", {"model.args": {"filtres": 8}},
     r"model\.args\.filtres: got 8; not an argument of model 'digits_cnn'; it takes: filters, hidden"),
    ("bad_custom_model", {"model.name": "my model:build"}, r"model\.name: got 'my model:build'; a custom model"),
    ("cut_not_in_model", {"split.cuts": ["conv9"]},
     r"split\.cuts\[0\]: got 'conv9'; not a layer of model 'digits_cnn'; its cut points are: conv1, conv2"),
    ("duplicate_cut", {"split.cuts": ["conv1", "conv1"]}, r"split\.cuts: got \['conv1', 'conv1'\]; each cut layer"),
    ("cuts_and_num_stages", {"split.num_stages": 2}, r"split: give either cuts \(\['flatten'\]\) or num_stages"),
    ("too_many_stages", {"split.cuts": [], "split.num_stages": 9},
     r"split\.num_stages: got 9; model 'digits_cnn' can be cut into at most 6 stages"),
    ("zero_stages", {"split.cuts": [], "split.num_stages": 0}, r"split\.num_stages: got 0; must be >= 1"),
    ("bad_balance", {"split.balance": "flops"}, r"split\.balance: got 'flops'; allowed: params, time"),
    ("devices_count", {"pipeline.devices": ["/CPU:0"]},
     r"pipeline\.devices: got \['/CPU:0'\]; give one device per stage \(2 stages\)"),
    ("devices_word", {"pipeline.devices": "tpu"}, r"pipeline\.devices: got 'tpu'; allowed: auto, cpu, gpu"),
    ("zero_microbatches", {"pipeline.microbatches": 0}, r"pipeline\.microbatches: got 0; must be >= 1"),
    ("microbatches_gt_batch", {"pipeline.microbatches": 64},
     r"pipeline\.microbatches: got 64; must be <= data\.batch_size \(32\)"),
    ("uneven_forbidden", {"pipeline.microbatches": 5, "pipeline.uneven_microbatches": "forbid"},
     r"data\.batch_size: got 32; must be divisible by pipeline\.microbatches \(5\) because "
     r"pipeline\.uneven_microbatches is 'forbid'"),
    ("bad_uneven_policy", {"pipeline.uneven_microbatches": "pad"},
     r"pipeline\.uneven_microbatches: got 'pad'; allowed: allow, forbid"),
    ("bad_schedule", {"pipeline.schedule": "zigzag"}, r"pipeline\.schedule: got 'zigzag'; allowed: 1f1b, gpipe"),
    ("bad_optimizer", {"optimizer.name": "adamax9"}, r"optimizer\.name: got 'adamax9'; allowed: adam, adamw, sgd"),
    ("negative_lr", {"optimizer.learning_rate": -0.1}, r"optimizer\.learning_rate: got -0\.1; must be > 0"),
    ("bad_loss", {"loss": "hinge_of_doom"}, r"loss: got 'hinge_of_doom'; allowed: sparse_categorical_crossentropy"),
    ("bad_metric", {"metrics": ["accuracy", "f1"]}, r"metrics\[1\]: got 'f1'; allowed: accuracy"),
    ("bad_source", {"data.source": "s3"}, r"data\.source: got 's3'; allowed: digits, tfds, image_folder, synthetic"),
    ("zero_batch", {"data.batch_size": 0}, r"data\.batch_size: got 0; must be >= 1"),
    ("key_of_other_source", {"data.path": "/tmp"},
     r"data\.path: got '/tmp'; not used with source 'digits' \(only with: image_folder\)"),
    ("bad_fraction", {"data.test_fraction": 1.5}, r"data\.test_fraction: got 1\.5; must be a fraction strictly"),
    ("validation_split_one", {"data.validation_split": 1.0},
     r"data\.validation_split: got 1\.0; must be a fraction >= 0 and < 1 \(0: no validation set\)"),
    ("validation_split_negative", {"data.validation_split": -0.1}, r"data\.validation_split: got -0\.1; must be"),
    ("old_validation_fraction", {"data.validation_fraction": 0.2},
     r"data\.validation_fraction: got 0\.2; renamed: the test share is data\.test_fraction; "
     r"data\.validation_split is the share of the training set held out for validation"),
    ("tfds_without_name", {"data.source": "tfds", "data.image_size": [8, 8]},
     r"data\.name: got None; source tfds needs a TFDS dataset name"),
    ("tfds_without_size", {"data.source": "tfds", "data.name": "mnist"},
     r"data\.image_size: got None; source tfds needs image_size"),
    ("bad_image_size", {"data.source": "tfds", "data.name": "mnist", "data.image_size": [8]},
     r"data\.image_size: got \[8\]; expected \[height, width\]"),
    ("folder_missing", {"data.source": "image_folder", "data.image_size": [8, 8], "data.path": "/no/such/dir"},
     r"data\.path: got '/no/such/dir'; the folder does not exist; it must hold one sub-folder per class"),
    ("folder_without_path", {"data.source": "image_folder", "data.image_size": [8, 8]},
     r"data\.path: got None; source image_folder needs path"),
    ("synthetic_without_shape", {"data.source": "synthetic"},
     r"data\.input_shape: got None; source synthetic needs input_shape"),
    ("synthetic_too_few", {"data.source": "synthetic", "data.input_shape": [4], "data.num_samples": 8},
     r"data\.num_samples: got 8; must be >= data\.batch_size \(32\)"),
    ("zero_epochs", {"train.epochs": 0}, r"train\.epochs: got 0; must be >= 1"),
    ("zero_steps", {"train.steps_per_epoch": 0}, r"train\.steps_per_epoch: got 0; must be >= 1"),
    ("bad_verbose", {"train.verbose": 3}, r"train\.verbose: got 3; allowed: 0, 1, 2"),
    ("zero_checkpoint_period", {"checkpoint.every_steps": 0}, r"checkpoint\.every_steps: got 0; must be >= 1"),
    ("negative_seed", {"seed": -1}, r"seed: got -1; must be >= 0"),
    ("bad_name", {"name": "my run/1"}, r"name: got 'my run/1'; use letters, digits"),
]


@pytest.mark.parametrize("changes,pattern", [r[1:] for r in REJECTIONS], ids=[r[0] for r in REJECTIONS])
def test_rejected(changes, pattern):
    raw = base()
    if changes.get("split.num_stages") is not None and "split.cuts" in changes:
        raw["split"] = {}
        changes = {k: v for k, v in changes.items() if k != "split.cuts"}
    with pytest.raises(ConfigError, match=pattern):
        from_dict(apply_overrides(raw, [f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}"
                                        for k, v in changes.items()]))


def test_folder_with_one_class_rejected(tmp_path):
    (tmp_path / "only").mkdir()
    with pytest.raises(ConfigError, match=r"data\.path: got .*; found 1 class sub-folder\(s\); need at least 2"):
        from_dict(base(), ["data.source=image_folder", "data.image_size=[8, 8]", f"data.path={tmp_path}"])


def test_top_level_not_mapping():
    with pytest.raises(ConfigError, match=r"<top level>: got \[1, 2\]; expected a mapping with keys name"):
        from_dict([1, 2])


def test_override_without_equals():
    with pytest.raises(ConfigError, match=r"--set 'train\.epochs': expected key\.sub=value"):
        from_dict(base(), ["train.epochs"])


def test_override_into_scalar():
    with pytest.raises(ConfigError, match=r"model\.name: got 'digits_cnn'; is not a mapping, cannot set model\.name\.x"):
        from_dict(base(), ["model.name.x=1"])


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file 'nope\.yaml' does not exist; pass a YAML file"):
        load_config("nope.yaml")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(path)


def test_error_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: -2}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.epochs: got -2; must be >= 1"):
        load_config(path)


def test_lists_come_from_their_one_home():
    from pipeline.core import balance, schedule
    from pipeline.train import config

    assert set(config.SCHEDULES) == set(schedule.NAMES) and list(config.SCHEDULES) == sorted(config.SCHEDULES)
    assert config.BALANCE_MODES is balance.BALANCE_MODES


def test_validation_split_zero_is_allowed():
    assert from_dict(base(), ["data.validation_split=0"]).data.validation_split == 0.0
