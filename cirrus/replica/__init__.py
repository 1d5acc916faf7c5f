"""The replica process: loads one predictor and serves it to the gateway."""

import os
import sys

from cirrus.wire import ReplicaFailed, ReplicaReady, encode_startup


def path_with_our_bin() -> str:
    """$PATH with this interpreter's directory first: `python`, `uvicorn` ... in a command are those of
    the API's own environment (or of the runtime's, without one)."""
    ours = os.path.dirname(sys.executable)
    rest = [p for p in os.environ.get("PATH", os.defpath).split(os.pathsep) if p and p != ours]
    return os.pathsep.join([ours, *rest])


def report_startup(fd: int, message: ReplicaReady | ReplicaFailed) -> None:
    """Tell the runtime, once, on the status pipe it gave (`fd`; < 0: none), that the replica started or not."""
    if fd < 0:
        return
    try:
        os.write(fd, encode_startup(message))
        os.close(fd)
    except OSError:
        pass
