"""Run a command that starts several processes (torchrun) so that a hang fails within `timeout` seconds, naming every
process still running and where it is, instead of eating CI's 90 minutes.

Each Python process runs with faulthandler on (PYTHONFAULTHANDLER=1). At the timeout, the command's whole process tree
is stopped (SIGSTOP: torchrun cannot end its other workers meanwhile), then each process in turn gets SIGABRT, on which
faulthandler prints the Python stack of each of its threads; then all are killed. torchrun starts its workers in
sessions of their own, so they are found through /proc, not a process group.
"""

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def descendants(pid):
    """The process ids under `pid` (children first, then theirs), from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(0), [])
        found += below
        queue += below
    return found


def describe(pid):
    """'rank R (pid P): command', the rank from the process's environment (torchrun sets RANK)."""
    try:
        variables = Path(f"/proc/{pid}/environ").read_text().split("\0")
        environ = dict(line.split("=", 1) for line in variables if "=" in line)
        command = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
    except OSError:
        return f"pid {pid} (ended)"
    rank = f"rank {environ['RANK']} " if "RANK" in environ else ""
    return f"{rank}(pid {pid}): {command[:160]}"


def run(command, timeout, **kwargs):
    """subprocess.run(command, capture_output=True, text=True, ...) that on a hang raises AssertionError with, for
    every process still running after `timeout` seconds, its name and Python stacks."""
    env = {**kwargs.pop("env", os.environ), "PYTHONFAULTHANDLER": "1"}
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, env=env, **kwargs)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            report = stacks(process, err)
            out.seek(0)
            raise AssertionError(f"{' '.join(map(str, command[:4]))} ... hung: still running after {timeout} s\n"
                                 f"{report}\n--- its output, last lines:\n{out.read()[-2000:]}") from None
        out.seek(0), err.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, out.read(), err.read())


def stacks(process, err):
    """Each process of the tree, named, with the stacks faulthandler printed on SIGABRT; then all are killed."""
    tree = [*descendants(process.pid), process.pid]  # workers first: the launcher's stack says little
    names = {pid: describe(pid) for pid in tree}
    signal_all(tree, signal.SIGSTOP)
    report = []
    for pid in tree:
        err.seek(0, os.SEEK_END)
        start = err.tell()
        signal_all([pid], signal.SIGABRT)
        signal_all([pid], signal.SIGCONT)  # the pending SIGABRT comes first: faulthandler writes in its handler
        time.sleep(1)
        err.seek(start)
        dump = "\n".join(line for line in err.read().splitlines() if not line.startswith("Extension modules"))
        report.append(f"--- {names[pid]}\n{dump[-4000:].strip() or '(no Python stack printed)'}")
    signal_all(tree, signal.SIGKILL)
    process.wait()
    return "\n".join(report)


def signal_all(pids, signum):
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:  # ended meanwhile
            pass
