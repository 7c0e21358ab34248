import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))  # the shared `zoo` helpers
torch.set_num_threads(1)  # xdist runs one worker per core
