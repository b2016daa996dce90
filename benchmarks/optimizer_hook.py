"""What RoRA's optimizer step pre-hook costs an optimizer that holds no RoRA adapter.

The hook (``rora_fast.penalty``) is global: once installed it runs at every torch
optimizer's ``step()``. It is installed when the first RoRA layer registers, not when
rora_fast is imported. This measures ``AdamW.step()`` on a small plain model (no RoRA)
in three states, each hook state interleaved step by step with no hook (adjacent steps
see the same machine speed), ``--steps`` pairs each:

* ``no_hook``: the hook not installed (rora_fast imported, no RoRA layer built; here
  the benchmark removes the hook between steps to pair the states);
* ``hook_no_layers``: the hook installed, every RoRA layer gone;
* ``hook_48_layers``: the hook installed, 48 RoRA layers alive in another model.

Reported: median step time per state, and the median of the paired ratios to
``no_hook`` with a 95 % bootstrap interval. Run: ``python -m benchmarks.optimizer_hook``.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch
from torch import nn


def _hook_installed() -> bool:
    from rora_fast import penalty
    return penalty._HOOK is not None


def _median_ci(r, n_boot=2000, seed=0):
    t = torch.tensor(r, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(r), (n_boot, len(r)), generator=g)
    meds = t[idx].median(dim=1).values.sort().values
    return float(t.median()), [float(meds[int(0.025 * n_boot)]), float(meds[int(0.975 * n_boot)])]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default=None, help="write the result JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import rora_fast

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-3)
    for p in plain.parameters():
        p.grad = torch.randn_like(p)

    def step_time():
        t0 = time.perf_counter()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(50):
        step_time()
    assert not _hook_installed(), "a RoRA layer was built before the measurement"
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from rora_fast import penalty

    def set_hook(on: bool):
        # (benchmark only: the library installs the hook once and never removes it)
        if on and penalty._HOOK is None:
            penalty._HOOK = register_optimizer_step_pre_hook(penalty._step_pre_hook)
        elif not on and penalty._HOOK is not None:
            penalty._HOOK.remove()
            penalty._HOOK = None

    times = {"no_hook": [], "hook_no_layers": [], "hook_48_layers": []}
    ratios = {"hook_no_layers": [], "hook_48_layers": []}
    layers = [rora_fast.RoraLinear(16, 16, r=2, ortho_rank=2, svd_cache=None)
              for _ in range(48)]
    for state in ("hook_48_layers", "hook_no_layers"):
        if state == "hook_no_layers":
            del layers
            gc.collect()
        for i in range(args.steps):
            order = (False, True) if i % 2 == 0 else (True, False)
            got = {}
            for on in order:
                set_hook(on)
                got[on] = step_time()
            times["no_hook"].append(got[False])
            times[state].append(got[True])
            ratios[state].append(got[True] / got[False])
    set_hook(False)
    med = {k: float(torch.tensor(v).median()) for k, v in times.items()}
    out = {"steps": args.steps, "median_step_s": med,
           "paired_ratio_to_no_hook": {k: dict(zip(("median", "ci95"), _median_ci(v)))
                                       for k, v in ratios.items()},
           "torch": torch.__version__}
    print(json.dumps(out, indent=1))
    if args.out:
        from rora_fast.atomic import write_json
        write_json(args.out, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
