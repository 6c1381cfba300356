"""Stress the two-process runs for hangs (not a test: minutes to hours). Counts runs that end, fail and hang.

    python tests/stress_multiprocess.py --runs 30 --kills 10 --timeout 180 --log /tmp/stress.log

--runs: two-process runs of tests/one_step.py (the three settings of tests/test_multiprocess.py in turn), as the test
launches them. --kills: two-process train_paw.py runs (tiny model, generated games) in which one process, rank 0 and
1 in turn, is killed (SIGKILL) at a random moment of its training steps; the run must end within --timeout with the
survivor's message. --desyncs: runs of a mutant of tests/one_step.py in which process 1 makes one collective more
than process 0 at the end, as a mutation that gives the processes different work does. A run still going after
--timeout is a hang: tests/launch.py prints every process's stack.
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import launch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
SETTINGS = [("paw", "grpo"), ("paw", "gigpo"), ("off", "rloo")]
os.environ.setdefault("PAW_TINY_DIR", str(Path(tempfile.gettempdir()) / "paw-stress" / "tiny"))  # train_paw's tiny
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}


MUTANT = """    if trainer.accelerator.process_index == 1:  # the mutant: a collective that process 0 does not make
        trainer.accelerator.gather(torch.ones(1))
    trainer.accelerator.wait_for_everyone()"""


def one_step_runs(count, timeout, tiny, log, script="tests/one_step.py", name="one_step"):
    outcomes = {"ended": 0, "failed": 0, "hung": 0}
    for i in range(count):
        wm, advantage = SETTINGS[i % len(SETTINGS)]
        with tempfile.TemporaryDirectory() as out:
            start = time.time()
            try:
                result = launch.run([TORCHRUN, "--nproc_per_node", "2", script, tiny, out, wm, advantage, "4"],
                                    timeout, cwd=REPO, env={**ENV, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"})
                outcome = "ended" if result.returncode == 0 else "failed"
                detail = "" if result.returncode == 0 else result.stderr[-3000:]
            except AssertionError as hang:
                outcome, detail = "hung", str(hang)
        outcomes[outcome] += 1
        print(f"{name} {i + 1}/{count} ({wm}, {advantage}): {outcome} in {time.time() - start:.0f} s", flush=True)
        if detail:
            log.write(f"=== {name} run {i + 1}: {outcome}\n{detail}\n")
    return outcomes


def desync_runs(count, timeout, tiny, log):
    """tests/one_step.py with MUTANT in place of its final barrier."""
    source = (REPO / "tests" / "one_step.py").read_text()
    mutant = source.replace("    trainer.accelerator.wait_for_everyone()", MUTANT)
    assert mutant != source
    with tempfile.NamedTemporaryFile("w", suffix=".py") as script:
        script.write(mutant)
        script.flush()
        return one_step_runs(count, timeout, tiny, log, script.name, "desync")


def kill_runs(count, timeout, log):
    """train_paw.py on 2 processes, one of them killed mid-step: how long the rest takes to end, and what it says."""
    outcomes = {"ended": 0, "hung": 0}
    for i in range(count):
        victim = i % 2
        with tempfile.TemporaryDirectory() as out, tempfile.TemporaryFile("w+") as output:
            process = subprocess.Popen(
                [TORCHRUN, "--nproc_per_node", "2", "train_paw.py", "--model_name_or_path", "tiny", "--games",
                 "generated", "--env_workers", "1", "--max_steps", "6", "--save_steps", "2", "--output_dir", out],
                cwd=REPO, env={**ENV, "PYTHONFAULTHANDLER": "1"}, stdout=output, stderr=subprocess.STDOUT, text=True)
            while process.poll() is None and "| 1/6" not in Path(f"/proc/self/fd/{output.fileno()}").read_text():
                time.sleep(0.2)  # the first step has ended: the others are under way
            time.sleep(random.uniform(0, 3))
            workers = set(launch.descendants(process.pid)) - {p for c in launch.descendants(process.pid)
                                                                for p in launch.descendants(c)}  # not env workers
            ranks = {launch.describe(pid).split(" (")[0]: pid for pid in workers}
            killed_at = time.time()
            if f"rank {victim}" in ranks:
                os.kill(ranks[f"rank {victim}"], signal.SIGKILL)
            try:
                process.wait(timeout=timeout)
                outcome = "ended"
                detail = f"rc {process.returncode} in {time.time() - killed_at:.1f} s after the kill"
            except subprocess.TimeoutExpired:
                outcome = "hung"
                detail = launch.stacks(process, output)
            output.seek(0)
            text = output.read()
        outcomes[outcome] += 1
        print(f"kill {i + 1}/{count} (rank {victim}): {outcome}, {detail.splitlines()[0]}", flush=True)
        log.write(f"=== kill run {i + 1} (rank {victim}): {outcome}, {detail}\n{text[-12000:]}\n")
    return outcomes


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--desyncs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--log", default="stress_multiprocess.log")
    args = parser.parse_args()
    from tiny_model import tiny_model_path

    tiny = str(tiny_model_path())
    with open(args.log, "w") as log:
        runs = one_step_runs(args.runs, args.timeout, tiny, log)
        kills = kill_runs(args.kills, args.timeout, log)
        desyncs = desync_runs(args.desyncs, args.timeout, tiny, log)
    print(f"one_step runs: {runs}; kill runs: {kills}; desync runs: {desyncs} (details: {args.log})")


if __name__ == "__main__":
    main()
