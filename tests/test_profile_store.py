"""The Parquet store: partitioned parts, atomic appends, validated and de-duplicated loads, merge."""

import re

import pandas as pd
import pytest

from core.profiling.schema import ProfileSchemaError, rows_to_frame
from core.profiling.store import ProfileStore, ProfileStoreError
from tests.helpers import make_row


def rows(dataset: str, n: int, run_index: int = 0):
    return [make_row(f"{dataset}:test:{i}", dataset=dataset, run_index=run_index) for i in range(n)]


def test_append_partitions_by_dataset_and_loads_back(tmp_path):
    store = ProfileStore(tmp_path / "results")
    written = store.append(rows("a", 3) + rows("b", 2), shard=1)
    assert sorted(p.relative_to(tmp_path / "results").as_posix() for p in written) == [
        "a/part-1-0.parquet", "b/part-1-0.parquet",
    ]
    store.append(rows("a", 3, run_index=1), shard=1)
    assert (tmp_path / "results" / "a" / "part-1-1.parquet").is_file()
    df = store.load()
    assert len(df) == 8
    assert len(store.load(["b"])) == 2
    assert ("a:test:0", "medium-k8-b12", 1) in store.existing_keys()


def test_duplicate_row_keys_appear_once(tmp_path):
    store = ProfileStore(tmp_path)
    store.append(rows("a", 3), shard=0)
    store.append(rows("a", 2), shard=1)  # the same keys again, as after an overlapping rerun
    df = store.load()
    assert len(df) == 3
    assert not df.duplicated(["sample_id", "tier", "top_k", "num_active_blocks", "run_index"]).any()


def test_leftover_tmp_file_from_a_kill_is_ignored(tmp_path):
    store = ProfileStore(tmp_path)
    store.append(rows("a", 2))
    (tmp_path / "a" / ".part-0-1.parquet.tmp").write_bytes(b"PAR1 half a file")
    assert len(store.load()) == 2
    assert len(store.existing_keys()) == 2


def test_missing_or_empty_results_dir_names_the_path(tmp_path):
    with pytest.raises(ProfileStoreError, match=re.escape(str(tmp_path / "nope"))):
        ProfileStore(tmp_path / "nope").load()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProfileStoreError, match="holds no part files"):
        ProfileStore(tmp_path / "empty").load()
    assert ProfileStore(tmp_path / "nope").existing_keys() == set()


def test_unknown_dataset_is_named(tmp_path):
    store = ProfileStore(tmp_path)
    store.append(rows("a", 1))
    with pytest.raises(ProfileStoreError, match="'zzz'"):
        store.load(["zzz"])


def test_bad_part_file_error_names_the_file(tmp_path):
    store = ProfileStore(tmp_path)
    store.append(rows("a", 1))
    bad = rows_to_frame(rows("a", 1)).drop(columns=["T_decode_ms"])
    path = tmp_path / "a" / "part-9-0.parquet"
    bad.to_parquet(path, index=False)
    with pytest.raises(ProfileSchemaError, match=re.escape(str(path)) + ".*T_decode_ms"):
        store.load()


def test_append_rejects_invalid_rows(tmp_path):
    with pytest.raises(ProfileSchemaError, match="T_prefill_ms"):
        ProfileStore(tmp_path).append([make_row(T_prefill_ms=float("nan"))])
    assert not any(tmp_path.iterdir())


def test_merge_compacts_to_one_file_per_dataset(tmp_path):
    store = ProfileStore(tmp_path / "r")
    for shard in range(3):
        store.append(rows("a", 2, run_index=shard), shard=shard)
    store.append(rows("a", 2, run_index=0), shard=5)  # duplicates
    before = store.load()
    out = store.merge(tmp_path / "merged")
    assert [p.name for p in out] == ["part-merged-0.parquet"]
    merged = ProfileStore(tmp_path / "merged").load()
    pd.testing.assert_frame_equal(
        merged.sort_values(["sample_id", "run_index"]).reset_index(drop=True),
        before.sort_values(["sample_id", "run_index"]).reset_index(drop=True),
    )
    store.merge()  # in place
    assert [p.name for p in store.part_files()] == ["part-merged-0.parquet"]
    assert len(store.load()) == 6


# --- concurrent writers and damaged parts (issue 17) ---------------------------------------------

def _append_parts(results_dir: str, writer: int, shard: int, parts: int) -> None:
    store = ProfileStore(results_dir)
    for n in range(parts):
        store.append([make_row(f"a:test:{writer}-{n}-{i}", dataset="a") for i in range(3)], shard=shard)


@pytest.mark.parametrize("shards", [(0, 0), (0, 0, 0, 0), (0, 1, 0, 1)], ids=["2-same", "4-same", "4-mixed"])
def test_concurrent_writers_lose_no_row(tmp_path, shards):
    # Two writers of one shard used one tmp name and picked the same part number: a part was replaced or corrupt.
    import multiprocessing

    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_append_parts, args=(str(tmp_path), w, s, 8)) for w, s in enumerate(shards)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0] * len(shards)
    df = ProfileStore(tmp_path).load()
    assert len(df) == len(shards) * 8 * 3 and df["sample_id"].is_unique
    assert not list((tmp_path / "a").glob("*.tmp"))


def _damage(path, where: str) -> None:
    data = bytearray(path.read_bytes())
    if where == "footer":
        data[-12:-4] = b"\x00" * 8  # the footer length and the end of its metadata
    else:
        middle = len(data) // 3
        data[middle:middle + 16] = bytes(b ^ 0xFF for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["footer", "data"])
def test_corrupt_part_is_moved_aside_named_and_measured_again(tmp_path, caplog, where):
    store = ProfileStore(tmp_path)
    store.append(rows("a", 2), shard=0)
    bad = store.append([make_row(f"a:test:{i}", dataset="a") for i in range(2, 40)], shard=0)[0]
    _damage(bad, where)
    with caplog.at_level("WARNING"):
        keys = store.existing_keys()
    assert len(keys) == 2  # the damaged part's rows count as not measured: a resume measures them again
    assert str(bad) in caplog.text and "corrupt" in caplog.text and len(caplog.records) == 1
    assert not bad.exists() and bad.with_name(bad.name + ".corrupt").exists()
    assert len(store.load()) == 2  # later loads read the rest without a traceback
    store.append(rows("a", 1, run_index=5), shard=0)
    assert (tmp_path / "a" / "part-0-2.parquet").exists()  # a new part never reuses the moved-aside name


def test_results_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(ProfileStoreError, match="is a file"):
        ProfileStore(tmp_path / "file").check_writable()
    with pytest.raises(ProfileStoreError, match="is a file"):
        ProfileStore(tmp_path / "file" / "below").check_writable()
    ProfileStore(tmp_path / "new" / "dir").check_writable()  # a directory still to be made is fine
