"""tflite-runtime 2.14 on aarch64 (the Pi's oldest runtime; here under qemu) crashes on int8
FULLY_CONNECTED with more than one row. The golden check runs one sample at a time, multi-row
FULLY_CONNECTED ops are rewritten as 1x1 CONV_2D (edgekit.convert.tflite_fc), and a crash that
remains is bisected to its op and shape. Models are tiny: qemu is slow."""

import json

import numpy as np
import pytest

from edgekit.bundle import read_bundle
from edgekit.convert import Calibration, ConvertRecipe, convert
from edgekit.convert.recipe import Floor, Search
from edgekit.errors import ConversionError
from edgekit.runtime import load

pytestmark = pytest.mark.usefixtures("emulated_root")


@pytest.fixture(scope="module")
def emulated_root():
    """The cached arm64 root (Debian 12, tflite-runtime 2.14, numpy<2): built on first use."""
    from edgekit.lab import emulated

    emulated.build(say=lambda t: print(t, flush=True))


def _tiny(path):
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    keras.Sequential([keras.Input((12, 12, 2)), L.Conv2D(8, 3, activation="relu"), L.Flatten(),
                      L.Dense(4)]).save(path)


def _rank3(path):
    import keras

    keras.utils.set_random_seed(0)
    keras.Sequential([keras.Input((32, 16)), keras.layers.Dense(8, bias_initializer="random_normal")]).save(path)


def _encoder(path):
    """One transformer encoder block: multi-head attention, layer norm, GELU MLP; 32 tokens."""
    import keras

    keras.utils.set_random_seed(0)
    L = keras.layers
    x = keras.Input((32, 16))
    h = L.LayerNormalization()(x + L.MultiHeadAttention(2, 8)(x, x))
    f = L.Dense(16)(L.Dense(32, activation="gelu")(h))
    y = L.Dense(4)(L.GlobalAveragePooling1D()(L.LayerNormalization()(h + f)))
    keras.Model(x, y).save(path)


def _data(tmp_path, shape, n=48):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "calib.npy", rng.normal(size=(n, *shape)).astype(np.float32))
    np.save(tmp_path / "val.npy", rng.normal(size=(16, *shape)).astype(np.float32))
    return tmp_path / "calib.npy", tmp_path / "val.npy"


def _convert(model, tmp_path, calib, val, out="out", mode="emulated"):
    """For rpi4, full INT8 as to_tflite builds it (no rescue ladder: the artifact under test is the
    rewritten one). These models are untrained, their logits near ties: top-1 agreement on 16
    samples means little, so the floor is SNR (20 dB) with agreement relaxed to 50%."""
    return convert(ConvertRecipe(str(model), ["rpi4"], calibration=Calibration(str(calib)), validation=str(val),
                                 formats=["tflite"], compat_check=mode, floor=Floor(min_agreement=0.5),
                                 search=Search(rescue=False, mixed_precision=False)), str(tmp_path / out))


def _record(result):
    return read_bundle(result.bundles[0].path).manifest["compatibility"][0]


def test_tiny_model_passes_at_batch_one(tmp_path):
    _tiny(tmp_path / "tiny.keras")
    calib, val = _data(tmp_path, (12, 12, 2))
    rec = _record(_convert(tmp_path / "tiny.keras", tmp_path, calib, val))
    assert rec["where"] == "emulated aarch64 (qemu)" and rec["ok"] and rec["backend_version"] == "2.14.0"
    assert rec["batch"] == 1 and rec["samples"] > 1      # the golden stack, run one sample at a time
    assert "graph_rewrites" not in rec                  # Flatten -> Dense at batch 1: one row, left alone


def _unrewritten(monkeypatch):
    from edgekit.convert import tflite_fc

    monkeypatch.setattr(tflite_fc, "rewrite", lambda data: (data, []))


@pytest.mark.parametrize("build", [_rank3, _encoder], ids=["rank3-dense", "encoder"])
def test_rank3_models_pass_with_the_rewrite_and_keep_their_fidelity(build, tmp_path, monkeypatch,
                                                                     record_property):
    build(tmp_path / "m.keras")
    calib, val = _data(tmp_path, (32, 16))
    fixed = _convert(tmp_path / "m.keras", tmp_path, calib, val)
    rec = _record(fixed)
    assert rec["ok"] and rec["where"] == "emulated aarch64 (qemu)" and rec["backend_version"] == "2.14.0"
    rewrites = rec["graph_rewrites"]
    assert rewrites and all(r["rows"] == 32 and r["as"].startswith("RESHAPE -> CONV_2D") for r in rewrites)
    with monkeypatch.context() as mp:  # the same conversion without the rewrite, for comparison
        _unrewritten(mp)
        plain = _convert(tmp_path / "m.keras", tmp_path, calib, val, out="plain", mode="off")
    # on the host: the rewritten and the plain model, same int8 inputs, outputs in quantization steps
    a, b = load(fixed.bundles[0].path), load(plain.bundles[0].path)
    x = np.load(val)
    qa, qb = (m.run(m.inputs[0].quantize(x), raw=True) for m in (a, b))
    steps = max(int(np.abs(qa[k].astype(int) - qb[k].astype(int)).max()) for k in qa)
    snr = {n: r.artifact.metrics["outputs"][r.artifact.metrics["primary_output"]]["snr_db"]
           for n, r in (("rewritten", fixed.bundles[0]), ("plain", plain.bundles[0]))}
    record_property("max_steps", steps)
    record_property("snr_db", json.dumps(snr))
    print(f"{build.__name__}: {len(rewrites)} FULLY_CONNECTED rewritten; rewritten vs plain on the host: "
          f"max {steps} steps; SNR vs float: rewritten {snr['rewritten']:.2f} dB, plain {snr['plain']:.2f} dB")
    assert steps <= 1
    assert abs(snr["rewritten"] - snr["plain"]) <= 0.5


def test_unrewritten_crash_is_bisected_named_and_accepted_only_when_asked(tmp_path, monkeypatch):
    """Without the rewrite the rank-3 Dense crashes 2.14 under qemu: the check fails naming
    FULLY_CONNECTED and its shape, and says it cannot tell emulation from runtime; accept-crash
    records the finding for the manifest instead of failing."""
    from edgekit.convert import compat
    from edgekit.targets import load_target

    _unrewritten(monkeypatch)
    _rank3(tmp_path / "m.keras")
    calib, val = _data(tmp_path, (32, 16))
    bundle = _convert(tmp_path / "m.keras", tmp_path, calib, val, mode="off").bundles[0].path
    rpi4, cache = load_target("rpi4"), {}  # the second check reuses the first's finding (as convert does)
    with pytest.raises(ConversionError) as e:
        compat.check(bundle, rpi4, "tflite", "emulated", cache, "plain-rank3")
    msg = str(e.value)
    assert "op FULLY_CONNECTED" in msg and "int8[32, 16]" in msg and "cannot be attributed" in msg, msg
    assert "accept-crash" in (e.value.hint or "")
    rec = compat.check(bundle, rpi4, "tflite", "accept-crash", cache, "plain-rank3")[0]
    crash = rec["crash"]
    print(crash["statement"], f"({crash['probes']} runs, {crash['seconds']} s)")
    assert rec["ok"] is False and rec["accepted"].startswith("--compat-check accept-crash")
    assert compat.describe(rec).startswith("CRASHES in tflite-runtime==2.14.0")   # not "loads and matches"
    assert crash["op"] == "FULLY_CONNECTED" and crash["inputs"][0]["shape"] == [32, 16]
    assert crash["attributed"] is False and crash["reference_kernels_run"] is True and crash["batch"] == 1
