"""The on-device runtime: numpy and one backend (LiteRT, tflite-runtime, TensorFlow Lite, ONNX Runtime).

    from edgekit.runtime import load
    model = load("build/model-rpi4")     # a bundle, or any .tflite / .onnx file
    y = model(x)                          # float in, float out
    report = model.benchmark(runs=200, warmup=20)
    lm = load("build/qwen-rpi5-int4")     # a language-model bundle: a LanguageModel (see runtime.llm)
    lm.generate("Once upon a time", max_new_tokens=64)

No backend is imported until a model of its format is loaded, and numpy not until
a model is (so `python -m edgekit.runtime release ...` bookkeeping starts fast).
"""

__all__ = ["load", "Model", "LanguageModel", "TensorSpec", "BACKENDS"]


def __getattr__(name):
    if name in ("load", "Model", "BACKENDS"):
        from edgekit.runtime import model

        return getattr(model, name)
    if name == "LanguageModel":
        from edgekit.runtime.llm import LanguageModel

        return LanguageModel
    if name == "TensorSpec":
        from edgekit.runtime.spec import TensorSpec

        return TensorSpec
    raise AttributeError(f"module 'edgekit.runtime' has no attribute {name!r}")
