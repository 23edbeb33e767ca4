"""Bad input that used to crash or hang a command: decompression bombs, FIFOs and devices named
as data, numbers past any range, NaN/Infinity (not JSON), compiler-deep verifiers, deep or huge
JSON in world files, a corpus without its episodes folder. Each is a clear error naming the file
(and line and field), in bounded time, with no traceback and nothing written."""

import gzip
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from echo_jax.awm.world_format import WorldFormatError, load_worlds
from echo_jax.config import DataConfig
from echo_jax.data import corpus, data_cache
from echo_jax.data.check_data import MAX_LISTED_ERRORS, check
from echo_jax.data.episode_files import SkipReport, load_episodes
from echo_jax.data.episodes import EpisodeError
from tests.cli import run_module
from tests.test_data import small_episode

ROOT = Path(__file__).parents[1]
WORLDS = ROOT / "tests" / "awm" / "fixtures" / "tiny_world"


@pytest.fixture(scope="module")
def lines_bomb(tmp_path_factory) -> Path:
    """39 KB of gzip that inflates to 20,000,000 lines of `1` (40 MB), as in the issue."""
    path = tmp_path_factory.mktemp("bomb") / "eps.jsonl.gz"
    path.write_bytes(gzip.compress(b"1\n" * 20_000_000, 6))
    return path


def test_check_data_on_a_lines_bomb_stops_in_bounded_time_and_memory(lines_bomb):
    started = time.monotonic()
    report = check([str(lines_bomb)])
    assert time.monotonic() - started < 20
    assert len(report.errors) == MAX_LISTED_ERRORS + 1
    assert report.errors[0] == f"{lines_bomb}:1: field '<episode>': expected a JSON object, got int"
    assert report.errors[-1] == "stopped after 1,000 problems; the rest is not checked"


def test_skip_invalid_on_a_lines_bomb_keeps_a_bounded_report(lines_bomb):
    report = SkipReport()
    assert load_episodes([str(lines_bomb)], skip_invalid=True, report=report) == []
    assert report.n_skipped == 1_000_001 and len(report.skipped) == SkipReport.MAX_KEPT
    assert report.summary() == (
        "loaded 0 episodes, skipped 1000001 invalid: 1000000 x field '<episode>': expected a "
        f"JSON object, got int (first: {lines_bomb}:1); 1 x field '<file>': more than 1,000,000 "
        f"lines (first: {lines_bomb})"
    )


def test_blank_lines_bomb_is_refused_after_a_million_lines(tmp_path):
    path = tmp_path / "eps.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n" * 1_500_000, 9))  # 1.5 MB of newlines in ~1.5 KB
    started = time.monotonic()
    with pytest.raises(EpisodeError) as err:
        load_episodes([str(path)])
    assert time.monotonic() - started < 20
    assert str(err.value).startswith(
        f"{path}: field '<file>': more than 1,000,000 lines (limits: 1,000,000 lines a file; "
        "a .gz file at most 250 x its size or 64 MiB); refused"
    )


def test_bytes_bomb_is_refused_by_its_inflated_size(tmp_path):
    path = tmp_path / "eps.jsonl.gz"
    path.write_bytes(gzip.compress(b"a" * (100 << 20), 9))  # 100 MiB, no newline, ~100 KB
    assert path.stat().st_size * 250 < 64 << 20  # So the 64 MiB floor is the limit here.
    with pytest.raises(EpisodeError) as err:
        load_episodes([str(path)])
    assert f"{path}: field '<file>': decompresses to more than {64 << 20:,} bytes" in str(err.value)


def test_fifo_and_device_named_as_data_are_refused_not_read(tmp_path):
    fifo = tmp_path / "eps.jsonl"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    for path, kind in ((fifo, "a FIFO"), (zero, "a device")):
        message = f"{path}: field '<file>': not a regular file ({kind}); refused"
        with pytest.raises(EpisodeError, match="not a regular file") as err:
            load_episodes([str(path)])
        assert str(err.value) == message
        with pytest.raises(EpisodeError, match="not a regular file"):
            data_cache.input_files(DataConfig(paths=(str(path),)))  # The cache's hash, too.
    # The train CLI used to hang forever here, in the cache's content hash.
    proc = run_module("experiments.train", f"--data={fifo}", f"--workdir={tmp_path / 'w'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"error: {fifo}: field '<file>': not a regular file (a FIFO); refused" in proc.stderr
    assert not (tmp_path / "w").exists()


def _raw_episode_line(**replacements: str) -> bytes:
    """small_episode's JSON with some values replaced by raw JSON text (e.g. NaN, 10**400)."""
    record = small_episode(metadata={"score": "@score@"}, reward="@reward@", task_idx="@task_idx@")
    record["steps"][0]["action"]["arguments"]["x"] = "@x@"
    text = json.dumps(record)
    values = {"score": "1", "reward": "1", "task_idx": "0", "x": "2"} | replacements
    for key, value in values.items():
        text = text.replace(f'"@{key}@"', value)
    return (text + "\n").encode()


NUMBERS = [
    ("reward_400_digits", {"reward": "1" + "0" * 400}, "reward", "out of range: an integer of"),
    ("task_idx_2_63", {"task_idx": str(2**63)}, "task_idx", f"out of range: {2**63}"),
    ("nan_argument", {"x": "NaN"}, "steps[0].action.arguments.x", "not finite: nan (not JSON)"),
    ("infinity_metadata", {"score": "Infinity"}, "metadata.score", "not finite: inf (not JSON)"),
    ("minus_infinity", {"x": "-Infinity"}, "steps[0].action.arguments.x", "not finite: -inf"),
]


@pytest.mark.parametrize(
    "replacements, field, problem", [c[1:] for c in NUMBERS], ids=[c[0] for c in NUMBERS]
)
def test_numbers_out_of_range_or_not_json_name_the_field(tmp_path, replacements, field, problem):
    path = tmp_path / "eps.jsonl"
    path.write_bytes(_raw_episode_line() + _raw_episode_line(**replacements))
    assert len(load_episodes([str(path)][:1], skip_invalid=True)) == 1  # Line 1 is fine.
    with pytest.raises(EpisodeError) as err:
        load_episodes([str(path)])
    assert str(err.value).startswith(f"{path}:2: field '{field}': {problem}"), str(err.value)


def _world_copy(tmp_path) -> Path:
    folder = tmp_path / "worlds"
    shutil.copytree(WORLDS, folder)
    return folder


def _edit_line(path: Path, index: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[index] = text
    path.write_text("\n".join(lines) + "\n")


def test_verifier_too_deep_to_compile_is_a_listed_error(tmp_path):
    folder = _world_copy(tmp_path)
    verifiers = folder / "gen_verifier.pure_code.jsonl"
    records = [json.loads(line) for line in verifiers.read_text().splitlines()]
    records[0]["verification"]["code"] = (
        "def verify_task_completion(a, b):\n    return " + " + ".join(["1"] * 200_000) + "\n"
    )
    verifiers.write_text("".join(json.dumps(r) + "\n" for r in records))
    report = check([str(folder)])
    assert report.errors == [
        f"{folder}/gen_verifier.pure_code.jsonl: scenario 'tiny_shop': task_idx 0 "
        "verification.code does not compile (RecursionError: nested too deeply for the compiler)"
    ]


@pytest.mark.parametrize(
    "text, problem",
    [
        ("[" * 100_000 + "]" * 100_000, "invalid JSON: nested too deeply"),
        ('{"name": ' + "7" * 5000 + "}", "invalid JSON: Exceeds the limit (4300 digits)"),
    ],
    ids=["100k_deep", "5000_digits"],
)
def test_deep_or_huge_json_in_a_world_file_names_file_and_line(tmp_path, text, problem):
    folder = _world_copy(tmp_path)
    _edit_line(folder / "gen_scenario.jsonl", 1, text)
    with pytest.raises(WorldFormatError) as err:
        load_worlds(folder)
    assert str(err.value).startswith(f"gen_scenario.jsonl:2: {problem}"), str(err.value)
    assert check([str(folder)]).errors[0].startswith(f"{folder}/gen_scenario.jsonl:2: {problem}")


def test_fifo_in_a_world_folder_is_refused_not_read(tmp_path):
    folder = _world_copy(tmp_path)
    (folder / "gen_tasks.jsonl").unlink()
    os.mkfifo(folder / "gen_tasks.jsonl")
    with pytest.raises(WorldFormatError, match=r"^gen_tasks\.jsonl: not a regular file in .*"):
        load_worlds(folder)


def test_corpus_without_an_episodes_folder(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "manifest.json").write_text(json.dumps({"splits": {}}))
    episodes = folder / "episodes"
    message = f"{episodes}: field '<folder>': missing: a corpus keeps its shards in episodes/"
    assert check([str(folder)]).errors == [message]
    episodes.write_text("not a folder")
    with pytest.raises(EpisodeError) as err:
        corpus.shard_files(str(folder))
    assert str(err.value) == message.replace("missing", "not a folder")


def test_check_data_cli_refuses_all_of_them_without_a_traceback(tmp_path, lines_bomb):
    folder = _world_copy(tmp_path)
    _edit_line(folder / "gen_scenario.jsonl", 1, "[" * 100_000 + "]" * 100_000)
    empty_corpus = tmp_path / "corpus"
    empty_corpus.mkdir()
    (empty_corpus / "manifest.json").write_text(json.dumps({"splits": {}}))
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    before = sorted(os.listdir(tmp_path))
    proc = run_module(
        "experiments.check_data", str(lines_bomb), str(folder), str(empty_corpus), str(fifo)
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "nested too deeply" in proc.stdout and "stopped after 1,000 problems" in proc.stdout
    assert "episodes: field '<folder>': missing" in proc.stdout
    assert sorted(os.listdir(tmp_path)) == before  # Nothing written.
