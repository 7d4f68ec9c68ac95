"""Distributed helpers: FSDP on CPU, full state dicts for saving, one outcome on every rank, free ports.

FSDP on CPU (the demo and CI run real FSDP2 over gloo). Why: accelerate (checked on 1.15.0) decides the distributed type from the hardware. On a machine without GPUs a
multi-process launch becomes DistributedType.MULTI_CPU and the FSDP plugin built from the config is silently
dropped, so training runs as plain DDP. PyTorch's FSDP2 itself works on CPU with gloo; only accelerate's choice
is in the way. This module flips that one choice, and nothing else:

- active only when the launch asked for FSDP (ACCELERATE_USE_FSDP=true) and no CUDA device exists;
- never touches a GPU run (the function returns before patching);
- announces itself with one log line;
- verify_fsdp_applied() raises if an accelerate upgrade makes the patch ineffective, and
  tests/test_train_fsdp.py asserts the parameters really are DTensors sharded over the ranks.
"""

import contextlib
import logging
import os
import socket
import time

import accelerate
import torch
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from fcsft.errors import UserError

TESTED_ACCELERATE = "1.15.0"
logger = logging.getLogger(__name__)


def wants_fsdp_on_cpu():
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available()


def check_gpu_launch():
    """One line, before anything else, when a GPU accelerate config (mixed precision bf16/fp16) is launched on a
    machine without a CUDA device: otherwise every rank prints TRL's bf16 message and torchrun its own report.
    Only local rank 0 says it; the other ranks exit quietly."""
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if precision in ("no", "") or torch.cuda.is_available():
        return
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:
        time.sleep(5)  # torchrun stops every rank when one exits: let local rank 0 say why first
        raise SystemExit(1)
    config = "accelerate_configs/cpu_fsdp_full.yaml" if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
        else "no accelerate config (plain python train_sft.py ...)"
    raise UserError(f"the accelerate config asks for mixed_precision {precision} on GPUs, but no CUDA GPU was found on "
                    f"this machine: on CPU use {config}")


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
            f"the CPU patch in fcsft/distributed.py no longer works with this version (tested with {TESTED_ACCELERATE})."
        )


@contextlib.contextmanager
def full_state_dict(trainer):
    """Under FSDP, make trainer.save_model gather a FULL state dict (a collective: every rank must enter), then put
    back the sharded type the trainer's resumable checkpoints use. The configs are reset too: accelerate only fills
    them when they are None, and FSDP1 refuses a FULL type with a sharded config."""
    if not trainer.is_fsdp_enabled:
        yield
        return
    plugin = trainer.accelerator.state.fsdp_plugin
    saved = (plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config)
    plugin.state_dict_config = plugin.optim_state_dict_config = None
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        yield
    finally:
        plugin.state_dict_type, plugin.state_dict_config, plugin.optim_state_dict_config = saved


def fail_on_all_ranks(accelerator, message, error=UserError):
    """Rank 0 decided (talked to the hub, checked a file); every rank learns the outcome so all stop together instead
    of waiting in a collective for a rank that has gone."""
    from accelerate.utils import broadcast_object_list

    message = broadcast_object_list([message])[0] if accelerator.num_processes > 1 else message
    if message:
        raise error(message) if accelerator.is_main_process else SystemExit(1)  # say it once


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
