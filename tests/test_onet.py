"""MTCNN's O-Net (issue 20, item 7): PReLU, ceil-mode max pooling, a permute before its Dense, three heads.

Saved with torch.export and converted for rpi4, its INT8 TFLite failed validation: `litert ... failed to
create XNNPACK runtime Node number 22 (TfLiteXNNPackDelegate) failed to prepare`. The cause: onnx2tf writes
a ceil-mode MaxPool as PADV2 with float32's minimum then a VALID pool; the TFLite converter calibrated that
constant into the activation's range (int8 scale 1.3e36), and XNNPACK refused the next CONV_2D, whose
requantization scale was far outside the range it takes. Now the ceil-mode padding reaches onnx2tf as
explicit (SAME where it is, else an edge-mode Pad), the artifact loads with XNNPACK, and where a delegate
still refuses a graph the runtime runs it on the built-in kernels and says so.

The O-Net here is the architecture of facenet-pytorch's `ONet`, rebuilt with torch alone: randomly
initialised (seeded; the test never needs the network), and with facenet-pytorch's own weights
(`data/onet.pt` from its wheel, fetched with `pip download --no-deps`; skipped where that is not possible).
Calibration: 48x48 crops of scikit-learn's two bundled sample photographs, normalised as MTCNN does.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import unavailable
from edgekit.convert import onnx_tflite, torch_source
from edgekit.convert.compat import delegate_refusal
from edgekit.convert.pipeline import convert
from edgekit.convert.recipe import Calibration, ConvertRecipe, Floor, Search
from edgekit.runtime import load

N_CAL, N_VAL = 240, 60           # fewer: the plain facenet build misses the floor and the ladder runs (x4 time)


class ONet(nn.Module):
    """facenet_pytorch.models.mtcnn.ONet, layer for layer (the names match its state dict)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, kernel_size=3)
        self.prelu1 = nn.PReLU(32)
        self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        self.prelu2 = nn.PReLU(64)
        self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
        self.conv3 = nn.Conv2d(64, 64, kernel_size=3)
        self.prelu3 = nn.PReLU(64)
        self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.conv4 = nn.Conv2d(64, 128, kernel_size=2)
        self.prelu4 = nn.PReLU(128)
        self.dense5 = nn.Linear(1152, 256)
        self.prelu5 = nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.softmax6_1 = nn.Softmax(dim=1)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)

    def forward(self, x):
        x = self.pool1(self.prelu1(self.conv1(x)))
        x = self.pool2(self.prelu2(self.conv2(x)))
        x = self.pool3(self.prelu3(self.conv3(x)))
        x = self.prelu4(self.conv4(x))
        x = x.permute(0, 3, 2, 1).contiguous()
        x = self.prelu5(self.dense5(x.view(x.shape[0], -1)))
        a = self.softmax6_1(self.dense6_1(x))
        return self.dense6_2(x), self.dense6_3(x), a


def _crops(n: int, seed: int = 0) -> np.ndarray:
    """n face-detector-sized crops (48x48, NCHW, (x - 127.5) / 128 as MTCNN feeds O-Net) of scikit-learn's
    bundled photographs, at random places and scales."""
    from sklearn.datasets import load_sample_images

    images = load_sample_images().images
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = images[k % len(images)]
        s = int(rng.integers(48, 200))
        y, x = int(rng.integers(0, im.shape[0] - s)), int(rng.integers(0, im.shape[1] - s))
        c = torch.from_numpy(im[y:y + s, x:x + s].astype(np.float32)).permute(2, 0, 1)[None]
        c = nn.functional.interpolate(c, size=(48, 48), mode="area")
        out.append(((c - 127.5) * 0.0078125)[0].numpy())
    return np.stack(out).astype(np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("onet-data")
    np.save(d / "calib.npy", _crops(N_CAL + N_VAL))
    return d / "calib.npy"


def _facenet_weights(where: Path):
    """facenet-pytorch's O-Net state dict from its wheel (PyPI), or None where pip cannot fetch it."""
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "-q", "-d", str(where), "facenet-pytorch"],
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    wheels = sorted(where.glob("facenet_pytorch-*.whl"))
    if proc.returncode != 0 or not wheels:
        return None
    with zipfile.ZipFile(wheels[-1]) as z:
        (where / "onet.pt").write_bytes(z.read("facenet_pytorch/data/onet.pt"))
    return torch.load(where / "onet.pt", weights_only=True)


def _export(model: nn.Module, path: Path, example: np.ndarray) -> Path:
    ep = torch.export.export(model.eval(), (torch.from_numpy(example[:1]),))
    torch.export.save(ep, str(path))
    return path


def _tflite_recipe(src: Path, calib: Path, floor: Floor = Floor(), search: Search = Search()):
    return ConvertRecipe(str(src), ("rpi4",), calibration=Calibration(str(calib)), formats=("tflite",),
                         name="onet", floor=floor, search=search, compat_check="off")


def _loads_with_xnnpack(model_file: Path) -> None:
    """The artifact prepares and runs in LiteRT with its default XNNPACK delegate (no fallback)."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(model_file))
    it.allocate_tensors()       # before the fix: failed to create XNNPACK runtime ... failed to prepare
    d = it.get_input_details()[0]
    it.set_tensor(d["index"], np.zeros(d["shape"], d["dtype"]))
    it.invoke()
    assert delegate_refusal(model_file.read_bytes()) is None


def _check_bundle(bundle: Path, calib: np.ndarray, reference: nn.Module, min_snr: float) -> dict:
    m = load(bundle)
    assert m.backend_note is None, m.backend_note
    assert m.providers == ["XNNPACK (default delegate)"]
    x = calib[-N_VAL:]
    with torch.no_grad():
        ref = [t.numpy() for t in reference(torch.from_numpy(x))]
    got = [m.run(**{m.inputs[0].name: x[i:i + 1]}) for i in range(len(x))]
    out = {}
    for k, spec in enumerate(m.outputs):   # the source's output order: boxes, landmarks, face probability
        y = np.concatenate([g[spec.name] for g in got])
        assert y.shape == ref[k].shape
        err = np.sum((y - ref[k]) ** 2)
        out[spec.name] = 10 * np.log10(np.sum(ref[k] ** 2) / max(err, 1e-30))
    assert min(out.values()) >= min_snr, out
    return out


def test_ceil_pool_padding_is_exact():
    """The MaxPool rewrite is the same function as ONNX's (ONNX Runtime, inputs all negative so that a zero
    padding would show), for ceil and explicit padding, SAME-equivalent or not."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    kinds = set()
    for h, k, s, ceil, p in itertools.product([6, 7, 21, 46], [2, 3], [1, 2], [0, 1], [0, 1]):
        node = helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[k, k], strides=[s, s], ceil_mode=ceil,
                                pads=[p, 0, p, p])
        graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, h, 9])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        before = model.SerializeToString()
        after, notes = onnx_tflite.explicit_pool_pads(before)
        x = -rng.uniform(1, 5, (1, 2, h, 9)).astype(np.float32)
        want = ort.InferenceSession(before).run(None, {"x": x})[0]
        got = ort.InferenceSession(after).run(None, {"x": x})[0]
        assert got.shape == want.shape and np.array_equal(got, want), (h, k, s, ceil, p, notes)
        kinds.update("SAME" if "SAME" in n else "edge" for n in notes)
    assert kinds == {"SAME", "edge"}      # both forms were exercised


def test_onet_random_weights_int8_tflite_runs_with_xnnpack(tmp_path, data):
    torch.manual_seed(0)
    net = ONet().eval()
    calib = np.load(data)
    src = _export(net, tmp_path / "onet.pt2", calib)
    # a random net's classes are not separated as a trained one's: the floor is not what this tests
    res = convert(_tflite_recipe(src, data, Floor(min_snr_db=-100.0, min_agreement=0.0), Search(rescue=False)),
                  str(tmp_path / "build"))
    row = res.bundles[0]
    assert row.ok, row.failure
    bundle = tmp_path / "build" / "onet-rpi4"
    _loads_with_xnnpack(bundle / "model.tflite")
    snr = _check_bundle(bundle, calib, net, min_snr=10.0)
    print("random O-Net, INT8 TFLite vs torch, SNR dB per output:", {k: round(v, 1) for k, v in snr.items()})


def test_onet_facenet_weights_int8_tflite_meets_floor(tmp_path, data):
    state = _facenet_weights(tmp_path / "wheel")
    if state is None:
        unavailable("facenet-pytorch's wheel cannot be fetched here (pip download failed)")
    net = ONet().eval()
    net.load_state_dict(state)
    calib = np.load(data)
    src = _export(net, tmp_path / "onet.pt2", calib)
    res = convert(_tflite_recipe(src, data), str(tmp_path / "build"))    # the default floor: 20 dB, 90%
    row = res.bundles[0]
    assert row.ok, row.failure
    bundle = tmp_path / "build" / "onet-rpi4"
    _loads_with_xnnpack(bundle / "model.tflite")
    snr = _check_bundle(bundle, calib, net, min_snr=15.0)
    print("facenet O-Net, INT8 TFLite vs torch, SNR dB per output:", {k: round(v, 1) for k, v in snr.items()})


def test_graph_xnnpack_refuses_runs_on_builtin_kernels_and_says_why(tmp_path, data, monkeypatch):
    """The graph as onnx2tf wrote it before (PADV2 with float32's minimum): the runtime runs it without
    XNNPACK and says so; convert names the node XNNPACK refuses and why."""
    monkeypatch.setattr(onnx_tflite, "explicit_pool_pads", lambda b: (b, []))
    monkeypatch.setattr(torch_source, "_SAVED", {})     # this process's SavedModels were built with the fix
    torch.manual_seed(0)
    net = ONet().eval()
    calib = np.load(data)
    src = _export(net, tmp_path / "onet.pt2", calib)
    res = convert(_tflite_recipe(src, data, Floor(min_snr_db=-100.0, min_agreement=0.0), Search(rescue=False)),
                  str(tmp_path / "build"))
    assert res.bundles[0].ok, res.bundles[0].failure
    bundle = tmp_path / "build" / "onet-rpi4"
    found = delegate_refusal((bundle / "model.tflite").read_bytes())
    assert found is not None and found["op"] == "CONV_2D", found
    assert "calibrated into that activation's range" in found["cause"] and "requantization scale" in found["cause"]
    made_with = load(bundle).manifest["golden"]["made_with"]
    assert "built-in kernels: XNNPACK refuses CONV_2D" in made_with, made_with

    with pytest.warns(RuntimeWarning, match="XNNPACK"):
        m = load(bundle)
    assert m.backend_note and "XNNPACK delegate refused" in m.backend_note and "built-in kernels" in m.backend_note
    assert m.providers == ["built-in kernels (XNNPACK refused the graph)"]
    assert m.benchmark(runs=5, warmup=1)["backend_note"] == m.backend_note
    from edgekit.runtime.check import golden_check

    check = golden_check(m)
    assert check["ok"] and check["backend_note"] == m.backend_note
