"""Make accelerate apply its FSDP plugin on CPU, so the demo and CI run real FSDP2 over gloo.

Why: accelerate (checked on 1.15.0) decides the distributed type from the hardware. On a machine without GPUs a
multi-process launch becomes DistributedType.MULTI_CPU and the FSDP plugin built from the config is silently
dropped, so training runs as plain DDP. PyTorch's FSDP2 itself works on CPU with gloo; only accelerate's choice
is in the way. This module flips that one choice, and nothing else:

- active only when the launch asked for FSDP (ACCELERATE_USE_FSDP=true) and no CUDA device exists;
- never touches a GPU run (the function returns before patching);
- announces itself with one log line;
- verify_fsdp_applied() raises if an accelerate upgrade makes the patch ineffective, and
  tests/test_train_fsdp.py asserts the parameters really are DTensors sharded over the ranks.
"""

import logging
import os

import accelerate
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

TESTED_ACCELERATE = "1.15.0"
logger = logging.getLogger(__name__)


def wants_fsdp_on_cpu():
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available()


def enable_fsdp_on_cpu():
    """Patch AcceleratorState so a multi-process CPU launch with an FSDP config really uses FSDP."""
    if not wants_fsdp_on_cpu() or getattr(AcceleratorState, "_cpu_fsdp_patched", False):
        return False
    # Without a GPU, accelerate only forms a multi-process group when told the run is on CPU.
    os.environ["ACCELERATE_USE_CPU"] = "true"
    original_init = AcceleratorState.__init__

    def init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
            if self.mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self.mixed_precision)
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init_with_fsdp_on_cpu
    AcceleratorState._cpu_fsdp_patched = True
    note = "" if accelerate.__version__ == TESTED_ACCELERATE else f" (tested with {TESTED_ACCELERATE}, found {accelerate.__version__})"
    logger.warning("cpu_fsdp: no GPU and an FSDP launch config: patching accelerate to apply FSDP on CPU (gloo)%s", note)
    return True


def verify_fsdp_applied(accelerator):
    """Fail loudly when the CPU patch was requested but accelerate still chose another distributed type."""
    if wants_fsdp_on_cpu() and accelerator.num_processes > 1 and accelerator.distributed_type != DistributedType.FSDP:
        raise RuntimeError(
            f"cpu_fsdp: accelerate {accelerate.__version__} ran as {accelerator.distributed_type} instead of FSDP; "
            f"the CPU patch in cpu_fsdp.py no longer works with this version (tested with {TESTED_ACCELERATE})."
        )
