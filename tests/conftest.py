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


@pytest.fixture
def quiet_transformers():
    """transformers' logging at errors only and warnings silenced, for tests that build many
    tiny random-init transformers models (use with ``pytest.mark.usefixtures``)."""
    import transformers

    transformers.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
