"""``RoraConfig``: RoRA's hyper-parameters for a whole model, checked when created
(the rules are in :mod:`rora_fast.validation`, shared with :class:`RoraLinear`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Union

from . import validation as V
from .variants import Variant, variant_for

__all__ = ["RoraConfig"]


#: the file format's migration of saved configs: adapters saved by versions whose default
#: ``penalty_mode`` was called ``"backward"`` (the same mechanism as ``"optimizer"``) load
#: as ``"optimizer"``. Saved files only: the constructors take the current names.
LEGACY_PENALTY_MODES = {"backward": "optimizer"}


@dataclass
class RoraConfig:
    """Hyper-parameters of RoRA for a whole model (paper defaults).

    ``target_modules``: ``None`` (PEFT's per-architecture default, e.g. ``query``/``value``
    for BERT and RoBERTa, ``q_proj``/``v_proj`` for LLaMA), a list of module-name
    suffixes, a regular expression (full match on the module name) or ``"all-linear"``.
    ``modules_to_save``: modules trained fully (``None``: the classification head,
    ``classifier`` or ``score``, if the model has one).

    Every value is checked here (see :mod:`rora_fast.validation`): ``r >= 1``,
    ``alpha`` finite ``> 0``, dropouts in ``[0, 1)``, ``ortho_rank >= 1``,
    ``ortho_lambda`` finite ``>= 0``, ``penalty_mode`` ``"optimizer"`` or ``"loss"``; the
    shape-dependent bounds
    (``r, ortho_rank <= min(in, out)``) are checked by :func:`rora_fast.apply_rora` for
    every target before the model is changed.
    """

    r: int = 8
    alpha: float = 16
    weight_dropout: float = 0.1
    lora_dropout: float = 0.0
    ortho_rank: int = 32
    ortho_lambda: float = 10.0
    target_modules: Optional[Union[str, List[str]]] = None
    modules_to_save: Optional[List[str]] = None
    rescale_layers: int = 3
    init: str = "default"
    use_dora: bool = False
    penalty_mode: str = "optimizer"
    svd_method: str = "auto"

    def __post_init__(self):
        self.penalty_mode = V.check_hparams(
            r=self.r, alpha=self.alpha, weight_dropout=self.weight_dropout,
            lora_dropout=self.lora_dropout, ortho_rank=self.ortho_rank,
            ortho_lambda=self.ortho_lambda, penalty_mode=self.penalty_mode, init=self.init,
            use_dora=self.use_dora, svd_method=self.svd_method)
        if isinstance(self.rescale_layers, bool) or not isinstance(self.rescale_layers, int) \
                or self.rescale_layers < 0:
            raise ValueError(f"rescale_layers must be an int >= 0, got {self.rescale_layers!r}")
        # plain Python values (numpy scalars would not serialise to the saved JSON)
        self.r, self.ortho_rank = int(self.r), int(self.ortho_rank)
        for name in ("alpha", "weight_dropout", "lora_dropout", "ortho_lambda"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)):
                setattr(self, name, float(v))
        if isinstance(self.target_modules, (tuple, set, frozenset)):
            self.target_modules = sorted(self.target_modules) if isinstance(
                self.target_modules, (set, frozenset)) else list(self.target_modules)
        if isinstance(self.modules_to_save, (tuple, set, frozenset)):
            self.modules_to_save = sorted(self.modules_to_save) if isinstance(
                self.modules_to_save, (set, frozenset)) else list(self.modules_to_save)
        t = self.target_modules
        if t is not None and not isinstance(t, str) and not (
                isinstance(t, list) and t and all(isinstance(x, str) and x for x in t)):
            raise TypeError(f"target_modules must be None, a string or a non-empty list of "
                            f"names, got {t!r}")
        m = self.modules_to_save
        if m is not None and not (isinstance(m, list) and all(isinstance(x, str) and x
                                                              for x in m)):
            raise TypeError(f"modules_to_save must be None or a list of names, got {m!r}")

    @property
    def variant(self) -> Variant:
        """The adapter's variant object (:func:`rora_fast.variants.variant_for`)."""
        return variant_for(self.init, self.use_dora)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RoraConfig":
        if not isinstance(d, dict):
            raise TypeError(f"a RoraConfig dict is expected, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RoraConfig fields {sorted(unknown)}")
        if d.get("penalty_mode") in LEGACY_PENALTY_MODES:  # a file an older version wrote
            d = {**d, "penalty_mode": LEGACY_PENALTY_MODES[d["penalty_mode"]]}
        return cls(**d)

    def layer_kwargs(self) -> dict:
        return dict(r=self.r, alpha=self.alpha, weight_dropout=self.weight_dropout,
                    lora_dropout=self.lora_dropout, ortho_rank=self.ortho_rank,
                    ortho_lambda=self.ortho_lambda, penalty_mode=self.penalty_mode,
                    init=self.init, use_dora=self.use_dora, svd_method=self.svd_method)
