"""edgekit: trained model -> INT8 bundle per target -> edge device, with honest latency figures.

The package root imports nothing heavy; `edgekit.runtime` runs on a device with
numpy and one inference backend.
"""

__version__ = "0.1.0"
