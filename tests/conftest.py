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


_HIGH_WATER_SCRIPT = """
import sys
import torch
{setup}

def high_water():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

d = int(sys.argv[1])
g = torch.Generator().manual_seed(0)
X = torch.randn(d + 16, d, generator=g)
H = (X.T @ X).double()
del X
W = torch.randn(8, d, generator=g)
run(W[:, :64], H[:64, :64].clone())  # lazy imports and allocator warm-up
with open("/proc/self/clear_refs", "w") as fh:  # the high-water mark restarts from what is held now
    fh.write("5")
base = high_water()
run(W, H)
print((high_water() - base) / (d * d * 8))
"""


@pytest.fixture
def matrices_held():
    """``measure(setup, d)``: how far one call ``run(W, H)`` raises a fresh process's memory
    high-water mark, in ``d × d`` float64 matrices; ``setup`` is Python source defining ``run``,
    ``H`` a ``d × d`` float64 Hessian, ``W`` an ``(8, d)`` weight. glibc's mmap threshold is
    fixed, so every large block is mapped and unmapped as it is allocated and freed: the mark
    then counts what the code holds, not what the allocator keeps of it (which moved the figure
    by up to 0.8 matrices from run to run)."""
    import subprocess
    import sys

    def measure(setup: str, d: int) -> float:
        out = subprocess.run([sys.executable, "-c", _HIGH_WATER_SCRIPT.format(setup=setup), str(d)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"})
        return float(out.stdout.strip())

    return measure
