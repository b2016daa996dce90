"""Preflight of benchmarks/gpu/run.sh: one line about the device, exit 3 without CUDA.

Never prints a traceback: run.sh relies on a clear one-line message when it is run
on a machine without a GPU.
"""

import sys


def main() -> int:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is reported the same way
        print(f"run.sh: cannot import torch ({type(exc).__name__}: {exc}); nothing to check")
        return 3
    try:
        available = torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        print(f"run.sh: CUDA query failed ({type(exc).__name__}: {exc}); nothing to check")
        return 3
    if not available:
        print("run.sh: no CUDA device found (torch.cuda.is_available() is False); this check "
              "needs an NVIDIA GPU (use `run.sh --cpu-smoke` to exercise the script on a CPU)")
        return 3
    try:
        import triton
        tv = triton.__version__
    except Exception as exc:  # noqa: BLE001
        print(f"run.sh: CUDA is available but triton cannot be imported ({exc}); the fused "
              "kernels need triton")
        return 3
    name = torch.cuda.get_device_name(0)
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    free, total = torch.cuda.mem_get_info(0)
    print(f"run.sh: device {name} (sm {cap}, {total / 2**30:.0f} GiB, {free / 2**30:.0f} free), "
          f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, "
          f"python {sys.version.split()[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
