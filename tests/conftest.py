"""Test configuration shared by the whole suite.

TRITON_INTERPRET must be set before any Triton kernel is defined: kernels run on the CPU in
interpreter mode here.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# One intra-op thread: the tests' tensors are small, and on a shared 2-core machine a second
# thread makes tiny forwards two orders of magnitude slower (spin-waiting), not faster.
torch.set_num_threads(1)

settings.register_profile(
    "qe", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "qe"))


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (built into the cache on first use)."""
    from qe.models.loading import load_model

    return load_model(None)


@pytest.fixture
def same_checkpoint_tensors():
    """``check(a, b)``: two ``qe quantize`` checkpoints hold the same tensor names and values
    (every shard their manifests list), naming the first tensor that differs."""
    import json

    from safetensors.torch import load_file

    def tensors(directory):
        manifest = json.loads((directory / "qe_manifest.json").read_text())
        out = {}
        for name in manifest["shards"]:
            out.update(load_file(str(directory / name)))
        return out

    def check(a, b):
        ta, tb = tensors(a), tensors(b)
        assert ta.keys() == tb.keys()
        for key in ta:
            assert torch.equal(ta[key], tb[key]), key

    return check
