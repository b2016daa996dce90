"""Atomic, verifiable adapters (issue 12, item 1): a save killed at any instant leaves the
previous adapter or the new one, complete, and no temporary behind once the target is
saved or loaded again; every tensor is checksummed and a corrupted, edited or mixed
folder is refused with an error naming the file (and the tensor)."""

import json
import os
import random
import signal
import time
import warnings

import pytest
import torch
from torch import nn

from rora_fast import (RoraConfig, apply_rora, export_peft_adapter, load_rora, rora_layers,
                       save_rora)
from rora_fast import atomic as A
from rora_fast import persistence as P
from rora_fast.persistence import AdapterIntegrityError, verify_adapter


class Net(nn.Module):
    def __init__(self, width=64, head=256):
        super().__init__()
        self.l0 = nn.Linear(width, width)
        self.l1 = nn.Linear(width, width)
        self.head = nn.Linear(width, head)

    def forward(self, x):
        return self.head(self.l1(self.l0(x)))


def make(seed, width=64, head=256):
    torch.manual_seed(0)
    net = Net(width, head)
    apply_rora(net, RoraConfig(r=4, ortho_rank=4, target_modules=["l0", "l1"],
                               modules_to_save=["head"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, lay in rora_layers(net):
            lay.lora_A.copy_(torch.randn(lay.lora_A.shape, generator=g))
            lay.lora_B.copy_(torch.randn(lay.lora_B.shape, generator=g))
        net.head.weight.copy_(torch.randn(net.head.weight.shape, generator=g))
    return net


def state(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fresh_loaded(path, width=64, head=256):
    torch.manual_seed(0)
    net = Net(width, head)
    load_rora(net, path)
    return state(net)


def leftovers(parent, keep):
    return sorted(e for e in os.listdir(parent) if e not in keep)


# ----------------------------------------------------------------------------- format
def test_files_and_checksums_recorded(tmp_path):
    net = make(1)
    save_rora(net, tmp_path / "ad")
    assert sorted(os.listdir(tmp_path)) == ["ad"]
    assert sorted(os.listdir(tmp_path / "ad")) == sorted([P.CONFIG_NAME, P.WEIGHTS_NAME])
    doc = json.loads((tmp_path / "ad" / P.CONFIG_NAME).read_text())
    assert doc["format_version"] == 2 and len(doc["save_id"]) == 32
    from safetensors import safe_open
    with safe_open(str(tmp_path / "ad" / P.WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
        sums = json.loads(meta["checksums"])
        assert set(sums) == set(f.keys()) and meta["save_id"] == doc["save_id"]
        for k in f.keys():
            assert sums[k] == P.tensor_checksum(f.get_tensor(k))
    assert verify_adapter(tmp_path / "ad") == {"tensors": len(sums)}


def test_checksum_depends_on_bytes_dtype_shape():
    t = torch.randn(4, 3)
    assert P.tensor_checksum(t) == P.tensor_checksum(t.clone())
    assert P.tensor_checksum(t) != P.tensor_checksum(t.reshape(3, 4))
    assert P.tensor_checksum(t) != P.tensor_checksum(t.double())
    u = t.clone()
    u[2, 1] = torch.nextafter(u[2, 1], torch.tensor(10.0))
    assert P.tensor_checksum(t) != P.tensor_checksum(u)
    assert P.tensor_checksum(torch.zeros(0, 3)) != P.tensor_checksum(torch.zeros(3, 0))
    assert P.tensor_checksum(torch.tensor(1.0, dtype=torch.bfloat16))


# ----------------------------------------------------------------------------- corruption
def _tensor_spans(file):
    raw = file.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    return raw, {k: (base + v["data_offsets"][0], base + v["data_offsets"][1])
                 for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("which", ["rora.l1.lora_B", "extra.head.weight"])
def test_flipped_byte_names_file_and_tensor(tmp_path, which):
    net = make(1)
    save_rora(net, tmp_path / "ad")
    f = tmp_path / "ad" / P.WEIGHTS_NAME
    raw, spans = _tensor_spans(f)
    lo, hi = spans[which]
    raw = bytearray(raw)
    raw[(lo + hi) // 2] ^= 0x7F  # the file still parses; one value is wrong
    f.write_bytes(bytes(raw))
    target = Net()
    before = state(target)
    with pytest.raises(AdapterIntegrityError,
                       match=rf"rora_adapter\.safetensors: tensor '{which}' does not match"):
        load_rora(target, tmp_path / "ad")
    assert same(state(target), before) and not list(rora_layers(target))
    with pytest.raises(AdapterIntegrityError, match=which):
        verify_adapter(tmp_path / "ad")


def test_truncated_garbage_edited_and_mixed_folders(tmp_path):
    a, b = make(1), make(2)
    save_rora(a, tmp_path / "a")
    save_rora(b, tmp_path / "b")
    # mixed folder: config of one save, tensors of the other
    (tmp_path / "a" / P.CONFIG_NAME).write_bytes((tmp_path / "b" / P.CONFIG_NAME).read_bytes())
    with pytest.raises(AdapterIntegrityError, match="different saves"):
        load_rora(Net(), tmp_path / "a")
    # an edited config (a scale changed by hand) is refused
    save_rora(a, tmp_path / "a")
    cfg = tmp_path / "a" / P.CONFIG_NAME
    doc = json.loads(cfg.read_text())
    doc["layers"]["l0"]["scaling"] = 3.0
    cfg.write_text(json.dumps(doc, indent=2))
    with pytest.raises(AdapterIntegrityError, match="rora_config.json: does not match"):
        load_rora(Net(), tmp_path / "a")
    # truncated weights and garbage JSON
    save_rora(a, tmp_path / "a")
    w = tmp_path / "a" / P.WEIGHTS_NAME
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdapterIntegrityError, match="not a readable safetensors"):
        load_rora(Net(), tmp_path / "a")
    save_rora(a, tmp_path / "a")
    cfg.write_text("{not json")
    with pytest.raises(AdapterIntegrityError, match="not valid JSON"):
        load_rora(Net(), tmp_path / "a")
    # after all that, a good save loads
    save_rora(a, tmp_path / "a")
    assert same(fresh_loaded(tmp_path / "a"), state(a))


def test_format_1_folder_loads_with_warning(tmp_path):
    """Adapters written before checksums (format 1) still load, with a warning."""
    from safetensors.torch import save_file

    a = make(1)
    save_rora(a, tmp_path / "new")
    doc = json.loads((tmp_path / "new" / P.CONFIG_NAME).read_text())
    doc["format_version"] = 1
    del doc["save_id"]
    old = tmp_path / "old"
    old.mkdir()
    (old / P.CONFIG_NAME).write_text(json.dumps(doc))
    from safetensors.torch import load_file
    save_file(load_file(str(tmp_path / "new" / P.WEIGHTS_NAME)), str(old / P.WEIGHTS_NAME),
              metadata={"format": "rora-fast", "version": "1"})
    with pytest.warns(UserWarning, match="format 1, no checksums"):
        got = fresh_loaded(old)
    assert same(got, state(a))


# ----------------------------------------------------------------------------- failures
def test_failed_save_keeps_previous_and_leaves_nothing(tmp_path, monkeypatch):
    a, b = make(1), make(2)
    save_rora(a, tmp_path / "ad")
    calls = {"n": 0}
    real_rename = os.rename

    def flaky_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # after target -> backup, before new -> target
            raise OSError("injected")
        return real_rename(src, dst)

    monkeypatch.setattr(A.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="injected"):
        save_rora(b, tmp_path / "ad")
    monkeypatch.setattr(A.os, "rename", real_rename)
    assert leftovers(tmp_path, ["ad"]) == []
    assert same(fresh_loaded(tmp_path / "ad"), state(a))

    # a failure while the tensors are written, and one while the JSON is written
    import safetensors.torch as st

    def boom(*args, **kwargs):
        raise OSError("disk full (injected)")

    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_rora(b, tmp_path / "ad")
    monkeypatch.undo()
    monkeypatch.setattr(P.Path, "write_bytes", boom)
    with pytest.raises(OSError, match="disk full"):
        save_rora(b, tmp_path / "ad")
    monkeypatch.undo()
    assert leftovers(tmp_path, ["ad"]) == []
    assert same(fresh_loaded(tmp_path / "ad"), state(a))
    save_rora(b, tmp_path / "ad")  # and the next save works
    assert same(fresh_loaded(tmp_path / "ad"), state(b))


def test_foreign_files_in_target_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt"):
        save_rora(make(1), tmp_path / "out")
    assert os.listdir(tmp_path / "out") == ["notes.txt"]
    assert leftovers(tmp_path, ["out"]) == []
    (tmp_path / "empty").mkdir()
    save_rora(make(1), tmp_path / "empty")  # an empty folder is fine
    assert verify_adapter(tmp_path / "empty")


def _dead_pid():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def test_stale_temporaries_and_half_swapped_state_recovered(tmp_path):
    a, b = make(1), make(2)
    save_rora(a, tmp_path / "ad")
    dead = _dead_pid()
    # killed between the two renames: the target is gone, the previous one is the backup
    os.rename(tmp_path / "ad", tmp_path / f".ad.rora-old-{dead}-0000")
    junk = tmp_path / f".ad.rora-tmp-{dead}-1111"
    junk.mkdir()
    (junk / P.WEIGHTS_NAME).write_bytes(b"partial")
    other = tmp_path / f".other.rora-tmp-{dead}-2222"  # another target's: not touched
    other.mkdir()
    assert same(fresh_loaded(tmp_path / "ad"), state(a))
    assert leftovers(tmp_path, ["ad", other.name]) == []
    # stale temporaries next to a complete target are removed by the next save
    junk.mkdir()
    save_rora(b, tmp_path / "ad")
    assert leftovers(tmp_path, ["ad", other.name]) == []
    assert same(fresh_loaded(tmp_path / "ad"), state(b))


# ----------------------------------------------------------------------------- kill -9
def _child_saving_forever(models, target, ready_w):
    try:
        torch.set_num_threads(1)
        os.write(ready_w, b"1")
        i = 0
        while True:
            save_rora(models[i % 2], target)
            i += 1
    finally:
        os._exit(0)


def _run_and_kill(child, delay):
    """Fork ``child(ready_fd)`` (it writes one byte to ``ready_fd`` when it starts, then
    loops), wait for that byte, sleep ``delay`` seconds, SIGKILL it and reap it."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        child(w)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def _check_after_kill(parent, target, allowed, head=256):
    """No mixed folder: the target (or, between the renames, the backup) verifies and is
    one of the allowed saves; after the load's recovery only the target is left."""
    names = os.listdir(parent)
    if os.path.exists(target):
        assert sorted(os.listdir(target)) == sorted([P.CONFIG_NAME, P.WEIGHTS_NAME])
        verify_adapter_no_recover(target)
    else:
        backups = [n for n in names if n.startswith(".ad.rora-old-")]
        assert len(backups) == 1, names
        verify_adapter_no_recover(os.path.join(parent, backups[0]))
    got = fresh_loaded(target, head=head)  # recovers, verifies, loads
    assert any(same(got, s) for s in allowed)
    assert leftovers(parent, ["ad"]) == []
    return got


def verify_adapter_no_recover(folder):
    P._read_rora(P.Path(folder))


def test_sigkill_at_random_instants_never_mixes(tmp_path):
    # ~1 MB per save (the head), so a save takes a few ms and the instants spread over it
    a, b = make(1, head=2048), make(2, head=2048)
    sa, sb = state(a), state(b)
    target = str(tmp_path / "ad")
    save_rora(a, target)
    t0 = time.perf_counter()
    for _ in range(4):
        save_rora(b, target)
    per_save = (time.perf_counter() - t0) / 4
    rng = random.Random(12)
    kills, t_start = 0, time.perf_counter()
    outcomes = set()
    while kills < 24 and (kills < 16 or time.perf_counter() - t_start < 4):
        _run_and_kill(lambda w: _child_saving_forever([a, b], target, w),
                      rng.uniform(0, 3 * per_save))
        kills += 1
        got = _check_after_kill(str(tmp_path), target, [sa, sb], head=2048)
        outcomes.add("a" if same(got, sa) else "b")
    assert kills >= 16


@pytest.mark.parametrize("crash_at", range(1, 19))
def test_sigkill_at_every_step_of_a_save(tmp_path, crash_at):
    """Deterministic kill points: the child SIGKILLs itself at the n-th file-system step
    of a save (each write, fsync, rename, removal), covering the instants between the
    two renames that random timing rarely hits."""
    a, b = make(1), make(2)
    sa, sb = state(a), state(b)
    target = str(tmp_path / "ad")
    save_rora(a, target)
    pid = os.fork()
    if pid == 0:
        try:
            steps = {"n": 0}

            def step(fn):
                def wrapped(*args, **kwargs):
                    steps["n"] += 1
                    if steps["n"] == crash_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    out = fn(*args, **kwargs)
                    steps["n"] += 1
                    if steps["n"] == crash_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return out
                return wrapped

            A.os.rename = step(os.rename)
            A._fsync_path = step(A._fsync_path)
            A.shutil.rmtree = step(A.shutil.rmtree)
            save_rora(b, target)
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    got = _check_after_kill(str(tmp_path), target, [sa, sb])
    if not killed:  # crash_at past the last step: the save completed
        assert same(got, sb)


def test_sigkill_during_peft_export(tmp_path):
    a, b = make(1, head=1024), make(2, head=1024)
    target = tmp_path / "peft"
    export_peft_adapter(a, target)
    from safetensors.torch import load_file
    wa = load_file(str(target / P.PEFT_WEIGHTS_NAME))
    export_peft_adapter(b, target)
    wb = load_file(str(target / P.PEFT_WEIGHTS_NAME))
    rng = random.Random(3)
    for _ in range(6):
        pid = os.fork()
        if pid == 0:
            try:
                i = 0
                while True:
                    export_peft_adapter([a, b][i % 2], target)
                    i += 1
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.005, 0.05))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        verify_adapter(target)  # recovers, then verifies
        got = load_file(str(target / P.PEFT_WEIGHTS_NAME))
        assert same(got, wa) or same(got, wb)
        assert leftovers(tmp_path, ["peft"]) == []


def test_peft_export_checksums_and_corruption(tmp_path):
    net = make(1)
    export_peft_adapter(net, tmp_path / "p")
    assert sorted(os.listdir(tmp_path / "p")) == sorted([P.PEFT_CONFIG_NAME, P.PEFT_WEIGHTS_NAME])
    assert verify_adapter(tmp_path / "p")["tensors"] == 6
    f = tmp_path / "p" / P.PEFT_WEIGHTS_NAME
    raw, spans = _tensor_spans(f)
    key = "base_model.model.l0.lora_A.weight"
    raw = bytearray(raw)
    raw[spans[key][0] + 1] ^= 0x55
    f.write_bytes(bytes(raw))
    with pytest.raises(AdapterIntegrityError, match=rf"adapter_model\.safetensors: tensor '{key}'"):
        verify_adapter(tmp_path / "p")


def test_trainer_callback_saves_are_atomic_and_verified(tmp_path):
    """The Trainer callback saves through save_rora and export_peft_adapter."""
    from rora_fast.trainer import RoraTrainerCallback

    net = make(1)
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "stray.txt").write_text("x")  # the export must not drop it silently
    cb = RoraTrainerCallback(rescale=False, save_dir=tmp_path / "rora",
                             export_peft_dir=tmp_path / "peft")
    with pytest.raises(FileExistsError, match="stray"):
        cb.on_train_end(None, None, None, model=net)
    (tmp_path / "peft" / "stray.txt").unlink()
    cb.on_train_end(None, None, None, model=net)
    assert verify_adapter(tmp_path / "rora") and verify_adapter(tmp_path / "peft")
    assert leftovers(tmp_path, ["rora", "peft"]) == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert same(fresh_loaded(tmp_path / "rora"), state(net))


def test_relative_paths_and_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    net = make(1)
    save_rora(net, "ad")  # relative to the working directory
    assert same(fresh_loaded("ad"), state(net))
    save_rora(net, "ad/")  # a trailing slash names the same folder
    assert leftovers(tmp_path, ["ad"]) == []
    with pytest.raises(ValueError, match="current working directory"):
        save_rora(net, ".")
    assert leftovers(tmp_path, ["ad"]) == []


def test_concurrent_writers_and_readers(tmp_path):
    """Two processes saving to the same folder while this one loads it: every save
    succeeds, every load gets one complete save (the parent folder's flock serialises
    the swaps against readers and other writers)."""
    a, b = make(1, head=1024), make(2, head=1024)
    sa, sb = state(a), state(b)
    target = str(tmp_path / "ad")
    save_rora(a, target)
    pids = []
    for model in (a, b):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for _ in range(40):
                    save_rora(model, target)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    loads, running = 0, set(pids)
    while running:
        verify_adapter(target)  # cheap: many reads while the writers swap
        loads += 1
        if loads % 10 == 0:
            got = fresh_loaded(target, head=1024)
            assert same(got, sa) or same(got, sb)
        for pid in list(running):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                running.discard(pid)
    assert loads >= 1
    assert leftovers(tmp_path, ["ad"]) == []


# ----------------------------------------------------------------------------- single files
def test_atomic_files_write_and_leave_nothing_behind(tmp_path):
    """Result files (JSON, text, plots, cache entries) go through one helper: the parent
    is created, the content is complete, no temporary is left."""
    A.write_json(tmp_path / "deep" / "r.json", {"a": [1, 2.5]})
    assert json.loads((tmp_path / "deep" / "r.json").read_text()) == {"a": [1, 2.5]}
    A.write_text(tmp_path / "deep" / "r.md", "# x\n")
    assert (tmp_path / "deep" / "r.md").read_text() == "# x\n"
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    A.save_figure(fig, tmp_path / "deep" / "p.png", dpi=50)  # format from the extension
    plt.close(fig)
    assert (tmp_path / "deep" / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path / "deep")) == ["p.png", "r.json", "r.md"]


def test_atomic_file_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "r.json"
    A.write_json(target, {"v": 1})

    def half(p):
        p.write_text('{"v": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        A.atomic_write_file(target, half)
    with pytest.raises(TypeError):  # not serialisable: raises before anything is written
        A.write_json(target, {"v": object()})
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["r.json"]


def _child_writing_forever(target, texts, ready_w):
    try:
        os.write(ready_w, b"1")
        i = 0
        while True:
            A.write_text(target, texts[i % 2])
            i += 1
    finally:
        os._exit(0)


def test_atomic_file_sigkill_never_leaves_a_part(tmp_path):
    """A writer killed at random instants: the target is always one whole version; the
    killed writer's temporary is removed by the next write of the same target."""
    target = tmp_path / "r.json"
    texts = [json.dumps({"v": v, "pad": "x" * 400_000}) for v in (1, 2)]
    A.write_text(target, texts[0])
    t0 = time.perf_counter()
    for i in range(4):
        A.write_text(target, texts[i % 2])
    per_write = (time.perf_counter() - t0) / 4
    rng = random.Random(3)
    for _ in range(16):
        _run_and_kill(lambda w: _child_writing_forever(target, texts, w),
                      rng.uniform(0, 3 * per_write))
        assert target.read_text() in texts
        A.write_text(target, texts[0])
        assert os.listdir(tmp_path) == ["r.json"]


def test_atomic_file_temporary_is_hidden_from_extension_listings(tmp_path):
    """Readers list "*.json" (run folders, aggregates): a write in progress must not
    show up there."""
    seen = []

    def spy(p):
        seen.append(p.name)
        assert not p.name.endswith(".json") and p.name.startswith(".")
        assert [n for n in os.listdir(tmp_path) if n.endswith(".json")] == []
        p.write_text("{}")

    A.atomic_write_file(tmp_path / "run.json", spy)
    assert seen and os.listdir(tmp_path) == ["run.json"]
