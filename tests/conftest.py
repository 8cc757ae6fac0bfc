import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One intra-op thread: tests spawn several ranks on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _no_model_parallel_unit_left_behind():
    """A model-parallel unit is process state (like torch's default group): an in-process test that
    makes one (a one-stage PipelineModule, initialize_model_parallel) must not hand it to the next."""
    yield
    from shardspeed.comm.model_parallel import destroy_model_parallel

    destroy_model_parallel()
