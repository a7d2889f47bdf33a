"""Hostile and careless files, round 3: locks, long names, spreadsheet cells, a full disk.

One test per defect of issue 26 (files and locks); each was watched failing on the
code before its fix.  Runs go through `Pipeline.run` or the CLI in a subprocess, on
small slides the tests write; locks are written by hand as a crashed run leaves them.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from slide2vec_dask import ExecutionOptions, Pipeline, PreprocessingConfig, read_manifest, testing
from slide2vec_dask.store.output_dir import LOCK_NAME, OutputDirLocked, RunEnvironmentError

EXACT = {"segmentation": {"mthresh": 0}, "tissue_threshold": 0.5}
TIMM = "vit_tiny_patch16_224"


def cli(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "slide2vec_dask.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def run(model, out: Path, slides: list[dict], **options) -> object:
    return Pipeline(model, PreprocessingConfig(**EXACT), ExecutionOptions(output_dir=out, **options)).run(
        slides=slides)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile_files")
    return testing.write_svs(folder / "a.svs", testing.tissue_image(896, 896, [(224, 224, 672, 672)], seed=1),
                             downsamples=(1, 4))


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)


def write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead_pid(), "started": "earlier",
                                "token": "crashed", **fields}))
    return lock


# -- 1. two runs restarting after a crash: exactly one takes the stale lock over ---------------------
RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from slide2vec_dask.store.output_dir import OutputDirLocked, RunLock
    out, me, pause = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    judge = RunLock._stale
    def slow(self, *args, **kwargs):      # judged stale now, acted on `pause` seconds later
        verdict = judge(self, *args, **kwargs)
        time.sleep(pause)
        return verdict
    RunLock._stale = slow
    (out / f"ready.{me}").touch()
    while len(list(out.glob("ready.*"))) < 2:
        time.sleep(0.005)
    try:
        with RunLock(out):
            print("acquired", flush=True)
            time.sleep(1.5)
    except OutputDirLocked as exc:
        print("locked:", exc, flush=True)
""")


def test_two_runs_taking_over_one_stale_lock_exactly_one_wins(tmp_path):
    """Both judge the crashed run's lock stale; the later must not rename away the earlier's new lock."""
    write_lock(tmp_path)
    script = tmp_path / "racer.py"
    script.write_text(RACER)
    racers = [subprocess.Popen([sys.executable, str(script), str(tmp_path), name, pause], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for name, pause in (("a", "0.5"), ("b", "0.8"))]
    said = [r.communicate(timeout=120) for r in racers]
    outcomes = sorted(out.split(" ")[0].strip() for out, _ in said)
    assert outcomes == ["acquired", "locked:"], said
    loser = next(out for out, _ in said if out.startswith("locked"))
    winner = next(r for r, (out, _) in zip(racers, said) if out.startswith("acquired"))
    assert f"pid {winner.pid} on" in loser
    assert not (tmp_path / LOCK_NAME).exists() and not list(tmp_path.glob(f"{LOCK_NAME}.*"))


# -- 2. locks that are not a run's lock; a pid that another process now has -------------------------
@pytest.mark.parametrize("content, why", [
    ("", "it is empty"),
    ("garbage{", "not JSON"),
    ("[1, 2]", "not a run's lock"),
    (json.dumps({"host": "h", "pid": 99999999999999999999999, "started": "x", "token": "t"}), "not a run's lock"),
    (json.dumps({"host": "h", "pid": "12", "started": "x", "token": "t"}), "not a run's lock"),
    (None, "a folder"),
])
def test_an_unreadable_lock_is_reported_as_such(tiny, slide, tmp_path, content, why):
    """Not a run's lock: said at once with what to do, not "pid None on None" for 5 minutes."""
    out = tmp_path / "run"
    out.mkdir()
    lock = out / LOCK_NAME
    if content is None:
        lock.mkdir()
    else:
        lock.write_text(content)
    old = time.time() - 60
    os.utime(lock, (old, old))
    start = time.monotonic()
    with pytest.raises(OutputDirLocked) as caught:
        run(tiny, out, [{"sample_id": "a", "image_path": slide}])
    message = str(caught.value)
    assert "cannot be read as a run's lock" in message and why in message and str(lock) in message
    assert "remove it" in message and "pid None" not in message
    assert time.monotonic() - start < 10


def test_a_lock_with_an_impossible_pid_exits_3_without_a_traceback(slide, tmp_path):
    """os.kill(10**23, 0) raises OverflowError: the pid must be checked before it is used."""
    (tmp_path / "slides.csv").write_text(f"sample_id,image_path\na,{slide}\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"manifest": "slides.csv", "model": {"timm": TIMM},
                                      "preprocessing": EXACT, "execution": {"output_dir": "out"}}))
    write_lock(tmp_path / "out", pid=99999999999999999999999)
    result = cli("run", config)
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr and "cannot be read as a run's lock" in result.stderr


def test_a_lock_whose_pid_now_belongs_to_another_process_is_stale(tiny, slide, tmp_path, caplog):
    """After a container restart the crashed run's pid may be reused: its start time tells them apart."""
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        an_hour_ago = (dt.datetime.now().astimezone() - dt.timedelta(hours=1)).isoformat(timespec="seconds")
        write_lock(tmp_path / "run", pid=stranger.pid, started=an_hour_ago)
        with caplog.at_level(logging.WARNING, logger="slide2vec_dask"):
            result = run(tiny, tmp_path / "run", [{"sample_id": "a", "image_path": slide}])
        assert result.outcomes[0].status == "success"
        assert any("took over a stale lock" in r.getMessage() and str(stranger.pid) in r.getMessage()
                   for r in caplog.records)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_a_live_run_of_this_host_still_holds_its_lock(tiny, slide, tmp_path):
    """The start-time check must not take a lock from the run that wrote it."""
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    holder = subprocess.Popen(["sleep", "60"])
    try:
        write_lock(tmp_path / "run", pid=holder.pid, started=now)
        with pytest.raises(OutputDirLocked, match=f"in use by another run: pid {holder.pid}"):
            run(tiny, tmp_path / "run", [{"sample_id": "a", "image_path": slide}])
    finally:
        holder.kill()
        holder.wait()


# -- 3. the longest id on a host with a long name --------------------------------------------------
LONG_HOST_RUN = textwrap.dedent("""
    import socket, sys
    socket.gethostname = lambda: "gpu-node-0042.cluster.hpc.example-university.org-" + "k8s-pod-abcdef" * 4
    from slide2vec_dask import ExecutionOptions, Model, Pipeline, PreprocessingConfig
    model = Model.from_timm("vit_tiny_patch16_224", checkpoint_path=sys.argv[1])
    for attempt in range(2):
        result = Pipeline(model, PreprocessingConfig(segmentation={"mthresh": 0}, tissue_threshold=0.5),
                          ExecutionOptions(output_dir=sys.argv[2], output_format="pt")).run(
            slides=[{"sample_id": "s" * 200, "image_path": sys.argv[3]}])
        print(result.outcomes[0].status, result.outcomes[0].error)
""")


def test_the_longest_id_is_exported_on_a_host_with_a_long_name(vit_tiny_checkpoint, slide, tmp_path):
    """An allowed 200-character id on an HPC node or a pod: every temporary must fit 255 bytes, every run."""
    script = tmp_path / "long_host.py"
    script.write_text(LONG_HOST_RUN)
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, str(script), str(vit_tiny_checkpoint), str(out), str(slide)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("success") and lines[1].startswith(("success", "skipped")), done.stdout
    sid = "s" * 200
    assert (out / "tile_embeddings" / f"{sid}.pt").is_file()
    assert (out / "tile_embeddings" / f".{sid}.pt.source.json").is_file()
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


# -- 4. cells a spreadsheet would run ----------------------------------------------------------------
def test_ids_starting_with_a_dash_are_refused(tmp_path):
    """A leading '-' is a formula to a spreadsheet and an option to a command line."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("sample_id,image_path\n-2-3,a.svs\n")
    with pytest.raises(ValueError, match=r"m.csv:2: sample_id .-2-3. starts with '-'.*spreadsheet"):
        read_manifest(manifest)
    manifest.write_text("sample_id,image_path,patient_id\nok,a.svs,-p1\n")
    with pytest.raises(ValueError, match="m.csv:2: patient_id '-p1' starts with '-'"):
        read_manifest(manifest)


def test_process_list_cells_are_never_formulas(tiny, slide, tmp_path, monkeypatch):
    """Paths come from the manifest; a cell starting with = + - @ tab CR runs when the CSV is opened."""
    monkeypatch.chdir(tmp_path)
    evil = "=cmd|' /C calc'!A0"
    Path(evil).parent.mkdir()             # (the path holds a "/": a folder "=cmd|' ", a file "C calc'!A0")
    Path(evil).write_text("not a slide")
    out = tmp_path / "run"
    result = run(tiny, out, [{"sample_id": "evil", "image_path": evil, "mask_path": "@SUM(1+1)"},
                             {"sample_id": "good", "image_path": slide}])
    assert {o.sample_id: o.status for o in result.outcomes} == {"evil": "failed", "good": "success"}
    with (out / "process_list.csv").open(newline="") as f:
        rows = {r["sample_id"]: r for r in csv.DictReader(f)}
    assert rows["evil"]["image_path"] == "'" + evil and rows["evil"]["mask_path"] == "'@SUM(1+1)"
    for row in rows.values():
        assert not any(cell.startswith(("=", "+", "-", "@", "\t", "\r")) for cell in row.values()), row


# -- 5. a full disk says so --------------------------------------------------------------------------
def test_a_full_disk_is_named_without_errno_none(tiny, slide, tmp_path):
    """The error a user reads says the folder and "no space left on the device", not "[Errno None]"."""
    nearly = tmp_path / "nearly"
    nearly.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "none", str(nearly)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root with mount (a tiny tmpfs plays the full disk)")
    try:
        try:
            result = run(tiny, nearly / "out", [{"sample_id": "a", "image_path": slide}])
            message = result.outcomes[0].error
        except (OSError, RunEnvironmentError) as exc:   # (the run's own files could not be written)
            message = str(exc)
        assert "no space left on the device" in message and str(nearly / "out") in message, message
        assert "[Errno" not in message, message
    finally:
        subprocess.run(["umount", str(nearly)], capture_output=True)
