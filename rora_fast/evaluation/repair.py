"""The clean-dev head-bias repair: rora_fast's own (:mod:`rora_fast.repair`), re-exported
for the harness (``defend --repair``, ``seeds --methods ...,rora+repair``)."""
from ..repair import *  # noqa: F401,F403
from ..repair import __all__, accuracy_bias_shift  # noqa: F401
