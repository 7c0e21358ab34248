import gc
import os
import sys
import warnings

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared `zoo` helpers
torch.set_num_threads(1)  # xdist runs one worker per core


@pytest.fixture(autouse=True)
def _release_cycles():
    """Collect reference cycles after each test: a traced model's GraphModules and graphs
    point at each other, so without a collection a 12 GB model's weights outlive its test
    and the next big model stacks on top (measured: two giant zoo tests in one process
    peaked at 19.2 GB, each alone at 11.8 GB)."""
    yield
    gc.collect()


@pytest.fixture(autouse=True)
def _no_process_group_left():
    """A test that starts without a torch.distributed process group must end without one: the
    next test on the same xdist worker would find it (test_ddp and test_fsdp check that prunefx
    refuses to run without one; docs/api.md once created it in one block and destroyed it in a
    later one, and left it behind when its blocks were split over the workers). The group is
    destroyed and the test that left it fails, rather than whichever test comes next."""
    import torch.distributed as dist

    def live() -> bool:
        return dist.is_available() and dist.is_initialized()

    before = live()
    yield
    if not before and live():
        dist.destroy_process_group()
        pytest.fail("the test left a torch.distributed process group initialised; destroy it where it is created")


@pytest.fixture
def quiet_transformers():
    """transformers' logging at errors only and warnings silenced, for tests that build many
    tiny random-init transformers models (use with ``pytest.mark.usefixtures``)."""
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
