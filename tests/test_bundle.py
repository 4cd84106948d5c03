import json

import numpy as np
import pytest

from edgekit.bundle import check_name, read_bundle, sha256_tree, write_bundle
from edgekit.errors import BundleError

MANIFEST = {"name": "m", "target": {"name": "t"}, "inputs": [], "outputs": []}


def _write(dest, **kw):
    return write_bundle(dest, fmt="tflite", model_bytes=b"model-bytes", manifest=dict(MANIFEST),
                        golden={"input:x": np.zeros((1, 2), np.float32)}, **kw)


def test_write_read_verify(tmp_path):
    b = _write(tmp_path / "m-t")
    assert b.model_path.read_bytes() == b"model-bytes"
    m = json.loads((tmp_path / "m-t" / "manifest.json").read_text())
    from edgekit.bundle import SCHEMA_VERSION

    assert m["model"]["bytes"] == 11 and len(m["model"]["sha256"]) == 64 and m["schema"] == SCHEMA_VERSION
    assert read_bundle(tmp_path / "m-t").digest() == sha256_tree(tmp_path / "m-t")
    assert [p.name for p in tmp_path.iterdir()] == ["m-t"]  # no temporaries left


def test_tampered_model_is_detected(tmp_path):
    _write(tmp_path / "m-t")
    (tmp_path / "m-t" / "model.tflite").write_bytes(b"model-bytez")
    with pytest.raises(BundleError, match="sha256"):
        read_bundle(tmp_path / "m-t")
    (tmp_path / "m-t" / "model.tflite").write_bytes(b"short")
    with pytest.raises(BundleError, match="bytes"):
        read_bundle(tmp_path / "m-t")


def test_failed_write_leaves_nothing_and_keeps_the_old_bundle(tmp_path):
    _write(tmp_path / "m-t")
    before = sha256_tree(tmp_path / "m-t")

    def boom(_tmp):
        raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "m-t", fmt="onnx", model_bytes=b"new", manifest=dict(MANIFEST),
                     golden={}, check=boom)
    assert sha256_tree(tmp_path / "m-t") == before
    assert [p.name for p in tmp_path.iterdir()] == ["m-t"]
    with pytest.raises(RuntimeError):
        write_bundle(tmp_path / "fresh", fmt="onnx", model_bytes=b"new", manifest=dict(MANIFEST),
                     golden={}, check=boom)
    assert not (tmp_path / "fresh").exists()


@pytest.mark.parametrize("bad", ["../x", "a/b", "..", ".hidden", "-rf", "a b", "x;rm", "", "a" * 200])
def test_names_that_could_escape_are_refused(bad):
    with pytest.raises(BundleError):
        check_name(bad)


def test_not_a_bundle(tmp_path):
    with pytest.raises(BundleError, match="no manifest.json"):
        read_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        read_bundle(tmp_path)
