"""The console a person reads: mtorl's own lines, one progress display per long stage, a summary.

Quiet by default: once a command starts Ray, everything Ray, Ray Data, Train, Tune and Serve write in
this process (Python loggers, warnings, the raylet's pushed errors, C++ glog lines) goes to
``mtorl-driver.log`` in the Ray session's logs folder, whose path is printed once; the workers'
output stays in their own log files there (``ray.init(log_to_driver=False)``). ``-v/--verbose``, or
``MTORL_LOG_LEVEL=INFO|DEBUG|WARNING``, gives Ray the console back (``log_to_driver=True``, Tune's
status tables).

Progress uses tqdm: a bar on a terminal; on anything else (a file, a pipe, ``ray job logs``) one plain
line per step, formatted by tqdm's ``format_meter`` and free of control characters.

Nothing here runs at import time; :func:`session` sets the console up for one command.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, TextIO

LOG_LEVEL_ENV = "MTORL_LOG_LEVEL"
DRIVER_LOG = "mtorl-driver.log"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


def ray_log_level(verbose: bool = False) -> str | None:
    """The level Ray's own output shows at on the console, or None for quiet (the default)."""
    env = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if env in LEVELS:
        return env
    return "INFO" if verbose else None


class Console:
    """mtorl's lines on ``stream``; callable like ``print`` so it goes wherever a ``progress`` callback goes."""

    def __init__(self, stream: TextIO | None = None, verbose: bool = False, tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.verbose = verbose
        self.tty = self.stream.isatty() if tty is None else tty
        self.ray_logs: str | None = None  # the Ray session's logs folder, once Ray is up
        self.redirect = False  # whether a quiet session may move fd 1/2 into the log file
        self._bars = 0
        self._lock = threading.Lock()
        # Off a terminal, at most this many plain lines per progress display (evenly spaced, the last
        # always shown); None = one per update. The demo sets it to keep its whole output short.
        self.plain_lines: int | None = None

    def __call__(self, msg: str = "") -> None:
        with self._lock:
            if self.tty and self._bars:
                from tqdm import tqdm

                tqdm.write(str(msg), file=self.stream)
            else:
                self.stream.write(f"{msg}\n")
            self.stream.flush()

    @contextlib.contextmanager
    def stage(self, title: str) -> Iterator[None]:
        """One line when the stage starts and one when it ends, with its wall time."""
        self(f"== {title}")
        t0 = time.time()
        try:
            yield
        except BaseException:
            self(f"-- {title}: failed after {time.time() - t0:.1f} s")
            raise
        self(f"-- {title}: done in {time.time() - t0:.1f} s")

    def progress(self, total: int | None, desc: str, unit: str = "it") -> Progress:
        return Progress(self, total, desc, unit)


class Progress:
    """tqdm on a terminal; one plain line per ``update`` elsewhere (same fields: count, elapsed, ETA)."""

    def __init__(self, console: Console, total: int | None, desc: str, unit: str) -> None:
        self.console, self.total, self.desc, self.unit = console, total, desc, unit
        self.n, self.t0 = 0, time.time()
        self.bar: Any = None
        if console.tty:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=console.stream, leave=True, dynamic_ncols=True)
            console._bars += 1

    def update(self, n: int = 1, postfix: str = "", eta_s: float | None = None) -> None:
        """Advance by ``n``; ``eta_s``: the caller's own estimate of the time left (else tqdm's, from the rate)."""
        self.n += n
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        cap = self.console.plain_lines
        if cap and self.total and self.n < self.total and self.n % -(-self.total // cap):
            return  # off a terminal with a line budget: only every ceil(total / cap)-th update, and the last
        from tqdm import tqdm

        fmt = (
            LINE_FORMAT if eta_s is None else LINE_FORMAT.replace("{remaining}", tqdm.format_interval(max(0.0, eta_s)))
        )
        self.console(
            tqdm.format_meter(
                self.n,
                self.total,
                time.time() - self.t0,
                prefix=self.desc,
                unit=self.unit,
                postfix=postfix or None,
                bar_format=fmt,
            )
        )

    def note(self, msg: str) -> None:
        """A line that doesn't advance the count (printed above the bar on a terminal)."""
        self.console(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            self.console._bars -= 1

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def as_console(progress: Callable[[str], None] | Console | None) -> Console:
    """The console behind a ``progress`` callback: itself, the session's, or a wrapper that prints
    plain lines through the callback (tests pass ``lambda *_: None``)."""
    if isinstance(progress, Console):
        return progress
    if progress is None or progress is print:
        return _CURRENT or Console()
    return Console(_CallbackStream(progress), tty=False)


class _CallbackStream:
    def __init__(self, fn: Callable[[str], None]) -> None:
        self.fn = fn

    def write(self, s: str) -> None:
        if s.strip():
            self.fn(s.rstrip("\n"))

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


_CURRENT: Console | None = None


def current() -> Console | None:
    """The console of the running command (None outside a :func:`session`)."""
    return _CURRENT


def say(msg: str = "") -> None:
    """A line on the command's console (plain ``print`` outside a session)."""
    if _CURRENT is not None:
        _CURRENT(msg)
    else:
        print(msg, flush=True)


class _Redirect:
    """This process's stdout/stderr (file descriptors 1 and 2) into a log file, and back."""

    def __init__(self) -> None:
        self.saved: tuple[int, int] | None = None
        self.path: str | None = None

    def start(self, path: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if self.saved is None:
            self.saved = (os.dup(1), os.dup(2))
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.path = path

    def move(self, path: str) -> None:
        """Continue in ``path``, carrying over what was written so far."""
        old = self.path
        if old is None or old == path:
            return self.start(path)
        sys.stdout.flush()
        sys.stderr.flush()
        with contextlib.suppress(OSError), open(old, "rb") as f, open(path, "ab") as g:
            g.write(f.read())
        self.start(path)
        with contextlib.suppress(OSError):
            os.unlink(old)

    def stop(self) -> None:
        if self.saved is None:
            return
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(self.saved[0], 1)
        os.dup2(self.saved[1], 2)
        os.close(self.saved[0])
        os.close(self.saved[1])
        self.saved = None


_REDIRECT = _Redirect()


def ray_init_kwargs() -> dict[str, Any]:
    """``ray.init`` arguments for the current console: worker output streamed only when verbose."""
    level = ray_log_level(_CURRENT.verbose if _CURRENT else False)
    if _CURRENT is None:  # library use (tests, notebooks): Ray's usual behaviour, at WARNING
        return {"logging_level": "WARNING"}
    return {"logging_level": level or "INFO", "log_to_driver": level is not None}


def before_ray_init() -> None:
    """Quiet console: from here on this process's output goes to a log file (moved into the Ray
    session's logs folder by :func:`after_ray_init`)."""
    if (
        _CURRENT is None
        or not _CURRENT.redirect
        or ray_log_level(_CURRENT.verbose) is not None
        or _REDIRECT.saved is not None
    ):
        return
    fd, path = tempfile.mkstemp(prefix="mtorl-driver-", suffix=".log")
    os.close(fd)
    _REDIRECT.start(path)


def without_ray() -> None:
    """Quiet console for a command that runs Ray Train in its local mode with no cluster (an in-process
    run of cached splits): Ray Train's own INFO lines stay off the console, as they would go to the Ray
    session's logs with a cluster."""
    import logging

    if _CURRENT is None:  # a library call: Ray's logging as Ray sets it
        return
    logging.getLogger("ray.train").setLevel(ray_log_level(_CURRENT.verbose) or "WARNING")


def after_ray_init() -> None:
    """Quiet console: Ray Data's and Tune's console output off, the log file moved into the Ray
    session's logs folder, and its path printed once."""
    if _CURRENT is None:
        return
    logs = _session_logs_dir()
    _CURRENT.ray_logs = logs
    if ray_log_level(_CURRENT.verbose) is not None:
        return
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if logs and _REDIRECT.saved is not None:
        _REDIRECT.move(os.path.join(logs, DRIVER_LOG))
    where = _REDIRECT.path or "-"
    if logs and where.startswith(logs + os.sep):
        where = os.path.relpath(where, logs)
    _CURRENT(f"Ray logs: {logs} (this process: {where}); -v or {LOG_LEVEL_ENV}=INFO shows them here")


def tune_verbosity() -> int:
    """``tune.RunConfig(verbose=...)``: Tune's status tables only when Ray's output is on the console."""
    return 1 if _CURRENT is None or ray_log_level(_CURRENT.verbose) is not None else 0


def _session_logs_dir() -> str | None:
    try:
        from ray._private.worker import global_worker

        node = global_worker.node
        return str(node.get_logs_dir_path()) if node is not None else None
    except Exception:  # noqa: BLE001 - a client connection has no local node: no path to print
        return None


@contextlib.contextmanager
def session(verbose: bool = False, stream: TextIO | None = None) -> Iterator[Console]:
    """The console of one command. On exit Ray is shut down while its output still goes to the log
    file (its shutdown chatter included), then stdout/stderr are restored."""
    global _CURRENT
    prev = _CURRENT
    out, owned = stream, False
    if out is None:  # a handle on the real stdout that survives the redirection of fd 1
        try:
            out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1, encoding="utf-8", errors="replace")
            owned = True
        except (AttributeError, OSError, ValueError):  # no file descriptor (captured in-process): no redirection
            out = sys.stdout
    con = Console(out, verbose=verbose)
    con.redirect = owned
    _CURRENT = con
    try:
        yield con
    finally:
        if _REDIRECT.saved is not None:
            with contextlib.suppress(Exception):
                import ray

                if ray.is_initialized():
                    ray.shutdown()
            kept = _REDIRECT.path
            _REDIRECT.stop()
            if kept and con.ray_logs is None and os.path.exists(kept):  # Ray never came up: say where its output is
                con(f"Ray's output of this command: {kept}")
        _CURRENT = prev
        if owned:
            with contextlib.suppress(Exception):
                out.close()


class RemoteFeed:
    """Progress from Ray workers to this process's display: a ``ray.util.queue.Queue`` (one small
    actor, no CPU) that a daemon thread drains into ``on_item``."""

    def __init__(self, on_item: Callable[[dict[str, Any]], None]) -> None:
        from ray.util.queue import Queue

        self.queue = Queue(actor_options={"num_cpus": 0})
        self.on_item = on_item
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mtorl-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - the queue's actor is gone: no more progress
                return
            self.on_item(item)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with contextlib.suppress(Exception):
            for item in self.queue.get_nowait_batch(self.queue.qsize()):
                self.on_item(item)
        with contextlib.suppress(Exception):
            self.queue.shutdown()


class LocalFeed:
    """Progress from a loop running in this process (Ray Train's local mode, no cluster): ``put_nowait``
    hands each item straight to ``on_item``."""

    def __init__(self, on_item: Callable[[dict[str, Any]], None]) -> None:
        self.on_item = on_item
        self.queue = self

    def put_nowait(self, item: dict[str, Any]) -> None:
        self.on_item(item)

    def close(self) -> None:
        pass


def epoch_line(item: dict[str, Any]) -> str:
    """What one epoch shows: its losses, the validation metric and the throughput."""
    m = item.get("metrics", {})
    parts = [f"loss {m.get('train/loss', float('nan')):.4f}"]
    for k in ("val/loss", "val/reward_auc"):
        if k in m:
            parts.append(f"{k} {m[k]:.4f}")
    if "train/samples_per_s" in m:
        parts.append(f"{m['train/samples_per_s']:.0f} windows/s")
    return " ".join(parts)


@contextlib.contextmanager
def epoch_progress(epochs: int, local: bool = False) -> Iterator[Any]:
    """Inside a command's session: an epochs display fed by the rank-0 worker; yields the queue the
    worker puts ``{"epoch": i, "metrics": {...}}`` on (``local``: the loop runs in this process with no
    Ray cluster, so no queue actor). Outside a session: yields None (the worker prints its own line, as
    library users and tests see it)."""
    if _CURRENT is None:
        yield None
        return
    bar = _CURRENT.progress(epochs, "epochs", unit="epoch")

    def on_item(item: dict[str, Any]) -> None:
        if "note" in item:
            bar.note(str(item["note"]))
            return
        done = int(item["epoch"]) + 1
        if bar.n == 0 and done > 1:  # a resumed run: the bar starts where the checkpoint left off
            bar.n = done - 1
            if bar.bar is not None:
                bar.bar.n = done - 1
        bar.update(done - bar.n, postfix=epoch_line(item), eta_s=item.get("eta_s"))  # the loop's ETA: start-up excluded

    feed: RemoteFeed | LocalFeed = LocalFeed(on_item) if local else RemoteFeed(on_item)
    try:
        yield feed.queue
    finally:
        feed.close()
        bar.close()
