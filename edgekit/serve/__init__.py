"""edgekit serve: the device's inference API, KServe Open Inference Protocol v2 over HTTP/REST
with the binary tensor extension (the protocol Triton, OpenVINO Model Server and MLServer speak).

    python -m edgekit.serve build/model-rpi4            # a bundle
    python -m edgekit.serve ~/.edgekit                  # every deployed model; follows `current`

Device side: imports edgekit.runtime, edgekit.bundle, edgekit.errors, numpy and the standard
library; uvicorn (the `serve` extra) only when the server starts.
"""

__all__ = ["ServeConfig", "build", "serve"]


def __getattr__(name):
    if name in __all__:
        from edgekit.serve import server

        return getattr(server, name)
    raise AttributeError(f"module 'edgekit.serve' has no attribute {name!r}")
