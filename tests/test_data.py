"""Data preparation: every local format, the held-out split, end-of-text placement, the cache, errors,
and the batch sampler."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from training_helpers import PYTHON, REPO, SHARED_STORIES, make_stories, subprocess_env, write_raw_txt

from slm.data import (
    BatchSampler,
    DataError,
    DataSpec,
    cache_key,
    eval_window_starts,
    iter_hub_stories,
    prepare_data,
)
from slm.tokenizer import load_tokenizer

TOKENIZER = load_tokenizer()


def expected_stream(stories: list[str]) -> list[int]:
    """Each story's tokens followed by <|endoftext|>."""
    out: list[int] = []
    for story in stories:
        out += [*TOKENIZER.encode_ordinary(story), TOKENIZER.eot_id]
    return out


def prepare(source: Path | str, cache: Path, **spec: object):
    return prepare_data(DataSpec(str(source), **spec), TOKENIZER, cache, progress=False)


def write_all_formats(folder: Path, stories: list[str]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    records = [{"id": i, "text": s} for i, s in enumerate(stories)]
    paths = {
        "txt": write_raw_txt(folder / "stories.txt", stories),
        "jsonl": folder / "stories.jsonl",
        "json": folder / "stories.json",
        "json-lines": folder / "lines.json",  # what datasets' to_json writes: JSON lines named .json
        "parquet": folder / "stories.parquet",
    }
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in records))
    paths["json"].write_text(json.dumps(records))
    paths["json-lines"].write_text("".join(json.dumps(r) + "\n" for r in records))
    pq.write_table(pa.table({"id": [r["id"] for r in records], "text": stories}), paths["parquet"])
    return paths


def test_every_local_format_gives_the_same_tokens_with_eot_after_each_story(tmp_path: Path) -> None:
    stories = make_stories(50, seed=7)
    stories[3] = "A story with a blank line inside.\n\nAnd a second paragraph."
    paths = write_all_formats(tmp_path / "data", stories)
    every = 10  # val_fraction 0.1: stories 0, 10, 20, ... are held out
    expected_train = expected_stream([s for i, s in enumerate(stories) if i % every])
    expected_val = expected_stream([s for i, s in enumerate(stories) if i % every == 0])
    for name, path in paths.items():
        prepared = prepare(path, tmp_path / "cache", val_fraction=0.1)
        assert prepared.train.tolist() == expected_train, name
        assert prepared.val.tolist() == expected_val, name
        assert prepared.train.dtype == np.uint16
        assert prepared.meta["train_stories"] == 45 and prepared.meta["val_stories"] == 5


def test_a_folder_reads_its_files_in_name_order_and_skips_hidden_ones(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    first, second = make_stories(6, seed=1), make_stories(6, seed=2)
    write_raw_txt(folder / "a.txt", first)
    (folder / "sub" / "b.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in second))
    write_raw_txt(folder / ".hidden.txt", ["never read"])
    (folder / "notes.md").write_text("not data")
    prepared = prepare(folder, tmp_path / "cache", val_fraction=0.5)
    both = first + second
    assert prepared.train.tolist() + prepared.val.tolist() == (
        expected_stream([s for i, s in enumerate(both) if i % 2]) + expected_stream(both[::2])
    )


def test_raw_text_tolerates_separators_inside_lines_and_missing_trailing_separator(tmp_path: Path) -> None:
    path = tmp_path / "raw.txt"
    path.write_text(
        "First story.\n<|endoftext|>\nSecond story.<|endoftext|>Third story.\n\n<|endoftext|>\n\nFourth story."
    )
    prepared = prepare(path, tmp_path / "cache", val_fraction=0.25)  # holds out the first of every 4
    assert prepared.val.tolist() == expected_stream(["First story."])
    assert prepared.train.tolist() == expected_stream(["Second story.", "Third story.", "Fourth story."])


def test_max_stories_takes_the_first_stories_and_has_its_own_cache_entry(tmp_path: Path) -> None:
    stories = make_stories(40, seed=3)
    path = write_raw_txt(tmp_path / "s.txt", stories)
    few = prepare(path, tmp_path / "cache", max_stories=20, val_fraction=0.1)
    assert few.meta["train_stories"] + few.meta["val_stories"] == 20
    assert few.train.tolist() == expected_stream([s for i, s in enumerate(stories[:20]) if i % 10])
    every = prepare(path, tmp_path / "cache", val_fraction=0.1)
    assert every.folder != few.folder and every.meta["train_stories"] == 36


def test_a_second_run_reuses_the_cache_and_a_changed_file_is_prepared_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write_raw_txt(tmp_path / "s.txt", make_stories(30))
    first = prepare(path, tmp_path / "cache")
    assert not first.reused

    def no_tokenizing(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(TOKENIZER, "encode_documents", no_tokenizing)
    second = prepare(path, tmp_path / "cache")
    assert second.reused and second.folder == first.folder
    assert second.train.tolist() == first.train.tolist()
    monkeypatch.undo()

    write_raw_txt(path, make_stories(31))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = prepare(path, tmp_path / "cache")
    assert not third.reused and third.folder != first.folder


def test_an_interrupted_preparation_never_looks_complete_and_the_next_run_recovers(tmp_path: Path) -> None:
    """A real process is killed (SIGKILL) in the middle of writing the cache."""
    stories = make_stories(1000, seed=5)
    path = write_raw_txt(tmp_path / "s.txt", stories)
    cache = tmp_path / "cache"
    script = f"""
import time, slm.data as data
from slm.tokenizer import load_tokenizer
data.ENCODE_CHUNK_CHARS = 20_000  # about a dozen chunks
tok = load_tokenizer()
real = tok.encode_documents
calls = []
def slow(texts, num_threads=8):
    calls.append(1)
    if len(calls) == 5:  # the third chunk's training stories
        print("HALFWAY", flush=True)
        time.sleep(60)
    return real(texts, num_threads=num_threads)
tok.encode_documents = slow
data.prepare_data(data.DataSpec({str(path)!r}), tok, {str(cache)!r}, progress=False)
"""
    proc = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "HALFWAY"
        key = cache_key(DataSpec(str(path)), TOKENIZER)
        partial = list(cache.glob(f".{key}.tmp-*"))
        assert partial and (partial[0] / "train.bin").stat().st_size > 0  # half-written tokens on disk
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert not (cache / key).exists()  # nothing under the real name

    prepared = prepare(path, cache)
    assert not prepared.reused
    assert prepared.train.tolist() + prepared.val.tolist() == (
        expected_stream([s for i, s in enumerate(stories) if i % 100])
        + expected_stream([s for i, s in enumerate(stories) if i % 100 == 0])
    )
    assert not list(cache.glob(f".{key}.tmp-*"))  # the leftover was cleaned up


def test_two_processes_preparing_the_same_text_at_once_both_succeed(tmp_path: Path) -> None:
    """A second run (the Train tab beside a train.py) starts while the first is still tokenizing: the
    second must not take the first's half-written folder for a leftover and delete it."""
    stories = make_stories(1000, seed=6)
    path = write_raw_txt(tmp_path / "s.txt", stories)
    cache, go = tmp_path / "cache", tmp_path / "go"
    script = f"""
import pathlib, time, slm.data as data
from slm.tokenizer import load_tokenizer
data.ENCODE_CHUNK_CHARS = 20_000
tok = load_tokenizer()
real = tok.encode_documents
calls = []
def paused(texts, num_threads=8):
    calls.append(1)
    if len(calls) == 5:
        print("HALFWAY", flush=True)
        deadline = time.monotonic() + 60
        while not pathlib.Path({str(go)!r}).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return real(texts, num_threads=num_threads)
tok.encode_documents = paused
prepared = data.prepare_data(data.DataSpec({str(path)!r}), tok, {str(cache)!r}, progress=False)
print("DONE", prepared.meta["train_tokens"], flush=True)
"""
    proc = subprocess.Popen([PYTHON, "-c", script], stdout=subprocess.PIPE, text=True, env=subprocess_env(), cwd=REPO)
    try:
        assert proc.stdout.readline().strip() == "HALFWAY"
        second = prepare(path, cache)  # runs to the end while the first is paused halfway
        go.touch()
        first_line = proc.stdout.readline().strip()
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    assert first_line == f"DONE {second.meta['train_tokens']}"
    again = prepare(path, cache)
    assert again.reused and again.train.tolist() == second.train.tolist()
    key = cache_key(DataSpec(str(path)), TOKENIZER)
    assert [p.name for p in cache.iterdir()] == [key]  # no staging folder left behind


def test_a_stop_request_during_preparation_caches_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slm.data

    monkeypatch.setattr(slm.data, "ENCODE_CHUNK_CHARS", 1000)
    path = write_raw_txt(tmp_path / "s.txt", make_stories(100))
    polls = []
    with pytest.raises(InterruptedError):
        prepare_data(DataSpec(str(path)), TOKENIZER, tmp_path / "cache", progress=False,
                     should_stop=lambda: polls.append(1) or len(polls) > 2)
    assert list((tmp_path / "cache").iterdir()) == []


# ----- errors ---------------------------------------------------------------------------------------
def test_a_missing_file_is_reported_as_such(tmp_path: Path) -> None:
    for name in (tmp_path / "nope.txt", "./nope", "data/stories.jsonl"):
        with pytest.raises(DataError, match="does not exist"):
            prepare(name, tmp_path / "cache")


def test_empty_data_and_unsupported_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n<|endoftext|>\n  \n")
    with pytest.raises(DataError, match="holds no text"):
        prepare(tmp_path / "empty.txt", tmp_path / "cache")
    (tmp_path / "one.txt").write_text("Only one story.")
    with pytest.raises(DataError, match="too few stories"):
        prepare(tmp_path / "one.txt", tmp_path / "cache")
    (tmp_path / "data.csv").write_text("text\nhello\n")
    with pytest.raises(DataError, match="unsupported"):
        prepare(tmp_path / "data.csv", tmp_path / "cache")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="holds no"):
        prepare(tmp_path / "folder", tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any(p.name[0] != "." for p in (tmp_path / "cache").iterdir())


def test_a_missing_text_field_names_the_fields_that_exist(tmp_path: Path) -> None:
    paths = write_all_formats(tmp_path / "data", make_stories(5))
    for name in ("jsonl", "json", "parquet"):
        with pytest.raises(DataError, match=r"no (field|column) 'story'.*'id'.*--text-field"):
            prepare(paths[name], tmp_path / "cache", text_field="story")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        prepare(bad, tmp_path / "cache")


def test_an_unreachable_hub_says_how_to_train_from_a_local_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for max_stories in (100, None):  # streamed and full download
        with pytest.raises(DataError) as info:
            next(iter_hub_stories("roneneldan/TinyStories", "train", max_stories))
        message = str(info.value)
        assert "roneneldan/TinyStories" in message and "--data path/to/TinyStories-train.txt" in message
    with pytest.raises(DataError, match="--data"):
        prepare_data(DataSpec("roneneldan/TinyStories", max_stories=10), TOKENIZER, "/nonexistent-cache")


# ----- batches ---------------------------------------------------------------------------------------
def test_windows_are_contiguous_reproducible_and_resumable() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    a = BatchSampler(tokens, batch_size=3, context_length=16, seed=11)
    x, y = a.next_batch()
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(3, 15, dtype=torch.long))  # one contiguous window
    state = a.state_dict()
    after = [a.next_batch()[0] for _ in range(3)]
    b = BatchSampler(tokens, batch_size=3, context_length=16, seed=11)
    assert torch.equal(b.next_batch()[0], x)
    resumed = BatchSampler(tokens, batch_size=3, context_length=16, seed=11)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch()[0], want) for want in after)
    assert not torch.equal(BatchSampler(tokens, 3, 16, seed=12).next_batch()[0], x)


def test_an_epoch_shows_every_window_once_and_the_next_epoch_cuts_them_elsewhere() -> None:
    tokens = np.arange(1000, dtype=np.uint16)
    sampler = BatchSampler(tokens, batch_size=4, context_length=16, seed=5)
    per_epoch = sampler.windows_per_epoch
    assert per_epoch == (1000 - 16) // 16
    firsts = torch.cat([sampler.next_batch()[0][:, 0] for _ in range(2 * per_epoch // 4 + 1)]).tolist()
    first_epoch, second_epoch = firsts[:per_epoch], firsts[per_epoch : 2 * per_epoch]
    # no text twice within an epoch: distinct, back-to-back windows that cover the split
    assert len(set(first_epoch)) == per_epoch
    assert {start % 16 for start in first_epoch} == {first_epoch[0] % 16}
    assert max(first_epoch) - min(first_epoch) == (per_epoch - 1) * 16
    assert len(set(second_epoch)) == per_epoch and set(second_epoch) != set(first_epoch)
    assert max(firsts) + 17 <= 1000


def test_ranks_draw_disjoint_slices_of_the_batch_one_process_would_draw() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    single = BatchSampler(tokens, batch_size=8, context_length=32, seed=3)
    ranks = [BatchSampler(tokens, batch_size=4, context_length=32, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        whole = single.next_batch()[0]
        parts = [s.next_batch()[0] for s in ranks]
        assert not torch.equal(parts[0], parts[1])
        assert torch.equal(torch.cat(parts), whole)


def test_eval_windows_are_fixed_and_short_splits_get_shorter_windows() -> None:
    tokens = np.arange(500, dtype=np.uint16)
    starts = eval_window_starts(tokens, batch_size=4, context_length=64, num_batches=3)
    assert len(starts) == 3 and all(len(s) == 4 for s in starts)
    flat = torch.cat(starts)
    assert flat.min() == 0 and flat.max() == 500 - 65 and torch.equal(flat, flat.sort().values)
    assert all(torch.equal(a, b) for a, b in zip(starts, eval_window_starts(tokens, 4, 64, 3), strict=True))
    short = BatchSampler(np.arange(20, dtype=np.uint16), batch_size=2, context_length=64, seed=0)
    assert short.length == 19 and short.next_batch()[0].shape == (2, 19)


@pytest.mark.skipif(not SHARED_STORIES.is_dir(), reason="shared TinyStories text not present")
def test_real_tinystories_text_has_one_eot_per_story(tmp_path: Path) -> None:
    source = SHARED_STORIES / "valid-first-1000.txt"
    prepared = prepare(source, tmp_path / "cache")
    eot = TOKENIZER.eot_id
    stories = prepared.meta["train_stories"] + prepared.meta["val_stories"]
    assert int((prepared.train == eot).sum() + (prepared.val == eot).sum()) == stories
    assert stories == source.read_text().count("<|endoftext|>") + 1  # the file ends without a separator
    assert prepared.train[-1] == eot and TOKENIZER.decode(prepared.train[:4].tolist()) != ""
