import os
import sys

# Tests import the flat modules (gpt.py, vit.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

# The tests run tiny models, for which one thread is faster than several (and CI has 2 cores).
torch.set_num_threads(1)
