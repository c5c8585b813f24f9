"""`edge-agent top`: a live view of a running agent for someone on the gateway (over SSH).

It polls the agent's own health endpoint (`/status`, `/status/cameras`: the same source as
`edge-agent status`; the agent builds each at most once a second however many clients poll).
On a terminal it redraws in place with curses (q or Ctrl-C quits and restores the terminal;
keys change the camera sort); otherwise it prints plain snapshots, one per interval.
"""

from __future__ import annotations

import contextlib
import curses
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

from agent.cli.exitcodes import Exit
from agent.cli.topview import SORT_KEYS, Line, Sample, SortKey, ViewOptions, render

EXIT_OK, EXIT_NOT_READY, EXIT_UNREACHABLE = Exit.OK, Exit.NOT_READY, Exit.UNREACHABLE


@dataclass(frozen=True, slots=True)
class TopOptions:
    url: str
    interval_s: float = 2.0
    sort: SortKey = "problem"
    silent_s: float = 30.0
    once: bool = False
    iterations: int | None = None
    rows: int = 20  # cameras per snapshot in plain mode
    timeout_s: float = 5.0


def _get_json(url: str, timeout_s: float) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def fetch(url: str, timeout_s: float) -> Sample:
    """Both documents, or the reason the agent could not be read."""
    base = url.rstrip("/")
    try:
        status = _get_json(base + "/status", timeout_s)
    except (OSError, ValueError) as e:
        return Sample(at=time.monotonic(), error=str(getattr(e, "reason", e)))
    at = time.monotonic()
    try:
        cameras = _get_json(base + "/status/cameras", timeout_s)
    except (OSError, ValueError) as e:
        return Sample(at=at, status=status, error=f"/status/cameras: {getattr(e, 'reason', e)}")
    return Sample(at=at, status=status, cameras=cameras)


Fetch = Callable[[], Sample]
# Rates are averaged over this long (or two intervals, if longer): a 1 s delta of a document the
# agent rebuilds once a second is too jumpy to read.
RATE_WINDOW_S = 10.0


class History:
    """Recent good samples; the oldest within the rate window is the base for every rate."""

    def __init__(self, window_s: float) -> None:
        self._window_s = window_s
        self._samples: deque[Sample] = deque()

    def add(self, cur: Sample) -> Sample | None:
        """Record `cur`; the sample to measure its rates against (None: no rates yet)."""
        if cur.status is None:
            return None
        while self._samples and cur.at - self._samples[0].at > self._window_s:
            if len(self._samples) == 1:
                break  # the only base there is, even if old (a long interval)
            self._samples.popleft()
        base = self._samples[0] if self._samples else None
        self._samples.append(cur)
        return base


def run_top(opts: TopOptions, out: TextIO = sys.stdout) -> int:
    """The live view on a terminal, plain snapshots otherwise."""

    def poll() -> Sample:
        return fetch(opts.url, opts.timeout_s)

    if not opts.once and out.isatty():
        try:
            return curses.wrapper(_screen, poll, opts)
        except KeyboardInterrupt:  # Ctrl-C: curses.wrapper has restored the terminal
            return EXIT_OK
        except curses.error:  # no usable terminal description (TERM): plain lines instead
            pass
    return plain(poll, opts, out)


def plain(poll: Fetch, opts: TopOptions, out: TextIO) -> int:
    """Snapshots as plain lines, one every interval (`--once`: one, exit code like `status`)."""
    history = History(max(RATE_WINDOW_S, 2 * opts.interval_s))
    shown = 0
    try:
        while True:
            cur = poll()
            base = history.add(cur)
            view = ViewOptions(
                url=opts.url,
                interval_s=opts.interval_s,
                sort=opts.sort,
                silent_s=opts.silent_s,
                width=10_000,
                height=10_000,
                max_rows=opts.rows,
            )
            for text, _ in render(base, cur, view):
                print(text, file=out)
            print(file=out, flush=True)
            shown += 1
            if opts.once or (opts.iterations is not None and shown >= opts.iterations):
                return _exit_code(cur)
            time.sleep(max(0.0, cur.at + opts.interval_s - time.monotonic()))
    except KeyboardInterrupt:
        return EXIT_OK


def _exit_code(cur: Sample) -> int:
    if cur.status is None:
        return EXIT_UNREACHABLE
    return EXIT_OK if cur.status.get("ready") else EXIT_NOT_READY


_STYLES = {"": 0, "title": curses.A_BOLD, "problem": curses.A_BOLD, "head": curses.A_REVERSE}


def _screen(stdscr: curses.window, poll: Fetch, opts: TopOptions) -> int:
    """The curses loop: poll every interval, redraw on new data, a key or a resize."""
    with contextlib.suppress(curses.error):  # a terminal without an invisible cursor
        curses.curs_set(0)
    sort: SortKey = opts.sort
    history = History(max(RATE_WINDOW_S, 2 * opts.interval_s))
    cur = poll()
    base = history.add(cur)
    next_poll = cur.at + opts.interval_s
    shown = 1
    while True:
        _follow_terminal_size(stdscr)
        height, width = stdscr.getmaxyx()
        view = ViewOptions(
            url=opts.url,
            interval_s=opts.interval_s,
            sort=sort,
            silent_s=opts.silent_s,
            width=max(1, width - 1),
            height=height,
        )
        _draw(stdscr, render(base, cur, view), height)
        stdscr.timeout(max(1, int((next_poll - time.monotonic()) * 1000)))
        key = stdscr.getch()
        if key in (ord("q"), ord("Q")):
            return EXIT_OK
        if 0 <= key < 256 and chr(key) in SORT_KEYS:
            sort = SORT_KEYS[chr(key)]
        elif key == ord("s"):  # cycle through the sorts
            order = list(SORT_KEYS.values())
            sort = order[(order.index(sort) + 1) % len(order)]
        if time.monotonic() >= next_poll:
            if opts.iterations is not None and shown >= opts.iterations:
                return _exit_code(cur)
            cur = poll()
            base = history.add(cur)
            shown += 1
            next_poll = cur.at + opts.interval_s


def _follow_terminal_size(stdscr: curses.window) -> None:
    """Take the terminal's real size. ncurses learns of a resize from SIGWINCH, but a pane
    sized after the program started (tmux, some SSH clients) can leave it at terminfo's 80x24."""
    try:
        cols, lines = os.get_terminal_size(sys.stdout.fileno())
    except (OSError, ValueError):
        return
    if lines > 0 and cols > 0 and (lines, cols) != stdscr.getmaxyx():
        curses.resizeterm(lines, cols)


def _draw(stdscr: curses.window, lines: list[Line], height: int) -> None:
    stdscr.erase()
    for y, (text, style) in enumerate(lines[:height]):
        # The bottom-right cell raises: curses cannot move the cursor past it.
        with contextlib.suppress(curses.error):
            stdscr.addstr(y, 0, text, _STYLES.get(style, 0))
    stdscr.refresh()
