"""The C fast path of the weight mask (rora_fast/csrc/philox_mask.c) is bit-identical to
the torch definition in rora_fast/reference.py."""
import pytest
import torch

from rora_fast import reference as ref

pytestmark = pytest.mark.skipif(not ref.native_mask_available(),
                                reason="C mask extension not built (no compiler at install)")

SHAPES = [(1, 1), (7, 1), (37, 33), (19, 8), (64, 129), (300, 17), (1536, 384)]


@pytest.fixture(params=["simd", "scalar"])
def philox_path(request):
    """Each Philox path of the C module in turn: the AVX2 one (where the CPU has it; the
    scalar one otherwise) and the portable scalar one."""
    native = ref._native
    before = native.simd()
    try:
        yield native.set_simd(request.param == "simd")
    finally:
        native.set_simd(before == "avx2")


@pytest.mark.parametrize("shape", SHAPES + [(3, 129), (2, 1000)])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1234, 2**40 + 77, 2**63 - 1])
def test_native_mask_equals_torch_definition(shape, p, seed, philox_path):
    a = ref.weight_keep_mask(seed, *shape, p, impl="torch")
    b = ref.weight_keep_mask(seed, *shape, p, impl="native")
    assert b.dtype == torch.bool and b.shape == shape
    assert torch.equal(a, b)


def test_native_simd_path_is_the_default_where_the_cpu_has_avx2():
    import platform

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo to read the CPU's features from")
    has_avx2 = platform.machine() in ("x86_64", "AMD64") and " avx2" in flags
    assert ref._native.simd() == ("avx2" if has_avx2 else "scalar")


@pytest.mark.parametrize("threads", [1, 2])
def test_native_mask_independent_of_thread_count(threads):
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        m = ref.weight_keep_mask(99, 513, 77, 0.1, impl="native")
    finally:
        torch.set_num_threads(old)
    assert torch.equal(m, ref.weight_keep_mask(99, 513, 77, 0.1, impl="torch"))


@pytest.mark.parametrize("shape", [(37, 33), (1536, 384), (5, 1)])
def test_native_masked_weight_equals_torch_expression(shape, philox_path):
    torch.manual_seed(0)
    W = torch.randn(*shape)
    W[0, 0] = float("nan")
    got = ref.masked_weight(W, 4321, 0.1)
    keep = ref.weight_keep_mask(4321, *shape, 0.1, impl="torch")
    scale = 1.0 / (1.0 - ref.effective_drop_prob(0.1))
    want = torch.where(keep, W * scale, torch.zeros(()))
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(want))


def test_native_rejects_non_cpu_and_bad_impl():
    with pytest.raises(ValueError, match="impl"):
        ref.weight_keep_mask(0, 4, 4, 0.1, impl="fast")
    with pytest.raises(ValueError, match="CPU"):
        ref.weight_keep_mask(0, 4, 4, 0.1, device="meta", impl="native")
