"""Test set-up only (imported at start-up by processes whose PYTHONPATH starts here, see tests/_launch.py: FP16).

DeepSpeed refuses fp16 on a CPU without native fp16 arithmetic, which our CI CPUs lack. The fp16 tests still
want DeepSpeed's real fp16 ZeRO path (dynamic loss scaling, overflow skips, loss-scale resume) on torch's emulated
fp16 kernels, so their processes tell DeepSpeed's CPU accelerator that fp16 is supported. Production code has no
such switch: there, fp16 on such a CPU is a clear config error.
"""
import os

if os.environ.get("MASKDIT_TEST_CPU_FP16") == "1":
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    CPU_Accelerator.is_fp16_supported = lambda self: True
