"""Backdoor evaluation harness: attacks, poisoning, defences, metrics, spectra, runner.

Definitions are stated in each module docstring; the command line is ``rora-fast --help``.
"""
from .attacks import ATTACKS, Attack, TriggerError, get_attack, insert_trigger, max_trigger_position
from .metrics import asr_floor, attack_success_rate, backdoor_metrics, clean_accuracy
from .poisoning import CorruptCacheError, PoisonConfig, PoisoningFailed, poison_model
from .defences import DefenceConfig, parse_method
from .runner import RunSpec, run_defence, run_spectra, write_summary

__all__ = ["ATTACKS", "Attack", "TriggerError", "get_attack", "insert_trigger",
           "max_trigger_position", "asr_floor", "attack_success_rate", "backdoor_metrics",
           "clean_accuracy", "CorruptCacheError", "PoisonConfig", "PoisoningFailed",
           "poison_model", "DefenceConfig", "parse_method", "RunSpec", "run_defence",
           "run_spectra", "write_summary"]
