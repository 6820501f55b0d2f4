"""Importing the original study's per-config JSON files into the schema."""

import json
import shutil
from pathlib import Path

import pytest

from core.profiling.importer import OriginalStudyImportError, import_into_store, import_original_study
from core.profiling.store import ProfileStore

FIXTURE = Path(__file__).parent / "fixtures" / "original_study"


def test_fixture_imports_into_the_schema():
    result = import_original_study(FIXTURE)
    df = result.frame
    assert len(df) == 6 and len(result.files_read) == 2
    assert set(df["tier"]) == {"low", "high"}  # "max_crops": 12 maps to high
    assert set(df["sample_id"]) == {f"textvqa:validation:{i}" for i in range(3)}
    assert any("summary.json" in n for n in result.notes)


def test_batch_index_ids_are_rebuilt_and_noted():
    result = import_original_study(FIXTURE)
    assert any("batch-index" in n for n in result.notes)
    assert not result.frame["sample_id"].str.fullmatch(r"\d+").any()


def test_decode_per_token_is_recomputed_over_decode_forwards():
    df = import_original_study(FIXTURE).frame
    row = df[(df["sample_id"] == "textvqa:validation:0") & (df["tier"] == "low")].iloc[0]
    assert row["T_decode_per_token_ms"] == pytest.approx(60.0 / 2)  # the file says 20 = 60 / 3
    assert row["T_total_ms"] == pytest.approx(41.5 + 121.0 + 60.0)
    one_token = df[(df["sample_id"] == "textvqa:validation:2") & (df["tier"] == "low")].iloc[0]
    assert one_token["T_decode_per_token_ms"] == 0.0


def test_missing_latency_field_names_file_and_field(tmp_path):
    shutil.copy(FIXTURE / "low-k8-b16.json", tmp_path / "low-k8-b16.json")
    doc = json.loads((tmp_path / "low-k8-b16.json").read_text())
    del doc["per_sample_results"][1]["T_LLM_prefill"]
    (tmp_path / "low-k8-b16.json").write_text(json.dumps(doc))
    with pytest.raises(OriginalStudyImportError, match=r"low-k8-b16\.json.*per_sample_results\[1\].*T_prefill_ms"):
        import_original_study(tmp_path)


def test_import_into_store_twice_adds_nothing_new(tmp_path):
    store = ProfileStore(tmp_path / "results")
    import_into_store(FIXTURE, store)
    second = import_into_store(FIXTURE, store)
    assert len(store.load()) == 6
    assert any("already in" in n for n in second.notes)
