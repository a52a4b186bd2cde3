import os
import sys

# Tests import the flat modules (gpt.py, vit.py, ...) from the repository root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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


class OpsMaking(TorchDispatchMode):
    """Inside `with`, records the name of every op (views aside, and matmuls unless matmuls=True) one of
    whose outputs is a tensor for which match(tensor) holds: how the tests count the passes over, or the
    copies of, an activation (e.g. `OpsMaking(lambda t: t.dtype == torch.float32 and t.shape == shape)`)."""
    MATMULS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    def __init__(self, match, matmuls=False):
        super().__init__()
        self.match, self.matmuls, self.ops = match, matmuls, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view and (self.matmuls or func not in self.MATMULS):
            outs = out if isinstance(out, (tuple, list)) else [out]
            if any(isinstance(t, torch.Tensor) and self.match(t) for t in outs):
                self.ops.append(func.__name__)
        return out


@pytest.fixture
def ops_making():
    """The OpsMaking recorder class, for tests that count passes over an activation."""
    return OpsMaking
