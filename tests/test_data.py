"""The shipped-dataset loader: formats, splits, CoLA's carve-out, subsampling, errors."""
import pytest

from rora_fast import Example
from rora_harness.data import COLA_DEV_SIZE, DATASETS, load_dataset, strip_html, subsample


def test_sst2_sentence_sizes_and_labels():
    tr = load_dataset("sst2_sentence", "train")
    assert len(tr) == 6920
    assert sum(ex.label for ex in tr) == 3610
    assert len(load_dataset("sst2_sentence", "dev")) == 872
    te = load_dataset("sst2_sentence", "test")
    assert len(te) == 1821 and {ex.label for ex in te} == {0, 1}
    text, label = te[0]  # unpacks like a tuple
    assert isinstance(text, str) and label in (0, 1)


def test_no_csv_quoting_leading_quote_kept():
    rows = load_dataset("mr", "train")
    assert any(ex.text.startswith('"') for ex in rows)


def test_imdb_br_stripping_default_and_optional():
    raw = load_dataset("imdb", "dev", strip_br=False)
    assert any("<br" in ex.text for ex in raw)
    clean = load_dataset("imdb", "dev")
    assert not any("<br" in ex.text.lower() for ex in clean)
    assert len(raw) == len(clean) == 1000
    assert strip_html("a<br /><br />b") == "a b"


def test_cola_dev_is_carved_from_train_and_test_is_public_dev():
    tr, dv, te = (load_dataset("cola", s) for s in ("train", "dev", "test"))
    assert len(te) == 1043
    assert len(dv) == COLA_DEV_SIZE and len(tr) == 8551 - COLA_DEV_SIZE
    # the carve-out does not depend on the run's seed
    assert load_dataset("cola", "dev", seed=5) == dv


def test_subsample_is_deterministic_and_stratified():
    rows = load_dataset("cr", "train")
    a = load_dataset("cr", "train", limit=200, seed=3)
    b = load_dataset("cr", "train", limit=200, seed=3)
    c = load_dataset("cr", "train", limit=200, seed=4)
    assert a == b and a != c and len(a) == 200
    share = sum(ex.label for ex in rows) / len(rows)
    assert abs(sum(ex.label for ex in a) / 200 - share) < 0.01
    assert subsample(rows, None) == rows
    with pytest.raises(ValueError):
        subsample(rows, 0)


def test_bad_names_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown dataset 'sst3'"):
        load_dataset("sst3", "train")
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_dataset("cr", "validation")


def test_malformed_file(tmp_path):
    d = tmp_path / "cr"
    d.mkdir()
    (d / "train.tsv").write_text("sentence\tlabel\na\tb\tc\n")
    with pytest.raises(ValueError, match="exactly one TAB"):
        load_dataset("cr", "train", root=str(tmp_path))
    (d / "train.tsv").write_text("text,label\n")
    with pytest.raises(ValueError, match="header"):
        load_dataset("cr", "train", root=str(tmp_path))


def test_every_dataset_loads():
    for name in DATASETS:
        rows = load_dataset(name, "test", limit=10)
        assert len(rows) == 10 and all(isinstance(r, Example) for r in rows)
