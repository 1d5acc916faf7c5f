"""`python -m cirrus.replica.template --api A --revision N --predictor-path P --control-fd FD`: forks replicas.

A replica's cold start is mostly imports (`import torch` alone takes seconds). The local runtime
starts one *template* per (API, revision): it imports the replica machinery and the user's
predictor module (module-level imports run here; the class is not constructed and no model
code runs), reports `TemplateReady`, then forks a replica for each `ForkRequest`. The child runs
exactly what `python -m cirrus.replica` runs (`run_replica`), and `load_predictor` finds the
module already imported, so only the predictor's `__init__` remains to be paid.

The template is single-threaded and runs no event loop: forking a process with threads or a loop
leaves the child with locks held by threads that do not exist there (torch's OpenMP pool after any
multi-threaded op is the known case). Native pools created at import time (OpenBLAS) have their own
fork handlers.

It talks to the runtime over a SOCK_SEQPACKET socket (messages in `cirrus.wire`): fork requests in
(with the replica's status pipe and log file as descriptors), `Forked`/`ForkFailed` and a
`ChildExited` for every replica it reaps out. It exits when the runtime closes the socket or its
parent dies (its replicas then see their parent gone and exit too), and, after `Retire`, once its
last replica has exited.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
import traceback

from cirrus.wire import (
    TEMPLATE_MESSAGE_MAX_BYTES,
    ChildExited,
    Forked,
    ForkFailed,
    ForkRequest,
    Retire,
    TemplateFailed,
    TemplateMessage,
    TemplateReady,
    decode_template_message,
    encode_template_message,
)

log = logging.getLogger("cirrus.template")
PARENT_CHECK_S = 1.0
FORK_FDS = 2  # a ForkRequest carries the status pipe's write end and the replica's log file


def _preload() -> None:
    """What every replica imports before it serves, so forked children find it loaded."""
    import asyncio  # noqa: F401
    import concurrent.futures  # noqa: F401

    import cirrus.replica.__main__
    import cirrus.replica.server  # noqa: F401

    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401


class Template:
    """The fork loop: one control socket, a self-pipe woken by SIGCHLD, and the children forked."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.parent = os.getppid()
        self.children: dict[int, str] = {}  # pid -> replica id
        self.retired = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.DefaultSelector()

    def send(self, message: TemplateMessage) -> None:
        self.control.send(encode_template_message(message))

    def run(self) -> None:
        signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler makes the wakeup fd fire
        signal.set_wakeup_fd(self._wake_w)
        self._selector.register(self.control, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while True:
                events = self._selector.select(PARENT_CHECK_S)
                self._reap()
                if os.getppid() != self.parent:
                    log.warning("the runtime that started this template is gone; exiting")
                    break
                if any(key.fileobj is self.control for key, _ in events) and not self._receive():
                    break
                if any(key.fd == self._wake_r for key, _ in events):
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                if self.retired and not self.children:
                    log.info("retired, and every replica forked from here has exited")
                    break
        except (BrokenPipeError, ConnectionResetError):
            log.warning("the runtime closed the control socket")
        finally:
            self._orphan_children()

    def _receive(self) -> bool:
        """Handle one message; False when the runtime closed the socket."""
        data, fds, flags, _ = socket.recv_fds(self.control, TEMPLATE_MESSAGE_MAX_BYTES, FORK_FDS)
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        try:
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                raise ValueError("a truncated message")
            message = decode_template_message(data)
        except Exception as exc:
            for fd in fds:
                os.close(fd)
            log.error("ignoring a bad message from the runtime: %s", exc)
            return True
        if isinstance(message, ForkRequest):
            self._fork(message, fds)
        else:
            for fd in fds:
                os.close(fd)
            if isinstance(message, Retire):
                self.retired = True
        return True

    def _fork(self, request: ForkRequest, fds: list[int]) -> None:
        replica_id = request.launch.replica_id
        if self.retired or len(fds) != FORK_FDS:
            for fd in fds:
                os.close(fd)
            why = "the template is retired" if self.retired else f"expected {FORK_FDS} descriptors, got {len(fds)}"
            self.send(ForkFailed(replica_id=replica_id, error=why))
            return
        status_fd, log_fd = fds
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(status_fd)
            os.close(log_fd)
            self.send(ForkFailed(replica_id=replica_id, error=f"fork failed: {exc}"))
            return
        if pid == 0:
            code = 70  # EX_SOFTWARE: the child failed before serving
            try:
                code = self._become_replica(request, status_fd, log_fd)
            except BaseException:
                with contextlib.suppress(BaseException):
                    traceback.print_exc()
            finally:
                with contextlib.suppress(BaseException):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(status_fd)
        os.close(log_fd)
        self.children[pid] = replica_id
        log.info("forked replica %s as pid %d", replica_id, pid)
        self.send(Forked(replica_id=replica_id, pid=pid))

    def _become_replica(self, request: ForkRequest, status_fd: int, log_fd: int) -> int:
        """In the child: shed the template's state, then serve like `python -m cirrus.replica`."""
        os.setsid()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh interpreter
        self._selector.close()
        self.control.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.environ.clear()
        os.environ.update(request.env)
        gc.enable()  # the template's objects stay frozen: collections here do not touch (un-share) them
        _reseed_numpy()
        from cirrus.replica.__main__ import run_replica

        return run_replica(request.launch, status_fd)

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            replica_id = self.children.pop(pid, None)
            code = os.waitstatus_to_exitcode(status)
            log.info("replica %s (pid %d) exited: %d", replica_id, pid, code)
            self.send(ChildExited(pid=pid, code=code))

    def _orphan_children(self) -> None:
        """Leaving with replicas still running: ask them to stop (they also notice their parent is gone)."""
        for pid in self.children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _reseed_numpy() -> None:
    """Each replica gets its own numpy global random state, as a fresh process would (Python's
    `random` reseeds itself after fork)."""
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        with contextlib.suppress(Exception):
            numpy.random.seed()


def _fork_hazard() -> str | None:
    """Why a child forked from this process could not work, if it could not."""
    torch = sys.modules.get("torch")
    if torch is not None:
        with contextlib.suppress(Exception):
            if torch.cuda.is_initialized():
                return (
                    "the predictor module initialised CUDA when it was imported, and CUDA does not survive a "
                    "fork; move GPU work into __init__"
                )
    return None


def _os_threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


def _import_predictor(project_dir: str, predictor_path: str) -> float:
    from cirrus.predictor import import_predictor_file

    started = time.perf_counter()
    gc.disable()  # no collections while importing leaves fewer freed holes in pages the replicas share
    _preload()
    import_predictor_file(project_dir, predictor_path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cirrus.replica.template")
    parser.add_argument("--api", required=True)
    parser.add_argument("--revision", type=int, required=True)
    parser.add_argument("--predictor-path", required=True, help="relative to the working directory (the project)")
    parser.add_argument("--control-fd", type=int, required=True)
    args = parser.parse_args()
    from cirrus.replica.__main__ import configure_logging

    configure_logging()
    control = socket.socket(fileno=args.control_fd)
    try:
        import_s = _import_predictor(os.getcwd(), args.predictor_path)
    except BaseException as exc:
        log.error("the predictor module failed to import:\n%s", traceback.format_exc())
        with contextlib.suppress(OSError):
            control.send(encode_template_message(TemplateFailed(error=f"{type(exc).__name__}: {exc}")))
        sys.stderr.flush()
        os._exit(1)
    hazard = _fork_hazard()
    if hazard is not None:
        log.error("replicas cannot be forked from here: %s", hazard)
        with contextlib.suppress(OSError):
            control.send(encode_template_message(TemplateFailed(error=hazard)))
        os._exit(1)
    if threading.active_count() > 1:
        log.warning(
            "the predictor module started %d Python threads at import; forked replicas do not get them, "
            "and a lock one of them held stays locked in every replica",
            threading.active_count() - 1,
        )
    gc.freeze()  # the imported objects move out of the collector's reach, so replicas share their pages
    template = Template(control)
    threads = _os_threads()
    log.info(
        "template of %s revision %d ready: imported %s in %.2fs (%d OS threads)",
        args.api,
        args.revision,
        args.predictor_path,
        import_s,
        threads,
    )
    try:
        template.send(TemplateReady(pid=os.getpid(), import_s=import_s, threads=threads))
    except OSError:
        os._exit(0)
    template.run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
