"""What a person sees while stages run: plain progress lines in logs (a line when the count changed, at
most every 10 s, never the same line twice), a live rich bar on a terminal, and no third-party progress
bars or notices (FFCV's writer, Ray's token-authentication notice) while real warnings still show."""

from __future__ import annotations

import io
import logging

import numpy as np

from pipeline.progress import Progress


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_when_the_count_changes_at_most_every_10_s_never_twice():
    clock, out = Clock(), io.StringIO()
    progress = Progress("fit", 100, unit="targets", live=False, stream=out, clock=clock)
    progress.update(0)  # the first line says what is coming
    for t, done in [(2, 0), (4, 0), (6, 10), (8, 20), (12, 20), (14, 20), (30, 20), (31, 50), (45, 50), (60, 50)]:
        clock.now = 1000.0 + t
        progress.update(done)
    clock.now = 1000.0 + 70
    progress.update(100)
    progress.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "fit: 0/100 targets, 0.00 targets/s, ETA ?, elapsed 0s",
        "fit: 20/100 targets, 1.67 targets/s, ETA 48s, elapsed 12s",  # 10 s after the first; changed at 6 s
        "fit: 50/100 targets, 1.61 targets/s, ETA 31s, elapsed 31s",
        "fit: 100/100 targets, 1.43 targets/s, ETA 0s, elapsed 1m10s",
        "fit: 100/100 targets in 1m10s",
    ]
    assert len(set(lines)) == len(lines)


def test_a_stalled_count_prints_nothing_however_long_it_waits():
    clock, out = Clock(), io.StringIO()
    progress = Progress("train", 64, live=False, stream=out, clock=clock)
    for t in range(0, 600, 2):  # run_tasks wakes every 2 s
        clock.now = 1000.0 + t
        progress.update(0)
    assert out.getvalue().splitlines() == ["train: 0/64 models, 0.00 models/s, ETA ?, elapsed 0s"]


def test_a_live_bar_on_a_terminal_shows_done_total_rate_eta_and_elapsed():
    from rich.console import Console

    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    progress = Progress("unlearn", 10, live=True, console=console)
    progress.update(3)
    progress._bar.refresh()
    drawn = screen.getvalue()
    assert "unlearn" in drawn and "3/10" in drawn and "models" in drawn and "ETA" in drawn and "elapsed" in drawn
    progress.update(10)
    progress.close()
    assert screen.getvalue().rstrip().endswith("unlearn: 10/10 models in 0s")


def test_writing_a_beton_draws_no_progress_bar(tmp_path, capfd):
    from pipeline.data.beton import read_beton, write_beton

    images = np.arange(40 * 3 * 4 * 4, dtype=np.uint8).reshape(40, 3, 4, 4)
    labels = np.arange(40) % 10
    write_beton(tmp_path / "x.beton", images, labels)
    out, err = capfd.readouterr()
    assert out == "" and err == "", (out, err)
    got_x, got_y = read_beton(tmp_path / "x.beton")
    assert np.array_equal(got_x, images) and np.array_equal(got_y, labels)


def test_rays_token_notice_is_dropped_and_its_other_warnings_are_not():
    from pipeline.execution import _RAY_NOTICES, _quiet_ray_notices

    _quiet_ray_notices()
    _quiet_ray_notices()  # idempotent: one filter
    (name,) = _RAY_NOTICES
    logger = logging.getLogger(name)
    assert len(logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # wherever Ray's handlers send them
    logger.addHandler(handler)
    try:
        logger.warning("Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled ...")
        logger.warning("Token authentication is disabled for this Ray cluster. Anyone with network access ...")
    finally:
        logger.removeHandler(handler)
    assert seen == ["Token authentication is disabled for this Ray cluster. Anyone with network access ..."]
