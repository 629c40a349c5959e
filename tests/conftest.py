import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run, so CI is reproducible;
# HYPOTHESIS_PROFILE=explore draws new ones each run (the database keeps failures).
settings.register_profile("reproducible", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
