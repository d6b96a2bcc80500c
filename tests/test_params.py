import pytest

from distilflow.errors import DistilflowError
from distilflow.params import Params, load_params, params_from_dict
from tests.conftest import REPO


def test_repo_params_file_is_valid_and_matches_defaults_where_unset():
    params = load_params(REPO / "params.yaml")
    assert params.data.image_shape == (8, 8, 1)
    assert params.split.train + params.split.val + params.split.test == pytest.approx(1.0)


def test_unknown_key_names_the_key_and_the_allowed_keys():
    with pytest.raises(DistilflowError) as err:
        params_from_dict({"clean": {"drop_dupes": True}})
    msg = str(err.value)
    assert "unknown key 'clean.drop_dupes'" in msg
    assert "drop_duplicates" in msg


def test_unknown_section():
    with pytest.raises(DistilflowError, match="unknown key 'trian'"):
        params_from_dict({"trian": {}})


def test_wrong_type_names_the_key():
    with pytest.raises(DistilflowError, match=r"split\.train"):
        params_from_dict({"split": {"train": "most", "val": 0.15, "test": 0.15}})


def test_bad_choice_lists_allowed_values():
    with pytest.raises(DistilflowError) as err:
        params_from_dict({"clean": {"nonfinite": "zero"}})
    assert "clean.nonfinite" in str(err.value) and "'drop'" in str(err.value) and "'impute'" in str(err.value)


def test_fractions_must_sum_to_one():
    with pytest.raises(DistilflowError, match="must sum to 1, got 1.1"):
        params_from_dict({"split": {"train": 0.8, "val": 0.15, "test": 0.15}})


@pytest.mark.parametrize(
    "section,key,value", [("seed", None, -1), ("split", "test", -0.1), ("clean", "min_samples_per_class", -3)]
)
def test_negative_values_are_rejected(section, key, value):
    raw = {section: value} if key is None else {section: {key: value}}
    if section == "split":
        raw["split"] |= {"train": 0.95, "val": 0.15}
    with pytest.raises(DistilflowError, match=section):
        params_from_dict(raw)


def test_model_stages_need_validation_and_test_parts():
    with pytest.raises(DistilflowError, match="split.val and split.test must be > 0"):
        params_from_dict({"split": {"train": 0.8, "val": 0.0, "test": 0.2}})


def test_per_channel_needs_an_image_shape():
    with pytest.raises(DistilflowError, match="per_channel needs data.image_shape"):
        params_from_dict({"normalize": {"method": "per_channel"}, "data": {"image_shape": None}})


def test_overrides_apply_for_one_run_and_are_validated(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("split: {train: 0.7, val: 0.15, test: 0.15}\n")
    params = load_params(path, ["split.train=0.6", "split.val=0.25", "normalize.method=minmax", "data.classes=[a, b]"])
    assert (params.split.train, params.split.val, params.normalize.method) == (0.6, 0.25, "minmax")
    assert params.data.classes == ["a", "b"]
    assert "split: {train: 0.7" in path.read_text()  # the file is untouched
    with pytest.raises(DistilflowError, match="unknown key 'split.tset'"):
        load_params(path, ["split.tset=0.2"])
    with pytest.raises(DistilflowError, match="KEY=VALUE"):
        load_params(path, ["split.test"])


def test_malformed_yaml_names_the_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("split:\n  train: 0.7\n   val: [0.15\n")
    with pytest.raises(DistilflowError, match=r"not valid YAML at line \d+"):
        load_params(path)


def test_params_file_must_be_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(DistilflowError, match="must be a mapping"):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(DistilflowError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_hash_changes_with_any_value():
    assert Params().hash() == Params().hash()
    assert Params().hash() != params_from_dict({"split": {"test_seed": 1}}).hash()
