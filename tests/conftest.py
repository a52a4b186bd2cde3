import os
import sys

# Tests import the flat modules (gpt.py, vit.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

# The tests run tiny models, for which one thread is faster than several (and CI has 2 cores).
torch.set_num_threads(1)

# A shell's MAGMA_ATTENTION=triton (say) would change which attention every test runs; the tests that
# need one implementation set it themselves. (MAGMA_FLASH_AUTOTUNE=0 is kept: it only pins the kernel's
# block sizes, which saves minutes of compiling on a GPU.)
os.environ.pop("MAGMA_ATTENTION", None)


@pytest.fixture
def no_tf32():
    """fp32 on a GPU as exact as on the CPU for the test: no TF32 in matmuls or convolutions (cuDNN
    allows it by default, and the ViT's patch embedding is a convolution)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
