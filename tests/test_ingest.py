"""Ingest: every way raw input can be wrong gets one clear message."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from distilflow.errors import DistilflowError
from distilflow.params import DataParams
from tasks.data import ingest_stage, read_raw

DATA = DataParams(image_shape=(2, 2, 1), value_range=(0, 255), classes=None)


def write_csv(path, text):
    path.write_text(text)
    return path


def test_reads_labels_as_raw_text_and_features_as_floats(tmp_path):
    src = write_csv(tmp_path / "t.csv", "a,b,c,d,label\n1,2,3,4, 7 \n5,6,7,8,ten\n")
    df = read_raw(src, DATA)
    assert df["label"].tolist() == [" 7 ", "ten"]
    assert df.drop(columns="label").dtypes.unique().tolist() == [np.float64]


def test_parquet_source(tmp_path):
    pd.DataFrame({"y": [0, 1], "a": [1, 2], "b": [3, 4], "c": [5, 6], "d": [7, 8]}).to_parquet(tmp_path / "t.parquet")
    df = read_raw(tmp_path / "t.parquet", DATA.model_copy(update={"label_column": "y"}))
    assert df.shape == (2, 5) and df["label"].tolist() == ["0", "1"]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("t.csv", None, "data.source not found"),
        ("t.csv", "", "is empty"),
        ("t.csv", "a,b,c,d,label\n", "has a header but no rows"),
        ("t.csv", "a,b,c,d\n1,2,3,4\n", "label column 'label' not found"),
        ("t.csv", "a,b,c,d,label\n1,x,3,4,0\n", "non-numeric feature columns in .*'b' \\(e.g. 'x'\\)"),
        ("t.csv", "a,b,c,label\n1,2,3,0\n", "has 3 feature columns, but data.image_shape \\[2, 2, 1\\] needs 4"),
        ("t.parquet", "not parquet at all", "could not be read as parquet"),
        ("t.xlsx", "whatever", "unsupported file type '.xlsx'"),
        ("t.csv", 'a,b,c,d,label\n1,2,3,4,0\n"unclosed,1,2\n', "could not be read as csv"),
    ],
)
def test_bad_input_is_one_clear_error(tmp_path, name, content, message):
    src = tmp_path / name
    if content is not None:
        src.write_text(content)
    out = tmp_path / "out.parquet"
    with pytest.raises(DistilflowError, match=message):
        ingest_stage(src, out, DATA)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ([name] if content is not None else [])


def test_image_manifest(tmp_path):
    (tmp_path / "img").mkdir()
    Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8)).save(tmp_path / "img/a.png")
    Image.fromarray(np.full((4, 4, 3), 100, dtype=np.uint8)).save(tmp_path / "img/b.jpg", quality=100)
    src = write_csv(tmp_path / "manifest.csv", "path,label\nimg/a.png,cat\nimg/b.jpg,dog\n")
    df = read_raw(src, DATA)
    assert df.columns.tolist() == ["label", "px0", "px1", "px2", "px3"]
    assert df.iloc[0, 1:].tolist() == [0.0, 255.0, 255.0, 0.0]
    assert df.iloc[1, 1:].tolist() == pytest.approx([100.0] * 4, abs=2)  # RGB → L, resized 4x4 → 2x2
    write_csv(src, "path,label\nimg/a.png,cat\nimg/missing.png,dog\n")
    with pytest.raises(DistilflowError, match="image listed in the manifest not found: .*missing.png"):
        read_raw(src, DATA)
