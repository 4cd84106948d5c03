"""The golden check runs stacked samples the way a device application runs the model: one at a
time for a dynamic batch, in chunks of a fixed batch (issue 16). Pure logic: a recording model."""

import numpy as np
import pytest

from edgekit.runtime.check import batch_size, run_like_a_device
from edgekit.runtime.spec import TensorSpec


class Recorder:
    def __init__(self, *shapes):
        self.inputs = [TensorSpec(f"x{i}", s, "float32") for i, s in enumerate(shapes)]
        self.seen = []

    def run(self, **feeds):
        self.seen.append({k: v.shape[0] for k, v in feeds.items()})
        return {"y": feeds["x0"].reshape(len(feeds["x0"]), -1).sum(1, keepdims=True)}


@pytest.mark.parametrize("shapes, n, batch, runs", [
    (((-1, 4),), 8, 1, [1] * 8),                 # dynamic batch: one sample at a time
    (((1, 4),), 8, 1, [1] * 8),                  # fixed batch 1
    (((4, 4),), 8, 4, [4, 4]),                   # fixed batch 4: chunks of 4
    (((-1, 4), (-1, 2)), 3, 1, [1, 1, 1]),       # two inputs, each sliced alike
])
def test_chunks(shapes, n, batch, runs):
    m = Recorder(*shapes)
    feeds = {s.name: np.arange(n * int(np.prod(s.shape[1:])), dtype=np.float32).reshape(n, *s.shape[1:])
             for s in m.inputs}
    assert batch_size(m) == batch
    out = run_like_a_device(m, feeds)
    assert [r["x0"] for r in m.seen] == runs
    np.testing.assert_array_equal(out["y"], feeds["x0"].reshape(n, -1).sum(1, keepdims=True))
