"""``--compile``: torch.compile of the model where it pays, falling back to eager where it cannot compile."""
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


class CompiledOrEager(nn.Module):
    """Runs ``torch.compile(module)``; if compiling fails (no C++ compiler, an unsupported platform or op), says
    so once and runs the module eagerly from then on. An error that the eager module raises too (bad input) is
    raised as usual. The wrapped module is ``self.module``; checkpoints are written from it, unprefixed."""

    def __init__(self, module: nn.Module, **compile_kwargs):
        super().__init__()
        self.module = module
        # not registered as a submodule: the compiled wrapper shares module's parameters, listed once
        self.__dict__["compiled"] = torch.compile(module, **compile_kwargs)
        self.failed = False

    def forward(self, *args, **kwargs):
        if not self.failed:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as err:  # torch's compile errors have no common base class
                self.failed = True
                logger.warning("--compile: torch.compile failed (%s: %s); running eagerly instead",
                               type(err).__name__, str(err).splitlines()[0] if str(err) else "")
        return self.module(*args, **kwargs)
