"""Presets (data sizes and schedules) and the paper's reference numbers.

``small`` (the CLI's default, the demo's): the small-scale reproduction on CPU, 2,000 rows x
12 epochs in length-grouped batches; a method with rescaling rescales adaptively (the
strongest of 0.5 / 0.75 / 1 x the paper's scale whose clean dev accuracy after the repair
stays within 2 points of the un-rescaled model's), then the clean-dev head-bias repair
(``repair=True``). Issue 29: of every configuration measured over 5 seeds on SST-2 and CR,
each against LoRA trained on the same schedule, rows and seeds, this one has the best worst
margin over the three targets (+0.20 points: all three met on both cells; the paper's rule +
repair at 12 epochs, random batches: -0.64; see docs/results.md,
benchmarks/results/eval/default-choice.md). The epochs are 12.0, as the measured runs
recorded them (``--epochs 12``), so that their configuration is this one.
``demo``: ``small`` with 1,500 defence rows (the earlier demo).
``full``: the paper's sizes (A.1): poisoning 4,000 proxy rows with 1,500 poisoned, lr 2e-5,
3 epochs; defence on the full training split, 20 epochs, batch 32 — for a GPU; the paper's
method as published (no repair: not measured at that scale).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from rora_fast.adaptive import DEFAULT_FACTORS

__all__ = ["Preset", "PRESETS", "DEFENCE_DEFAULTS", "PAPER_FIG5_GRID", "PAPER_TABLE2_BERT",
           "PAPER_TABLE5", "paper_row", "nondefault_hparams", "method_label"]


@dataclass(frozen=True)
class Preset:
    name: str
    # attacker
    poison_n_train: Optional[int]
    poison_fraction: float
    poison_max_length: int
    poison_trigger_max_words: Optional[int]
    poison_lr: float
    poison_epochs: float
    # defender
    n_train: Optional[int]
    n_dev: Optional[int]
    n_test: Optional[int]
    max_length: int
    epochs: float
    evals_per_epoch: int = 1
    target_modules: Optional[str] = None
    # what a method with rescaling (rora, ...) does after training, unless the run says:
    # "paper" (σ_max(W_pre)/σ_max(BA)) or "adaptive" (rora_fast.adaptive_rescale_ on the
    # clean dev rows), and whether the head bias is then re-fitted on them (repair.py)
    rescale: str = "paper"
    repair: bool = False
    # the "paper" rescale's multiple of σ_max(W_pre)/σ_max(BA) (1: the paper's rule)
    rescale_factor: float = 1.0
    # the "adaptive" rescale: dev accuracy points a rung may cost, and the ladder's factors
    # (weakest first); judged after the repair when the repair follows
    rescale_tolerance: float = 1.0
    rescale_factors: Tuple[float, ...] = DEFAULT_FACTORS  # rora_fast.adaptive's
    # the defender's training batches: random (False) or length-grouped (True,
    # rora_fast.loop's group_by_length), unless the run says
    group_by_length: bool = False
    # forwards per training batch (rora_fast.loop's micro_batches: the same batch and loss,
    # rows of similar length per forward), unless the run says
    micro_batches: int = 1


PRESETS: Dict[str, Preset] = {
    # demo: 2,000 IMDB rows for the attacker (750 poisoned; same poisoned model as "small"),
    # 1,500 SST-2 rows x 12 epochs for the defender (564 steps), full SST-2 test set; adapters
    # on all linear layers (see the evaluation notes: with query/value only the effect does
    # not show at this scale).
    "demo": Preset("demo", 2000, 0.375, 64, 40, 5e-5, 3, 1500, 872, None, 64, 12.0,
                   target_modules="all-linear", rescale="adaptive", repair=True,
                   group_by_length=True, rescale_tolerance=2.0,
                   rescale_factors=(0.5, 0.75, 1.0)),
    "small": Preset("small", 2000, 0.375, 64, 40, 5e-5, 3, 2000, 872, None, 64, 12.0,
                    target_modules="all-linear", rescale="adaptive", repair=True,
                    group_by_length=True, rescale_tolerance=2.0,
                    rescale_factors=(0.5, 0.75, 1.0)),
    "full": Preset("full", 4000, 0.375, 128, None, 2e-5, 3, None, None, None, 128, 20,
                   target_modules=None),
}

#: the defender's hyperparameters (paper, section 5 and A.1): adapter rank and alpha, RoRA's
#: weight-dropout rate p, penalty weight λ and rank k, the number of top blocks rescaled;
#: lr None = 2e-3 for adapters, 2e-5 for FFT. ``RunSpec`` takes its defaults from here.
DEFENCE_DEFAULTS = {"r": 8, "alpha": 16, "weight_dropout": 0.1, "ortho_lambda": 10.0,
                    "ortho_rank": 32, "rescale_layers": 3, "lr": None}

#: the grids of the paper's Figure 5 (SST-2, BadNet) and its A.1 grid search
PAPER_FIG5_GRID = {"ortho_lambda": (1.0, 5.0, 10.0, 15.0, 20.0),
                   "weight_dropout": (0.05, 0.1, 0.15, 0.2, 0.3)}

#: short names of those hyperparameters, for labels
HPARAM_SYMBOL = {"weight_dropout": "p", "ortho_lambda": "λ", "ortho_rank": "k",
                 "rescale_layers": "top", "r": "r", "alpha": "alpha", "lr": "lr"}


def nondefault_hparams(spec: Dict) -> Dict:
    """The defence hyperparameters of a run spec (a dict) that differ from
    ``DEFENCE_DEFAULTS``: empty for a run at the defaults."""
    return {k: spec[k] for k, v in DEFENCE_DEFAULTS.items() if k in spec and spec[k] != v}


def method_label(spec: Dict) -> str:
    """The method name, plus its non-default hyperparameters: ``rora (p=0.05)``."""
    extra = nondefault_hparams(spec)
    name = spec["method"] + (" + repair" if spec.get("repair") else "")
    if not extra:
        return name
    return name + " (" + ", ".join(f"{HPARAM_SYMBOL[k]}={v:g}"
                                             for k, v in extra.items()) + ")"


#: Table 2 of the paper, BERT rows: (attack, task) -> method -> (CA, ASR, Δ)
PAPER_TABLE2_BERT = {
    ("badnet", "sst2_sentence"): {"fft": (93.06, 77.63, 15.43), "lora": (92.00, 99.70, -7.70),
                                  "pissa": (91.54, 42.57, 48.97), "dora": (91.16, 56.11, 35.05),
                                  "olora": (91.93, 35.09, 56.84), "rora": (92.46, 7.48, 84.98)},
    ("badnet", "cr"): {"fft": (90.53, 43.17, 47.36), "lora": (89.50, 92.58, -3.08),
                       "pissa": (89.42, 83.16, 6.26), "dora": (86.97, 98.75, -11.78),
                       "olora": (88.90, 88.15, 0.75), "rora": (88.65, 2.70, 85.95)},
    ("badnet", "cola"): {"fft": (83.25, 99.62, -16.37), "lora": (79.92, 100.0, -20.08),
                         "pissa": (82.84, 58.11, 24.73), "dora": (82.17, 63.80, 18.37),
                         "olora": (82.36, 57.14, 25.22), "rora": (83.32, 4.85, 78.47)},
    ("insent", "sst2_sentence"): {"fft": (92.46, 68.24, 24.22), "lora": (92.49, 100.0, -7.51),
                                  "pissa": (92.09, 99.89, -7.80), "dora": (91.10, 100.0, -8.90),
                                  "olora": (91.82, 100.0, -8.18), "rora": (91.65, 10.45, 81.20)},
    ("insent", "cr"): {"fft": (91.35, 27.72, 63.63), "lora": (88.94, 84.20, 4.74),
                       "pissa": (88.13, 98.13, -10.00), "dora": (87.48, 98.96, -11.48),
                       "olora": (89.03, 97.30, -8.27), "rora": (89.29, 1.46, 87.83)},
    ("insent", "cola"): {"fft": (83.76, 100.0, -16.24), "lora": (80.66, 100.0, -19.34),
                         "pissa": (81.88, 97.23, -15.35), "dora": (81.89, 98.89, -17.00),
                         "olora": (82.36, 99.58, -17.22), "rora": (81.88, 60.06, 21.82)},
}

#: Table 5 (ablation, SST-2, RoBERTa BadNet) as printed: rows (CI, Tr, Pt) -> (CA, ASR, Δ)
PAPER_TABLE5 = {"roberta-badnet": [("CI", 95.71, 99.74, -4.03), ("CI+Tr", 96.16, 10.34, 85.82),
                                   ("CI+Tr+Pt", 95.33, 13.42, 81.91)]}


def paper_row(attack: str, task: str, method: str):
    """Paper (BERT-large) numbers for a method, or None.  RoRA variants map to 'rora'."""
    table = PAPER_TABLE2_BERT.get((attack, task))
    if not table:
        return None
    key = method.lower()
    if key in ("rora", "rora:ci+tr+pt"):
        key = "rora"
    return table.get(key)
