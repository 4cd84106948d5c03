"""The models and artifacts the speed benchmarks compare, built here from what the repository
ships (no download): MLPerf Tiny's ResNet-8 (tests/models/mlperf-tiny) and Keras'
MobileNetV2 architecture (weights=None, 224x224x3, seeded, logits out, BatchNorm statistics
settled on real images: see _settle_batchnorm).

Each artifact is built once into a work directory and reused (delete the directory to
rebuild). Inputs are crops of scikit-learn's two bundled photographs.

    edgekit bundles        `edgekit convert` (the CLI, as a user runs it) for rpi4 and x86-avx2
    float32 TFLite         TFLiteConverter defaults
    float32 ONNX           tf2onnx (opset 17), then ONNX Runtime's quant_pre_process
    stock INT8             TFLiteConverter full-int8 recipe; quantize_static defaults
    candidate ONNX schemes quantize_static with each scheme worth trying on x86 without VNNI
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))    # stockroute: the stock quantize_static route, shared with the tests
RESNET8 = ROOT / "tests" / "models" / "mlperf-tiny" / "pretrainedResnet.h5"
MODELS = ("resnet8", "mobilenetv2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def image_crops(n: int, seed: int, size: int) -> np.ndarray:
    """n RGB crops (float32 0..255) of the two photographs scikit-learn ships."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    imgs = [np.asarray(i) for i in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        im = imgs[k % len(imgs)]
        s = int(rng.integers(max(48, size // 2), min(im.shape[:2])))
        y0, x0 = int(rng.integers(0, im.shape[0] - s + 1)), int(rng.integers(0, im.shape[1] - s + 1))
        crop = Image.fromarray(im[y0:y0 + s, x0:x0 + s]).resize((size, size), Image.BILINEAR)
        out.append(np.asarray(crop, np.float32))
    return np.stack(out)


def _settle_batchnorm(model, x: np.ndarray) -> None:
    """Untrained BatchNorm statistics (mean 0, variance 1) let activations vanish with depth
    (MobileNetV2's logits come out ~1e-11, which no INT8 output can represent). One forward pass in
    training mode with momentum 0 sets every layer's moving statistics to what it sees on real
    images (crops not used for calibration or validation), as a trained network's would be."""
    import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momenta = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 0.0
    model(x, training=True)
    for b, mom in zip(bns, momenta):
        b.momentum = mom


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Workdir:
    """Paths of one model's artifacts under the work directory."""

    def __init__(self, root: Path, model: str, calib_n: int = 100, val_n: int = 100):
        if model not in MODELS:
            raise SystemExit(f"unknown model {model!r}: choose from {', '.join(MODELS)}")
        self.model = model
        self.dir = Path(root) / model
        self.dir.mkdir(parents=True, exist_ok=True)
        self.size = 32 if model == "resnet8" else 224
        self.calib_n, self.val_n = calib_n, val_n

    # -- source and data --------------------------------------------------------
    def keras_path(self) -> Path:
        if self.model == "resnet8":
            return RESNET8
        p = self.dir / "mobilenetv2.keras"
        if not p.is_file():
            import keras

            say("building Keras MobileNetV2 (weights=None, seed 0, logits)")
            keras.utils.set_random_seed(0)
            # logits, not softmax: an untrained network's softmax is ~1/1000 everywhere, which an INT8
            # output rounds to one constant (SNR 0 dB whatever the scheme): no fidelity to compare
            m = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3), classifier_activation=None)
            _settle_batchnorm(m, self._prep(image_crops(32, 7, 224)))
            tmp = self.dir / "tmp-mobilenetv2.keras"
            m.save(tmp)
            os.replace(tmp, p)
        return p

    def _prep(self, x: np.ndarray) -> np.ndarray:
        # ResNet-8 (MLPerf Tiny) takes 0..255 pixels; MobileNetV2 takes -1..1
        return x if self.model == "resnet8" else x / 127.5 - 1.0

    def data(self, which: str) -> Path:
        p = self.dir / f"{which}.npz"
        if not p.is_file():
            n, seed = (self.calib_n, 0) if which == "calib" else (self.val_n, 1)
            tmp = self.dir / f"tmp-{which}.npz"
            np.savez(tmp, self._prep(image_crops(n, seed, self.size)).astype(np.float32))
            os.replace(tmp, p)
        return p

    def inputs(self, which: str) -> np.ndarray:
        with np.load(self.data(which)) as z:
            return z[z.files[0]]

    def keras_model(self):
        from edgekit.convert.native import import_keras_quietly

        keras = import_keras_quietly()
        return keras.models.load_model(self.keras_path(), compile=False)

    def reference(self) -> np.ndarray:
        """The float Keras model's outputs on the validation inputs."""
        p = self.dir / "reference.npy"
        if not p.is_file():
            y = self.keras_model().predict(self.inputs("val"), verbose=0, batch_size=16)
            np.save(p, y)
        return np.load(p)

    # -- edgekit's own bundles --------------------------------------------------
    def bundles(self, targets=("rpi4", "x86-avx2")) -> Dict[str, Path]:
        """{bundle dir name: path}, built with the `edgekit convert` command line."""
        out = self.dir / "edgekit"
        if not (out / ".done").is_file():
            say(f"{self.model}: edgekit convert for {', '.join(targets)} (a few minutes for MobileNetV2)")
            cmd = [sys.executable, "-m", "edgekit.cli", "convert", str(self.keras_path()), "-o", str(out),
                   "--calib", str(self.data("calib")), "--val", str(self.data("val")),
                   "--calib-samples", str(self.calib_n), "--compat-check", "off", "--no-rescue", "-q",
                   # the speed rows need each plain build whatever its fidelity (the table shows it):
                   # MobileNetV2's untrained weights put every INT8 build, stock ones too, below the floor
                   "--min-snr", "-100", "--min-agreement", "0",
                   "--name", self.model]
            for t in targets:
                cmd += ["-t", t]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode not in (0, 1):  # 1: some artifact missed its floor; the rest are written
                raise SystemExit(f"edgekit convert failed ({p.returncode}):\n{p.stderr[-3000:]}")
            if p.returncode == 1:
                say(f"edgekit convert: an artifact missed its floor:\n{p.stdout[-2000:]}")
            (out / ".done").write_text("")
        return {d.name: d for d in sorted(out.iterdir()) if (d / "manifest.json").is_file()}

    # -- float and stock artifacts ----------------------------------------------
    def float_tflite(self) -> Path:
        p = self.dir / "float32.tflite"
        if not p.is_file():
            import tensorflow as tf

            say(f"{self.model}: float32 TFLite (TFLiteConverter defaults)")
            conv = tf.lite.TFLiteConverter.from_keras_model(self.keras_model())
            _atomic(p, conv.convert())
        return p

    def _representative(self):
        x = self.inputs("calib")
        for i in range(len(x)):
            yield [x[i:i + 1]]

    def tflite_full_int8(self) -> Path:
        """TensorFlow's documented full-integer recipe: DEFAULT optimizations, representative
        data, INT8 builtins only, int8 input and output."""
        p = self.dir / "stock-full-int8.tflite"
        if not p.is_file():
            import tensorflow as tf

            say(f"{self.model}: TFLiteConverter full-int8")
            conv = tf.lite.TFLiteConverter.from_keras_model(self.keras_model())
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            conv.representative_dataset = self._representative
            conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
            _atomic(p, conv.convert())
        return p

    def tflite_dynamic(self) -> Path:
        p = self.dir / "stock-dynamic-range.tflite"
        if not p.is_file():
            import tensorflow as tf

            say(f"{self.model}: TFLiteConverter dynamic range")
            conv = tf.lite.TFLiteConverter.from_keras_model(self.keras_model())
            conv.optimizations = [tf.lite.Optimize.DEFAULT]
            _atomic(p, conv.convert())
        return p

    def float_onnx(self) -> Path:
        p = self.dir / "float32.onnx"
        if not p.is_file():
            from edgekit.convert.onnx import saved_model_to_onnx

            say(f"{self.model}: float32 ONNX (tf2onnx, opset 17)")
            with tempfile.TemporaryDirectory() as d:
                self.keras_model().export(d + "/sm", verbose=False)
                _atomic(p, saved_model_to_onnx(Path(d) / "sm", 17))
        return p

    def preprocessed_onnx(self) -> Path:
        """ONNX Runtime's quant_pre_process, which must work (sympy installed): a failure stops here."""
        p = self.dir / "float32-pre.onnx"
        if not p.is_file():
            from onnxruntime.quantization.shape_inference import quant_pre_process

            say(f"{self.model}: quant_pre_process")
            with tempfile.TemporaryDirectory() as d:
                cwd = os.getcwd()
                os.chdir(d)  # symbolic shape inference may leave a temp file in the working dir
                try:
                    quant_pre_process(str(self.float_onnx()), str(Path(d) / "pre.onnx"), skip_symbolic_shape=False)
                finally:
                    os.chdir(cwd)
                _atomic(p, (Path(d) / "pre.onnx").read_bytes())
        return p

    def onnx_scheme(self, name: str, **kw) -> Path:
        """quantize_static on the pre-processed float model; kw as quantize_static's arguments
        (strings for the enums). name='stock-quantize-static-defaults': no arguments at all."""
        p = self.dir / f"{name}.onnx"
        if not p.is_file():
            from onnxruntime.quantization import QuantFormat, QuantType
            from stockroute import quantize_static

            say(f"{self.model}: quantize_static {name}")
            x = self.inputs("calib")
            from onnxruntime import InferenceSession

            in_name = InferenceSession(str(self.preprocessed_onnx()),
                                       providers=["CPUExecutionProvider"]).get_inputs()[0].name

            args = dict(kw)
            if "quant_format" in args:
                args["quant_format"] = getattr(QuantFormat, args["quant_format"])
            for k in ("activation_type", "weight_type"):
                if k in args:
                    args[k] = getattr(QuantType, args[k])
            with tempfile.TemporaryDirectory() as d:
                quantize_static(self.preprocessed_onnx(), Path(d, "q.onnx"), in_name, x, **args)
                _atomic(p, Path(d, "q.onnx").read_bytes())
        return p

    def onnx_dynamic(self) -> Path:
        p = self.dir / "stock-quantize-dynamic.onnx"
        if not p.is_file():
            from onnxruntime.quantization import quantize_dynamic

            say(f"{self.model}: quantize_dynamic")
            with tempfile.TemporaryDirectory() as d:
                quantize_dynamic(str(self.preprocessed_onnx()), d + "/q.onnx")
                _atomic(p, Path(d, "q.onnx").read_bytes())
        return p


# The ONNX schemes worth trying on x86 without VNNI (see targets/x86-avx2.toml)
ONNX_SCHEMES: Dict[str, dict] = {
    "u8s8-qdq-pc-rr": dict(quant_format="QDQ", activation_type="QUInt8", weight_type="QInt8",
                           per_channel=True, reduce_range=True),
    "u8s8-qoperator-pc-rr": dict(quant_format="QOperator", activation_type="QUInt8", weight_type="QInt8",
                                 per_channel=True, reduce_range=True),
    "u8s8-qdq-pt-rr": dict(quant_format="QDQ", activation_type="QUInt8", weight_type="QInt8",
                           per_channel=False, reduce_range=True),
    "s8s8-qdq-pc": dict(quant_format="QDQ", activation_type="QInt8", weight_type="QInt8",
                        per_channel=True, reduce_range=False),
    "u8u8-qdq-pc": dict(quant_format="QDQ", activation_type="QUInt8", weight_type="QUInt8",
                        per_channel=True, reduce_range=False),
}


def fidelity(y: np.ndarray, ref: np.ndarray) -> Dict[str, float]:
    from edgekit.runtime.check import snr_db

    snr = snr_db(ref, y)
    return {"top1_agreement": float((y.argmax(-1) == ref.argmax(-1)).mean()),
            "snr_db": float(snr) if np.isfinite(snr) else 999.0}


def cpu_kind() -> Dict[str, object]:
    from edgekit.runtime.cpuid import cpu_flags

    flags = cpu_flags()
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    kind = "VNNI" if vnni else ("AVX2-only" if "avx2" in flags else "other")
    return {"kind": kind, "avx2": "avx2" in flags, "avx512f": "avx512f" in flags, "vnni": vnni}


def write_result(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def default_work() -> Path:
    return Path(os.environ.get("EDGEKIT_BENCH_WORK", Path(tempfile.gettempdir()) / "edgekit-bench"))


def size_of(p: Path) -> int:
    if p.is_dir():
        m = json.loads((p / "manifest.json").read_text())
        return int(m["model"]["bytes"])
    return p.stat().st_size


