"""Saving, loading and exporting adapters: atomic folders, per-tensor checksums (the
file-level machinery is :mod:`rora_fast.atomic`).

**Atomic.** :func:`save_rora` and :func:`export_peft_adapter` write the whole folder
into a temporary sibling (``.<name>.rora-tmp-<pid>-<rand>``, same parent directory),
fsync every file and the folder, then swap it in by rename: an existing target is
renamed to ``.<name>.rora-old-<pid>-<rand>``, the new folder to the target (the commit
point), and the old one is removed. A process killed at any instant leaves either the
previous folder or the new one complete under the target name -- or, killed between
the two renames, no target and the complete previous folder under its backup name,
which the next save or load of that target renames back (:func:`recover`). Temporaries
of dead processes are removed by the next save or load of the same target; a save that
fails with an exception removes its own. A target folder holding files the save would
not write is refused (the swap would drop them). Saves hold an exclusive ``flock`` on
the parent folder, loads a shared one: concurrent writers and readers are serialised.

**Verified.** Format 2 (this version) stores in the safetensors header, besides the
tensors: a per-tensor XXH3-64 checksum (over dtype, shape and bytes), a random
``save_id`` also written into ``rora_config.json``, and the checksum of the JSON file's
bytes. :func:`load_rora` checks all three before touching the model: a flipped byte in
a tensor is an error naming the file and the tensor; a config from another save (a
mixed folder) or an edited JSON is an error too. Format-1 folders (no checksums) still
load, with a warning. The PEFT export keeps PEFT's file names and format; its
checksums go into the safetensors metadata (``rora_fast_checksums``), which PEFT
ignores, and :func:`verify_adapter` checks them.
"""

from __future__ import annotations

import json
import re
import secrets
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Callable, Dict, Tuple, Union

import torch
from torch import nn

from . import validation as V
from .atomic import (AdapterIntegrityError, _bytes_checksum, _prepare_read,  # noqa: F401
                     _read_locked, _read_safetensors, _verify_checksums, atomic_write_dir,
                     recover, tensor_checksum)
from .config import RoraConfig
from .layer import RoraLinear
from .bases import check_saved_quantization, quant_descriptor
from .targets import target_dims
from .model import (HEAD_NAMES, layer_attrs, resolve_modules_to_save, all_or_nothing,
                    apply_rora, plan_rora, rora_layers)

__all__ = ["save_rora", "load_rora", "export_peft_adapter", "verify_adapter",
           "tensor_checksum", "recover", "AdapterIntegrityError", "FORMAT_VERSION",
           "CONFIG_NAME", "WEIGHTS_NAME"]

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "rora_config.json"
WEIGHTS_NAME = "rora_adapter.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# ---------------------------------------------------------------------- save
def _extra_trainable(model: nn.Module) -> Dict[str, torch.Tensor]:
    rl = {n for n, _ in rora_layers(model)}
    out = {}
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if owner in rl:
            continue
        if p.requires_grad:
            out[name] = p
    return out


def _layer_tensors(layer: RoraLinear) -> Dict[str, torch.Tensor]:
    return {"lora_A": layer.lora_A, "lora_B": layer.lora_B,
            **layer.variant.saved_tensors(layer)}


def save_rora(model: nn.Module, path: Union[str, Path]) -> Path:
    """Save the adapters (and the trainable head) to the folder ``path`` as safetensors
    + JSON, atomically and with per-tensor checksums (see the module docstring): at any
    instant ``path`` holds the previous save or this one, complete."""
    from safetensors.torch import save_file

    config = getattr(model, "rora_config", None)
    layers = dict(rora_layers(model))
    if config is None or not layers:
        raise ValueError("the model has no RoRA layers (call apply_rora first)")
    tensors = {}
    meta = {}
    for name, layer in layers.items():
        for k, v in _layer_tensors(layer).items():
            tensors[f"rora.{name}.{k}"] = v.detach().contiguous().cpu()
        meta[name] = {"in_features": layer.in_features, "out_features": layer.out_features,
                      "scaling": layer.scaling, "sigma_pre": layer.sigma_pre,
                      "rescaled": layer.rescaled}
        if quant_descriptor(layer) is not None:  # bitsandbytes base: checked on load
            meta[name]["quantization"] = quant_descriptor(layer)
        meta[name].update(layer.variant.saved_meta(layer))  # PiSSA/OLoRA: init_scaling
    for name, p in _extra_trainable(model).items():
        tensors[f"extra.{name}"] = p.detach().contiguous().cpu()
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:  # a diverged run must not replace a good save
        raise ValueError(f"not saved: {len(bad)} tensor(s) hold NaN or inf ({', '.join(bad[:5])}"
                         f"{', ...' if len(bad) > 5 else ''}); {path} was left as it was")
    save_id = secrets.token_hex(16)
    doc = {"format_version": FORMAT_VERSION, "save_id": save_id, "config": config.to_dict(),
           "layers": meta}
    doc_bytes = json.dumps(doc, indent=2).encode()
    st_meta = {"format": "rora-fast", "version": str(FORMAT_VERSION), "save_id": save_id,
               "config_checksum": _bytes_checksum(doc_bytes),
               "checksums": json.dumps({k: tensor_checksum(v) for k, v in tensors.items()},
                                       sort_keys=True)}

    def write(d: Path) -> None:
        save_file(tensors, str(d / WEIGHTS_NAME), metadata=st_meta)
        (d / CONFIG_NAME).write_bytes(doc_bytes)

    return atomic_write_dir(path, write)


# ---------------------------------------------------------------------- load
def _read_rora(path: Path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Read and verify a ``save_rora`` folder; nothing of the model is touched."""
    cfg_file, w_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.exists() or not w_file.exists():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME} and {WEIGHTS_NAME}")
    doc_bytes = cfg_file.read_bytes()
    try:
        doc = json.loads(doc_bytes)
    except ValueError as e:
        raise AdapterIntegrityError(f"{cfg_file}: not valid JSON ({e})") from e
    if not isinstance(doc, dict):
        raise AdapterIntegrityError(f"{cfg_file}: expected a JSON object")
    version = doc.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(f"unsupported rora-fast format version {version!r} in {cfg_file} "
                         f"(this version reads {READABLE_VERSIONS})")
    tensors, st_meta = _read_safetensors(w_file)
    if version >= 2:
        if st_meta.get("format") != "rora-fast" or "checksums" not in st_meta:
            raise AdapterIntegrityError(f"{w_file}: no rora-fast checksums in the header "
                                        "(not written by save_rora, or rewritten)")
        if st_meta.get("save_id") != doc.get("save_id"):
            raise AdapterIntegrityError(
                f"{path}: {CONFIG_NAME} and {WEIGHTS_NAME} come from different saves "
                f"(save ids {doc.get('save_id')!r} and {st_meta.get('save_id')!r})")
        if st_meta.get("config_checksum") != _bytes_checksum(doc_bytes):
            raise AdapterIntegrityError(f"{cfg_file}: does not match the checksum recorded in "
                                        f"{WEIGHTS_NAME} (the file was edited or corrupted)")
        try:
            sums = json.loads(st_meta["checksums"])
        except ValueError as e:
            raise AdapterIntegrityError(f"{w_file}: unreadable checksum table ({e})") from e
        _verify_checksums(tensors, sums, w_file)
    else:
        warnings.warn(f"{path} was written by an older rora-fast (format 1, no checksums): "
                      "its tensors cannot be verified; save it again to add them",
                      stacklevel=3)
    if not isinstance(doc.get("config"), dict) or not isinstance(doc.get("layers"), dict):
        raise AdapterIntegrityError(f"{cfg_file}: missing 'config' or 'layers'")
    for name, m in doc["layers"].items():
        try:
            V.check_int(f"{name}: in_features", m["in_features"], lo=1)
            V.check_int(f"{name}: out_features", m["out_features"], lo=1)
            V.check_number(f"{name}: scaling", m["scaling"], lo=0, lo_open=True)
            if "init_scaling" in m:
                V.check_number(f"{name}: init_scaling", m["init_scaling"])
            if not isinstance(m["rescaled"], bool):
                raise TypeError(f"{name}: rescaled must be a bool")
        except (KeyError, TypeError, ValueError) as e:
            raise AdapterIntegrityError(f"{cfg_file}: bad entry for layer {name}: {e}") from e
    return doc, tensors


def _check_into(layers: Dict[str, Tuple[int, int]], meta: dict,
                tensors: Dict[str, torch.Tensor], w_name: str,
                layer_shapes: Callable[[str], Dict[str, Tuple[int, ...]]]) -> None:
    """Layer names, feature sizes and every tensor's shape of the file against the model
    (``layers``: name -> (in, out); ``layer_shapes(name)``: tensor -> shape)."""
    if set(meta) != set(layers):
        missing = sorted(set(meta) - set(layers))
        extra = sorted(set(layers) - set(meta))
        raise ValueError(f"RoRA layers differ: in file but not in model {missing}; in model "
                         f"but not in file {extra}")
    for name, (fin, fout) in layers.items():
        m = meta[name]
        if (m["in_features"], m["out_features"]) != (fin, fout):
            raise ValueError(f"{name}: file has shape ({m['out_features']}, "
                             f"{m['in_features']}), model has ({fout}, {fin})")
        for k, shape in layer_shapes(name).items():
            key = f"rora.{name}.{k}"
            if key not in tensors:
                raise ValueError(f"{name}: tensor {k} missing from {w_name}")
            if tuple(tensors[key].shape) != tuple(shape):
                raise ValueError(f"{name}.{k}: file has shape {tuple(tensors[key].shape)}, "
                                 f"model has {tuple(shape)}")


def load_rora(model: nn.Module, path: Union[str, Path]) -> nn.Module:
    """Load adapters saved by :func:`save_rora` into ``model``.

    ``model`` is either the same architecture without RoRA (RoRA is applied with the
    saved config first) or a model already wrapped with an equal config. The files are
    verified (checksums, one save) and layer names, shapes and config are checked
    against the model before it is changed; a mismatch raises naming it and leaves the
    model as it was. If the copy still fails midway, the model is restored exactly.
    """
    path = _prepare_read(Path(path))
    doc, tensors = _read_locked(path, _read_rora)
    w_name = WEIGHTS_NAME
    try:
        saved_cfg = RoraConfig.from_dict(doc["config"])
    except (TypeError, ValueError) as e:
        raise AdapterIntegrityError(f"{path / CONFIG_NAME}: bad config ({e})") from e
    meta = doc["layers"]
    have = getattr(model, "rora_config", None)
    if have is None:
        chosen, _ = plan_rora(model, saved_cfg)  # checks targets, ranks, weights

        def shapes(name):
            lin = model.get_submodule(name)
            (fin, fout), r = target_dims(lin), saved_cfg.r
            return {"lora_A": (r, fin), "lora_B": (fout, r),
                    **saved_cfg.variant.saved_shapes(r, fin, fout)}

        _check_into({n: target_dims(model.get_submodule(n)) for n in chosen},
                    meta, tensors, w_name, shapes)
        check_saved_quantization(model, chosen, meta)
    else:
        for f in fields(RoraConfig):
            a, b = getattr(have, f.name), getattr(saved_cfg, f.name)
            if f.name in ("penalty_mode", "svd_method"):
                continue
            if a != b:
                raise ValueError(f"config mismatch in {f.name}: model has {a!r}, file has {b!r}")
        layers = dict(rora_layers(model))
        _check_into({n: (lay.in_features, lay.out_features) for n, lay in layers.items()},
                    meta, tensors, w_name,
                    lambda n: {k: tuple(t.shape)
                               for k, t in _layer_tensors(layers[n]).items()})
        check_saved_quantization(model, layers, meta)
    existing = dict(rora_layers(model))
    written = [t for lay in existing.values() for t in _layer_tensors(lay).values()]
    written += [lay.weight for lay in existing.values() if lay.variant.rewrites_base]
    if have is None and saved_cfg.variant.rewrites_base:
        # apply_rora below rewrites these base weights in place (PiSSA/OLoRA residual)
        written += [getattr(model.get_submodule(n), "weight", None) for n in chosen]
    params = dict(model.named_parameters())  # names of non-RoRA modules survive wrapping
    written += [params[k[len("extra."):]] for k in tensors
                if k.startswith("extra.") and k[len("extra."):] in params]
    attrs = [a for lay in existing.values() for a in layer_attrs(lay)]
    with all_or_nothing(model, written, attrs + [(model, "rora_config")]):
        if have is None:
            apply_rora(model, saved_cfg)
        layers = dict(rora_layers(model))
        extra = _extra_trainable(model)
        for key, src in tensors.items():  # check the extras before copying anything
            if key.startswith("extra."):
                name = key[len("extra."):]
                if name not in extra:
                    raise ValueError(f"{name}: saved trainable parameter not found in the "
                                     "model")
                if tuple(src.shape) != tuple(extra[name].shape):
                    raise ValueError(f"{name}: file has shape {tuple(src.shape)}, model has "
                                     f"{tuple(extra[name].shape)}")
            elif not key.startswith("rora."):
                raise ValueError(f"{path / w_name}: unexpected tensor {key!r}")
        with torch.no_grad():
            for name, layer in layers.items():
                m = meta[name]
                for k, dst in _layer_tensors(layer).items():
                    dst.copy_(tensors[f"rora.{name}.{k}"])
                layer.scaling = float(m["scaling"])
                layer.rescaled = bool(m["rescaled"])
                layer.variant.load_meta_(layer, m)  # PiSSA/OLoRA: the saved base
            for key, src in tensors.items():
                if key.startswith("extra."):
                    extra[key[len("extra."):]].copy_(src)
    return model


# ---------------------------------------------------------------------- PEFT export
def export_peft_adapter(model: nn.Module, directory: Union[str, Path]) -> Path:
    """Write a vanilla PEFT LoRA adapter equivalent to the model's RoRA adapters (eval).

    Each layer's current ``scaling`` (rescaled or not) is folded into ``lora_B`` so
    that PEFT's ``lora_alpha / r`` reproduces it. PiSSA/OLoRA layers, whose base weight
    is the residual, export the rank-2r update ``s·BA − s0·B0A0`` relative to the
    original weight (as PEFT's own PiSSA conversion does). Load it with unmodified
    ``peft.PeftModel.from_pretrained(base_model, directory)``. The folder (PEFT's
    ``adapter_config.json`` + ``adapter_model.safetensors``) is written atomically,
    with per-tensor checksums in the safetensors metadata (:func:`verify_adapter`).
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = getattr(model, "rora_config", None)
    layers = dict(rora_layers(model))
    if config is None or not layers:
        raise ValueError("the model has no RoRA layers (call apply_rora first)")
    variant = config.variant
    variant.check_export()
    r_out = variant.export_rank(config.r)
    alpha_out = float(r_out)  # PEFT scaling 1; the real scale is folded into lora_B
    tensors = {}
    for name, layer in layers.items():
        for k, t in layer.variant.export_tensors(layer).items():
            tensors[f"base_model.model.{name}.{k}"] = t
    save = resolve_modules_to_save(model, config)
    for name, p in _extra_trainable(model).items():
        tensors[f"base_model.model.{name}"] = p.detach().float().contiguous()
    tensors = {k: v.cpu() for k, v in tensors.items()}
    target = "^(" + "|".join(re.escape(n) for n in sorted(layers)) + ")$"
    task_type = None
    if save and any(s in HEAD_NAMES for s in save):
        task_type = "SEQ_CLS"
    lcfg = LoraConfig(r=r_out, lora_alpha=alpha_out, target_modules=target,
                      modules_to_save=save or None, use_dora=variant.dora,
                      lora_dropout=config.lora_dropout, task_type=task_type,
                      base_model_name_or_path=getattr(getattr(model, "config", None),
                                                      "_name_or_path", None))
    st_meta = {"format": "pt",
               "rora_fast_checksums": json.dumps({k: tensor_checksum(v)
                                                  for k, v in tensors.items()},
                                                 sort_keys=True)}

    def write(d: Path) -> None:
        lcfg.save_pretrained(str(d))
        save_file(tensors, str(d / PEFT_WEIGHTS_NAME), metadata=st_meta)

    return atomic_write_dir(directory, write)


# ---------------------------------------------------------------------- verify
def verify_adapter(path: Union[str, Path]) -> Dict[str, int]:
    """Check a folder written by :func:`save_rora` or :func:`export_peft_adapter`
    without loading it into a model: every tensor against its checksum (and, for a
    ``save_rora`` folder, the config against the same save). Returns ``{"tensors": n}``;
    raises :class:`AdapterIntegrityError` naming the file and tensor otherwise."""
    path = _prepare_read(Path(path))
    return _read_locked(path, _verify_locked)


def _verify_locked(path: Path) -> Dict[str, int]:
    if (path / CONFIG_NAME).exists() or (path / WEIGHTS_NAME).exists():
        _, tensors = _read_rora(path)
        return {"tensors": len(tensors)}
    w_file = path / PEFT_WEIGHTS_NAME
    if not w_file.exists() or not (path / PEFT_CONFIG_NAME).exists():
        raise FileNotFoundError(f"{path} holds neither a save_rora adapter nor a PEFT "
                                "adapter")
    tensors, st_meta = _read_safetensors(w_file)
    if "rora_fast_checksums" not in st_meta:
        raise AdapterIntegrityError(f"{w_file}: no rora-fast checksums (not written by "
                                    "export_peft_adapter)")
    _verify_checksums(tensors, json.loads(st_meta["rora_fast_checksums"]), w_file)
    try:
        json.loads((path / PEFT_CONFIG_NAME).read_text())
    except ValueError as e:
        raise AdapterIntegrityError(f"{path / PEFT_CONFIG_NAME}: not valid JSON ({e})") from e
    return {"tensors": len(tensors)}
