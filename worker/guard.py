"""`python -m worker.guard PID COMMAND...`: run COMMAND so that it is killed when its parent dies.

Sets the parent-death signal (Linux's PR_SET_PDEATHSIG, kept across exec) to SIGKILL, checks the
parent is still PID (it may have died before the signal was set), then becomes COMMAND. Done in
the child rather than with `preexec_fn`, which is unsafe in a threaded parent such as a worker.
"""

from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent_pid: int | None = None) -> None:
    """Ask for SIGKILL when the parent process goes away; exit now if it already has."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the job's lease still keeps a second copy from finishing it
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)


def main() -> None:
    parent, command = int(sys.argv[1]), sys.argv[2:]
    die_with_parent(parent)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main()
