"""What a person sees when running the entry points: one progress display (Lightning's tqdm bar)
in training and evaluation, plain lines when the output is not a terminal, one final line per
bar, nothing glued to it, and no warning a user cannot act on."""
from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, run_folder

# a warning as Python prints it (path.py:123: ...), or any line that says warn / deprecated
WARNING_LINE = re.compile(r"warn|deprecat|\.py:\d+: ", re.IGNORECASE)
NOISE = ("litlogger", "💡", "v_num", "Sanity Checking", "Epoch 0")
TESTS = Path(__file__).resolve().parent


def person_env() -> dict[str, str]:
    """The environment of a person at a shell: W&B offline but not silenced (the suite silences it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "PYTHONWARNINGS")}
    env.update(WANDB_MODE="offline", SEEING_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO / "src"), str(TESTS), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def run_logged(script: str, args: list[str], cwd: Path, check: bool = True) -> str:
    """``python <script>.py <args>`` with stdout and stderr into one pipe, as in a CI log or a
    SLURM .out file (not a terminal); what it printed."""
    done = subprocess.run([sys.executable, str(REPO / f"{script}.py"), *args], cwd=cwd, env=person_env(),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
    out = done.stdout.decode(errors="replace")
    if check:
        assert done.returncode == 0, out[-4000:]
    return out


def run_in_terminal(script: str, args: list[str], cwd: Path) -> str:
    """The same in a pseudo-terminal (80 columns): the raw bytes the terminal received."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, str(REPO / f"{script}.py"), *args], cwd=cwd, env=person_env(),
                            stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert proc.wait(timeout=600) == 0, b"".join(chunks).decode(errors="replace")[-4000:]
    return b"".join(chunks).decode(errors="replace")


def screen(raw: str) -> list[str]:
    """What the terminal shows at the end: carriage returns, newlines, cursor up/down and
    erase-line applied; colours dropped."""
    rows, row, col = [""], 0, 0
    i = 0
    while i < len(raw):
        escape = re.match(r"\x1b\[([\d;?]*)([A-Za-z])", raw[i:])
        if escape:
            n = int((escape.group(1) or "1").split(";")[0] or 1)
            kind = escape.group(2)
            if kind == "A":
                row = max(0, row - n)
            elif kind == "B":
                row += n
            elif kind == "K":
                rows[row] = rows[row][:col]
            i += escape.end()
            rows.extend([""] * (row + 1 - len(rows)))
            continue
        c = raw[i]
        if c == "\r":
            col = 0
        elif c == "\n":
            row, col = row + 1, 0
            rows.extend([""] * (row + 1 - len(rows)))
        else:
            line = rows[row].ljust(col)
            rows[row] = line[:col] + c + line[col + 1:]
            col += 1
        i += 1
    return [r.rstrip() for r in rows]


def assert_nothing_to_ignore(lines: list[str]) -> None:
    bad = [line for line in lines if WARNING_LINE.search(line) or any(n in line for n in NOISE)]
    assert not bad, "\n".join(bad)


def progress_lines(lines: list[str], description: str) -> list[str]:
    return [line for line in lines if line.startswith(f"{description}: ")]


def rate(line: str) -> float:
    value, unit = re.search(r"([\d.]+)(it/s|s/it)", line).groups()
    return float(value) if unit == "it/s" else 1 / float(value)


def tiny_layer1(gen: Path, runs: Path) -> list[str]:
    return ["stage=layer1", f"model.checkpoint={gen}", "stage.batch_size=4", "stage.val_size=8", "stage.val_batch_size=4",
            "trainer.max_steps=20", f"paths.run_root={runs}"]


# ------------------------------------------------------------------------------ the bar itself
def test_a_bar_outside_a_terminal_writes_a_plain_line_every_tenth_and_one_final_line():
    from seeing.progress import Bar

    out = io.StringIO()  # not a terminal
    with Bar(total=50, desc="layer1 step", leave=True, stream=out, smoothing=0) as bar:
        for _ in range(50):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(" [")[0] for line in lines] == [f"layer1 step: {n}/50 ({2 * n}%)" for n in range(5, 51, 5)]
    # unknown total: a line every every_seconds, and the final one
    out = io.StringIO()
    with Bar(total=None, desc="tally", leave=True, stream=out, every_seconds=0.05) as bar:
        for _ in range(3):
            time.sleep(0.06)
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("tally: 3 [") and 2 <= len(lines) <= 3, lines
    # a transient bar (sanity check, validation during training) writes nothing to a log
    out = io.StringIO()
    with Bar(total=4, desc="Validation", leave=False, stream=out) as bar:
        bar.update(4)
    assert out.getvalue() == ""


def test_a_resumed_bar_rates_only_the_steps_of_this_run():
    from seeing.progress import Bar

    out = io.StringIO()
    with Bar(total=60, initial=50, desc="layer1 step", leave=True, stream=out, smoothing=0) as bar:
        time.sleep(0.1)
        bar.update(10)
    (line,) = out.getvalue().splitlines()
    assert line.startswith("layer1 step: 60/60 (100%)")
    assert rate(line) <= 10 / 0.1  # 10 steps in at least 0.1 s; counting the 50 resumed ones would give >= 500


def test_the_logging_interval_fits_a_short_run(compose):
    from seeing.stages.trainer import build_trainer

    class Planned:
        total_steps = 6

    cfg = compose("train", ["stage=reconstruct", "logger=csv"])  # the preset logs every 50 steps
    assert build_trainer(cfg, [], False, Planned()).log_every_n_steps == 6
    assert build_trainer(cfg, [], False).log_every_n_steps == 50  # no module: as configured
    layer = object()  # a stage that plans no steps of its own: trainer.max_steps is its budget
    long = compose("train", ["stage=layer1", "trainer.max_steps=100", "trainer.log_every_n_steps=10"])
    assert build_trainer(long, [], False, layer).log_every_n_steps == 10
    short = compose("train", ["stage=layer1", "trainer.max_steps=4", "trainer.log_every_n_steps=10"])
    assert build_trainer(short, [], False, layer).log_every_n_steps == 4


# ------------------------------------------------------------------------------ the entry points
@pytest.mark.slow
def test_training_in_a_log_prints_plain_progress_lines_and_resumes_counting_from_its_checkpoint(tiny_gan_files,
                                                                                                  tmp_path, capsys):
    from conftest import Interrupted, compose_config
    from seeing.pipeline import train

    gen, _ = tiny_gan_files
    args = [*tiny_layer1(gen, tmp_path / "runs"), "ckpt_path=last", "callbacks.checkpoint.every_n_train_steps=10"]
    with pytest.raises(Interrupted):  # cut off in this process (pytest's stderr is not a terminal either)
        train(compose_config("train", [*args, "+callbacks.interrupt={_target_: conftest.InterruptAt, step: 10}"]))
    lines = progress_lines(capsys.readouterr().err.splitlines(), "layer1 step")
    assert lines[-1].startswith("layer1 step: 10/20 (50%)"), lines  # the last line before the cut shows it
    out = run_logged("train", args, tmp_path)  # resumed by the entry point, as a person would
    assert "\r" not in out  # no redrawn frames in a log
    lines = out.splitlines()
    assert_nothing_to_ignore(lines)
    shown = progress_lines(lines, "layer1 step")
    # from the checkpoint's step 10 to 20: a line every 10 % of the budget, the last one the final line
    assert [line.split(" [")[0] for line in shown] == [f"layer1 step: {n}/20 ({5 * n}%)" for n in range(12, 21, 2)]
    assert rate(shown[-1]) < 10_000  # the resumed steps are not counted as done in no time (was 382691 it/s)
    # Lightning's reason for stopping comes after the final line, on its own line
    assert lines.index(shown[-1]) < next(i for i, line in enumerate(lines) if "`Trainer.fit` stopped" in line)
    assert (run_folder(tmp_path / "runs" / "scenes_progan-tiny_progan", "layer1") / "layer1.pt").is_file()


@pytest.mark.slow
def test_training_in_a_terminal_leaves_one_final_bar_line(tiny_gan_files, tmp_path):
    gen, _ = tiny_gan_files
    shown = screen(run_in_terminal("train", [*tiny_layer1(gen, tmp_path / "runs"), "trainer.val_check_interval=10",
                                            "logger=csv"],
                                   tmp_path))
    assert_nothing_to_ignore(shown)
    bars = [line for line in shown if "step:" in line]
    assert len(bars) == 1 and re.match(r"layer1 step: 100%\|█+\| 20/20 \[", bars[0]), "\n".join(shown)
    assert "`Trainer.fit` stopped" in shown[shown.index(bars[0]) + 1]  # the next line, not glued
    assert sum("`Trainer.fit` stopped" in line for line in shown) == 1, "\n".join(shown)  # and only once


@pytest.mark.slow
def test_the_gan_stage_counts_to_its_step_budget(tmp_path):
    out = run_logged("train", ["stage=gan", "model.z_dim=8", "model.widths=[8,8]", "data.resolution=8",
                               "data.batch_size=4", "data.train_length=64", "trainer.max_steps=4", "stage.sample_every=0",
                               "callbacks.checkpoint.every_n_train_steps=2",
                               "logger=csv", f"paths.run_root={tmp_path / 'runs'}"], tmp_path)
    lines = out.splitlines()
    assert_nothing_to_ignore(lines)
    shown = progress_lines(lines, "gan step")
    assert shown[-1].startswith("gan step: 4/4 (100%)") and sum("4/4" in line for line in shown) == 1, out


@pytest.mark.slow
def test_evaluation_shows_the_same_bar_for_its_tallies_and_its_reconstruction(tmp_path):
    runs = ["logger=csv", f"paths.run_root={tmp_path / 'runs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    out = run_logged("evaluate", ["metric=fsd", "metric.n=20", "metric.batch_size=10", *runs], tmp_path)
    lines = out.splitlines()
    assert_nothing_to_ignore(lines)
    assert "━" not in out  # no other library's bars
    for side in ("real: scenes", "fake: scenes_progan", "real (2nd sample): scenes"):
        finals = [line for line in progress_lines(lines, side) if line.startswith(f"{side}: 20/20 (100%)")]
        assert len(finals) == 1, out
    # the reconstruction runs the reconstruct stage through Lightning with the frozen generator and loss
    out = run_logged("evaluate", ["metric=reconstruction", "stage.steps=5", "stage.targets.count=2", "metric.fsd_report=null",
                                  *runs], tmp_path)
    lines = out.splitlines()
    assert_nothing_to_ignore(lines)
    shown = progress_lines(lines, "reconstruct_real_f step")
    assert shown[-1].startswith("reconstruct_real_f step: 5/5 (100%)") and len(shown) == 5, out
