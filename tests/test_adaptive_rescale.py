"""The adaptive rescale (issue 29): spectral_rescale_'s factor, and adaptive_rescale_
against a readable reference (each rung applied to a copy of the model, its clean accuracy
computed by hand, the strongest within the tolerance kept)."""
import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import rora_fast
from rora_fast import RescaleStep, adaptive_rescale_, dev_accuracy, spectral_rescale_


class Tiny(nn.Module):
    """Four blocks (``layers.i.lin``) and a 3-class head: a stand-in classifier."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"lin": nn.Linear(12, 12)}) for _ in range(4))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        for blk in self.layers:
            x = torch.tanh(blk["lin"](x))
        return SimpleNamespace(logits=self.head(x))


def _rora_model(seed=0):
    torch.manual_seed(seed)
    m = Tiny().double()
    m = rora_fast.apply_rora(m, rora_fast.RoraConfig(
        r=2, alpha=4, target_modules=["lin"], modules_to_save=["head"], ortho_rank=2))
    with torch.no_grad():  # a "trained" update
        for _, lay in rora_fast.rora_layers(m):
            lay.lora_B.normal_(0, 0.3)
    return m.eval()


def _batches(model, n=96, seed=1, flip=0.15):
    """Labels = the un-rescaled model's predictions, a share flipped: accuracy < 100."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 12, generator=g, dtype=torch.float64)
    with torch.no_grad():
        y = model(x).logits.argmax(-1)
    flipmask = torch.rand(n, generator=g) < flip
    y = torch.where(flipmask, (y + 1) % 3, y)
    return [{"x": x[i:i + 32], "labels": y[i:i + 32]} for i in range(0, n, 32)]


def _acc(model, batches):
    with torch.no_grad():
        hits = sum(int((model(b["x"]).logits.argmax(-1) == b["labels"]).sum()) for b in batches)
    return 100.0 * hits / sum(len(b["labels"]) for b in batches)


def _scales(model):
    return {n: lay.scaling for n, lay in rora_fast.rora_layers(model)}


def test_factor_multiplies_the_papers_scale():
    a, b = _rora_model(), _rora_model()
    s1 = spectral_rescale_(a, layers=2)
    s2 = spectral_rescale_(b, layers=2, factor=0.25)
    assert s1.keys() == s2.keys() and len(s1) == 2
    for n in s1:
        assert s2[n] == pytest.approx(0.25 * s1[n], rel=1e-12)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="factor"):
            spectral_rescale_(_rora_model(), layers=1, factor=bad)


LADDER = [RescaleStep(1, 0.5), RescaleStep(2, 0.5), RescaleStep(2, 1.0), RescaleStep(4, 1.0),
          RescaleStep(4, 4.0)]


@pytest.mark.parametrize("tolerance", [0.0, 2.0, 5.0, 100.0])
def test_adaptive_rescale_equals_reference(tolerance):
    model = _rora_model()
    batches = _batches(model)
    trained = _scales(model)
    base = _acc(model, batches)
    accs = []
    for step in LADDER:
        ref = copy.deepcopy(model)
        spectral_rescale_(ref, layers=step.layers, factor=step.factor)
        accs.append(_acc(ref, batches))
    ok = [i for i, a in enumerate(accs) if a >= base - tolerance]
    want = LADDER[ok[-1]] if ok else None

    info = adaptive_rescale_(model, batches, ladder=LADDER, tolerance=tolerance)
    assert info["base_accuracy"] == pytest.approx(base)
    assert [r["accuracy"] for r in info["steps"]] == pytest.approx(accs, abs=1e-4)
    if want is None:
        assert info["chosen"] is None and info["scales"] == {}
        assert _scales(model) == trained
    else:
        assert info["chosen"] == {"layers": want.layers, "factor": want.factor}
        ref = copy.deepcopy(_rora_model())
        expect = spectral_rescale_(ref, layers=want.layers, factor=want.factor)
        assert info["scales"] == pytest.approx(expect)
        got = _scales(model)
        for n, s in got.items():
            assert s == pytest.approx(expect.get(n, trained[n]))
    if tolerance == 100.0:
        assert info["chosen"] == {"layers": 4, "factor": 4.0}


def test_no_rung_within_tolerance_leaves_the_model_unchanged():
    model = _rora_model()
    batches = _batches(model, flip=0.0)  # base accuracy 100
    before = copy.deepcopy(model.state_dict())
    info = adaptive_rescale_(model, batches, ladder=[RescaleStep(4, 50.0)], tolerance=0.0)
    assert info["base_accuracy"] == 100.0 and info["steps"][0]["accuracy"] < 100.0
    assert info["chosen"] is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not lay.rescaled for _, lay in rora_fast.rora_layers(model))


def test_on_step_sees_each_state_and_an_error_restores_the_model():
    model = _rora_model()
    batches = _batches(model)
    seen = []
    adaptive_rescale_(copy.deepcopy(model), batches, ladder=LADDER[:2], tolerance=100,
                      on_step=lambda step, m, z: seen.append((step, dict(_scales(m)), z)))
    assert [s for s, _, _ in seen] == [None] + LADDER[:2]
    assert seen[1][1] != seen[0][1] and seen[2][1] != seen[1][1]
    y = torch.cat([b["labels"] for b in batches])
    assert all(z.shape == (len(y), 3) for _, _, z in seen)
    with torch.no_grad():  # the un-rescaled state's logits are the model's own
        torch.testing.assert_close(seen[0][2], torch.cat([model(b["x"]).logits for b in batches]))

    trained = _scales(model)

    def boom(step, m, z):
        if step is not None and step.layers == 2:
            raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        adaptive_rescale_(model, batches, ladder=LADDER, tolerance=100, on_step=boom)
    assert _scales(model) == trained


def test_pissa_refold_is_undone_between_rungs():
    """PiSSA's rescale rewrites the base (re-fold): after a stronger rung on all blocks and
    the chosen one on two, the model equals the chosen rung applied alone."""
    torch.manual_seed(0)
    m = rora_fast.apply_rora(Tiny().double(), rora_fast.RoraConfig(
        r=2, alpha=4, target_modules=["lin"], modules_to_save=["head"], ortho_rank=2,
        init="pissa"))
    with torch.no_grad():
        for _, lay in rora_fast.rora_layers(m):
            lay.lora_B.add_(torch.randn_like(lay.lora_B) * 0.1)
    m.eval()
    ref = copy.deepcopy(m)
    info = adaptive_rescale_(m, _batches(m), ladder=[RescaleStep(4, 0.5), RescaleStep(2, 1.0)],
                             tolerance=100.0)
    assert info["chosen"] == {"layers": 2, "factor": 1.0}
    spectral_rescale_(ref, layers=2, factor=1.0)
    want = ref.state_dict()
    assert all(torch.equal(want[k], v) for k, v in m.state_dict().items())
    assert _scales(m) == _scales(ref)


def test_peft_lora_scales_restored():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False)
    m = peft.get_peft_model(Tiny().double(), cfg).eval()
    layers = dict(rora_fast.model.peft_lora_layers(m))
    before = {n: l.scaling["default"] for n, l in layers.items()}
    info = adaptive_rescale_(m, _batches(m), ladder=[RescaleStep(4, 1.0), RescaleStep(2, 1.0)],
                             tolerance=100.0)
    assert info["chosen"] == {"layers": 2, "factor": 1.0}
    now = {n: l.scaling["default"] for n, l in layers.items()}
    changed = sorted(n for n in now if now[n] != before[n])
    assert changed == sorted(info["scales"]) and len(changed) == 2
    assert all(rora_fast.block_index(n) >= 2 for n in changed)


def test_bad_input_is_named():
    model = _rora_model()
    batches = _batches(model)
    with pytest.raises(ValueError, match="tolerance"):
        adaptive_rescale_(model, batches, tolerance=-1)
    with pytest.raises(ValueError, match="ladder"):
        adaptive_rescale_(model, batches, ladder=[])
    with pytest.raises(TypeError, match="iterator"):
        adaptive_rescale_(model, iter(batches))
    with pytest.raises(ValueError, match="labels"):
        adaptive_rescale_(model, [{"x": batches[0]["x"]}], ladder=LADDER[:1])
    with pytest.raises(ValueError, match="no rows"):
        dev_accuracy(model, [])
    for bad in ((0, 1.0), (2, 0.0), (1, float("nan"))):
        with pytest.raises(ValueError, match="RescaleStep"):
            RescaleStep(*bad)
    assert all(not lay.rescaled for _, lay in rora_fast.rora_layers(model))


def test_adaptive_study_replays_the_api_choice():
    """scripts/eval/adaptive_study.py measures every rung once and replays the rule for
    sub-ladders and tolerances from the recorded dev accuracies: the replay must pick
    what adaptive_rescale_ itself picks."""
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "eval", "adaptive_study.py")
    spec = importlib.util.spec_from_file_location("adaptive_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    model = _rora_model(3)
    batches = _batches(model, flip=0.25)
    grid = [(1, 0.25), (1, 1.0), (2, 0.5), (2, 1.0), (4, 0.5), (4, 2.0)]
    rungs = []
    info = adaptive_rescale_(copy.deepcopy(model), batches,
                             ladder=[RescaleStep(L, c) for L, c in grid], tolerance=100.0,
                             on_step=lambda step, m, z: rungs.append(
                                 {"layers": step.layers if step else 0,
                                  "factor": step.factor if step else 0.0}))
    rungs[0]["dev_acc"] = info["base_accuracy"]
    for r, s in zip(rungs[1:], info["steps"]):
        r["dev_acc"] = s["accuracy"]
    picked = set()
    for ladder in (grid, grid[:3], [grid[1], grid[3], grid[5]], [grid[4]]):
        for delta in (0.0, 1.0, 3.0, 10.0):
            want = adaptive_rescale_(copy.deepcopy(model), batches,
                                     ladder=[RescaleStep(L, c) for L, c in ladder],
                                     tolerance=delta)["chosen"]
            got = study.choose(rungs, ladder, delta)
            got = None if got["layers"] == 0 else {"layers": got["layers"],
                                                   "factor": got["factor"]}
            assert got == want, (ladder, delta)
            picked.add(None if want is None else (want["layers"], want["factor"]))
    assert len(picked) >= 3  # the cases differ: the replay is checked on several outcomes


def test_adaptive_study_summary_margins(tmp_path, monkeypatch):
    """The study's summary: a configuration's per-seed pick, its means and its margins
    against LoRA of the same schedule, on hand-made run files."""
    import importlib.util
    import json
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "eval", "adaptive_study.py")
    spec = importlib.util.spec_from_file_location("adaptive_study_sum", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    monkeypatch.setattr(study, "ROOT", str(tmp_path))
    monkeypatch.setattr(study, "SCHEDULES", {"small": {"cr": "seeds-cr"}})
    os.makedirs(tmp_path / "seeds-cr" / "runs")
    os.makedirs(tmp_path / "out" / "runs")

    def m(ca, asr, fl):
        return {"CA": ca, "ASR": asr, "ASR_floor": fl}
    for seed, (lca, lfl) in {0: (86.0, 10.0), 1: (88.0, 12.0)}.items():
        with open(tmp_path / "seeds-cr" / "runs" / f"lora-{seed}.json", "w") as f:
            json.dump({"kind": "defence", "spec": {"method": "lora", "seed": seed},
                       "metrics": m(lca, 100.0, lfl)}, f)
        rungs = [{"layers": 0, "factor": 0.0, "dev_acc": 85.0, "dev_acc_repaired": 85.2,
                  "test": m(86.0, 100.0, 10.0), "test_repaired": m(86.0, 100.0, 10.0)}]
        for L, c in study.GRID:
            strong = (L, c) == (3, 1.0)
            dev = 80.0 if strong else 84.5 - 0.1 * seed
            # after the repair the strong rung is within 1 point: the repaired rule takes it
            rungs.append({"layers": L, "factor": c, "dev_acc": dev,
                          "dev_acc_repaired": 84.6 if strong else 85.0,
                          "test": m(80.0 if strong else 85.0, 12.0, 11.0 + seed),
                          "test_repaired": m(81.0 if strong else 85.5, 11.0, 10.0)})
        with open(tmp_path / "out" / "runs" / f"small-cr-s{seed}.json", "w") as f:
            json.dump({"schedule": "small", "cell": "cr", "seed": seed, "rungs": rungs}, f)
    s = study.summarise(str(tmp_path / "out"))
    t = s["schedules"]["small"]
    paper = t["top3 x1 (paper rule, library default)"]["cells"]["cr"]
    assert paper["CA"]["mean"] == 80.0
    assert paper["margins"]["CA"] == pytest.approx(80.0 - (87.0 - 1))
    ad = t["adaptive top3 x{.25,.5,1} δ=1"]["cells"]["cr"]
    assert [ad["per_seed"][s_]["rung"] for s_ in ("0", "1")] == [[3, 0.5], [3, 0.5]]
    assert ad["margins"] == {"CA": pytest.approx(85.0 - 86.0), "ASR": pytest.approx(11.5 + 5 - 12.0),
                             "floor": pytest.approx(11.0 + 5 - 11.5)}
    assert t["adaptive top3 x{.25,.5,1} δ=1"]["worst_margin"] == pytest.approx(-1.0)
    rep = t["adaptive top3 x{.25,.5,1} δ=1 + repair"]["cells"]["cr"]
    assert rep["CA"]["mean"] == 85.5 and t["adaptive top3 x{.25,.5,1} δ=1 + repair"]["complete"]
    after = t["adaptive after repair top3 x{.25,.5,1} δ=1 + repair"]["cells"]["cr"]
    assert [after["per_seed"][s_]["rung"] for s_ in ("0", "1")] == [[3, 1.0], [3, 1.0]]
    assert after["CA"]["mean"] == 81.0
    assert t["adaptive after repair top3 x{.25,.5,1} δ=0.5 + repair"]["cells"]["cr"][
        "per_seed"]["0"]["rung"] == [3, 0.5]
    # the repaired accuracy judges the repaired model only
    assert not [c for c in t if c.startswith("adaptive after repair") and "repair" not in c[21:]]
    # a run without a ladder's rung is left out of that ladder's rows, not guessed
    assert study.choose(rungs[:3], [(3, 0.25), (3, 1.0)], 1.0) is None
    assert os.path.exists(tmp_path / "out" / "summary.md")
    assert os.path.exists(tmp_path / "out" / "summary.png")


def test_set_scales_sweeps_and_restores_through_the_refold():
    """``set_scales_`` / ``adapter_scales`` (issue 30, item 3: the harness's scale sweeps
    and resets): a PiSSA base absorbs each change as the rescale does, and restoring the
    training scales gives back the trained model exactly, flags included."""
    torch.manual_seed(0)
    m = rora_fast.apply_rora(Tiny().double(), rora_fast.RoraConfig(
        r=2, alpha=4, target_modules=["lin"], modules_to_save=["head"], ortho_rank=2,
        init="pissa"))
    with torch.no_grad():
        for _, lay in rora_fast.rora_layers(m):
            lay.lora_B.add_(torch.randn_like(lay.lora_B) * 0.1)
    m.eval()
    trained = rora_fast.adapter_scales(m)
    assert set(trained.values()) == {2.0}
    state0 = copy.deepcopy(m.state_dict())
    ref = copy.deepcopy(m)
    scales = spectral_rescale_(ref, layers=2)
    got = rora_fast.set_scales_(m, scales)
    assert got == scales
    want = ref.state_dict()
    assert all(torch.equal(want[k], v) for k, v in m.state_dict().items())
    assert [lay.rescaled for _, lay in rora_fast.rora_layers(m)] == \
        [lay.rescaled for _, lay in rora_fast.rora_layers(ref)]
    rora_fast.set_scales_(m, trained)
    assert rora_fast.adapter_scales(m) == trained
    assert not any(lay.rescaled for _, lay in rora_fast.rora_layers(m))
    now = m.state_dict()
    # the re-fold is exact up to one float64 rounding of the base
    assert all(torch.allclose(state0[k], v, rtol=0, atol=1e-12) for k, v in now.items())
    with pytest.raises(ValueError, match="'nope' is not a RoRA or PEFT LoRA layer"):
        rora_fast.set_scales_(m, {"nope": 1.0})
    name = next(iter(trained))
    for bad in (0.0, float("nan"), -1.0, True):
        with pytest.raises(ValueError, match=f"the scale of {name} must be a finite number"):
            rora_fast.set_scales_(m, {name: 1.0, **{name: bad}})
    assert rora_fast.adapter_scales(m) == trained


def test_set_scales_on_peft_layers():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lin"], init_lora_weights=False)
    m = peft.get_peft_model(Tiny().double(), cfg).eval()
    trained = rora_fast.adapter_scales(m)
    name = sorted(trained)[-1]
    rora_fast.set_scales_(m, {name: 7.5})
    layers = dict(rora_fast.model.peft_lora_layers(m))
    assert layers[name].scaling["default"] == 7.5
    rora_fast.set_scales_(m, trained)
    assert rora_fast.adapter_scales(m) == trained


def test_adaptive_rescale_after_repair_against_a_reference():
    """``after_repair=True``: each state judged by its dev accuracy after the frequency
    head-bias shift fitted on its own dev logits (computed here by hand on copies); the
    strongest rung within the tolerance of the un-rescaled state's is kept, the head is
    untouched; the study's replay on recorded repaired accuracies picks the same."""
    import importlib.util
    import os
    from rora_fast.repair import frequency_bias_shift
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "scripts", "eval", "adaptive_study.py")
    spec = importlib.util.spec_from_file_location("adaptive_study_rep", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    model = _rora_model(6)
    batches = _batches(model, n=192, flip=0.2)
    y = torch.cat([b["labels"] for b in batches])

    def repaired_acc(m):
        with torch.no_grad():
            z = torch.cat([m(b["x"]).logits for b in batches]).double()
        d = frequency_bias_shift(z, y.tolist())
        return 100.0 * float(((z + d).argmax(-1) == y).double().mean())

    grid = [(1, 0.5), (2, 0.5), (2, 1.0), (4, 1.0), (4, 3.0)]
    base = repaired_acc(model)
    accs = []
    for L, c in grid:
        m = copy.deepcopy(model)
        spectral_rescale_(m, layers=L, factor=c)
        accs.append(repaired_acc(m))
    head0 = model.head.modules_to_save["default"].bias.clone() if hasattr(
        model.head, "modules_to_save") else model.head.bias.clone()
    rungs = [{"layers": 0, "factor": 0.0, "dev_acc_repaired": base}] + [
        {"layers": L, "factor": c, "dev_acc_repaired": a} for (L, c), a in zip(grid, accs)]
    picked = set()
    for tol in (0.0, 1.0, 3.0, 10.0, 100.0):
        want = None
        for (L, c), a in zip(grid, accs):
            if a >= base - tol:
                want = (L, c)
        m = copy.deepcopy(model)
        info = adaptive_rescale_(m, batches, ladder=[RescaleStep(L, c) for L, c in grid],
                                 tolerance=tol, after_repair=True)
        got = None if info["chosen"] is None else (info["chosen"]["layers"],
                                                    info["chosen"]["factor"])
        assert got == want, tol
        assert info["after_repair"] and info["base_accuracy"] == pytest.approx(base, abs=1e-4)
        assert [s["accuracy"] for s in info["steps"]] == pytest.approx(accs, abs=1e-4)
        head = m.head.modules_to_save["default"] if hasattr(m.head, "modules_to_save") else m.head
        assert torch.equal(head.bias, head0)  # the caller repairs, not this call
        replay = study.choose(rungs, grid, tol, acc="dev_acc_repaired")
        assert (None if replay["layers"] == 0 else (replay["layers"], replay["factor"])) == want
        picked.add(want)
    assert len(picked) >= 3  # the cases differ


def test_adaptive_rescale_after_repair_is_checked():
    model = _rora_model(0)
    with pytest.raises(TypeError, match="after_repair must be a bool"):
        adaptive_rescale_(model, _batches(model), after_repair="yes")
