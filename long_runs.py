"""What keeps a days-long run going (README, "Long runs"): resuming from the newest checkpoint whose save finished,
the curriculum saved with each checkpoint, optimizer steps with a NaN or inf gradient skipped, a message when another
process of the run stops answering, and processes that end without hanging."""

import atexit
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
from transformers import TrainerCallback

CURRICULUM_FILE = "curriculum.json"


def last_complete_checkpoint(output_dir, needs=()):
    """The newest checkpoint-N folder whose save finished, or None. transformers writes trainer_state.json after the
    weights, optimizer, scheduler and RNG states, and our callbacks write theirs (`needs`) after it: a run killed
    during a save leaves a newer folder without them, which is passed over."""
    folders = [p for p in Path(output_dir).glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    for folder in sorted(folders, key=lambda p: int(p.name.removeprefix("checkpoint-")), reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            if all((folder / name).is_file() for name in needs):
                return str(folder)
        except (OSError, ValueError):  # missing, or cut off mid-write
            pass
        print(f"{folder} is incomplete (its save was interrupted): passed over", file=sys.stderr)
    return None


def checkpoint_to_resume(resume, output_dir, needs=()):
    """--resume_from_checkpoint as a folder: `last` (or `true`) is the newest complete checkpoint in output_dir, or
    None, so that the same command starts a run and resumes it; a folder must hold a checkpoint (ValueError)."""
    if resume in ("true", "last"):
        found = last_complete_checkpoint(output_dir, needs)
        print(f"resuming from {found}" if found else f"no checkpoint in {output_dir} yet: starting from step 0",
              file=sys.stderr)
        return found
    if resume and not (Path(resume) / "trainer_state.json").is_file():
        raise ValueError(f"--resume_from_checkpoint {resume}: no checkpoint there (a checkpoint-N folder with "
                         "trainer_state.json); `--resume_from_checkpoint last` takes the newest in --output_dir")
    return resume


class CurriculumCheckpoint(TrainerCallback):
    """Saves the curriculum with each checkpoint, so that --resume_from_checkpoint continues at its level."""

    def __init__(self, curriculum, resumed_from=None):
        self.curriculum = curriculum
        saved = resumed_from and Path(resumed_from) / CURRICULUM_FILE
        if saved and saved.exists():
            curriculum.load_state_dict(json.loads(saved.read_text()))

    def on_save(self, args, state, control, **kwargs):
        saved = json.dumps(self.curriculum.state_dict())
        (Path(args.output_dir) / f"checkpoint-{state.global_step}" / CURRICULUM_FILE).write_text(saved)


class SkipNonFiniteSteps(TrainerCallback):
    """A NaN or inf gradient never reaches the weights: that optimizer step is skipped (every gradient is dropped, and
    the optimizer leaves parameters with no gradient alone). The check runs on the gradients after they are summed
    over micro-batches and processes, so every process skips the same steps. `limit` skipped steps in a row stop the
    run (`stopped`)."""

    def __init__(self, limit):
        self.limit, self.in_a_row, self.skipping, self.stopped = limit, 0, False, False

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        gradients = [p.grad for p in model.parameters() if p.grad is not None]
        self.skipping = bool(gradients) and not bool(torch.stack([g.isfinite().all() for g in gradients]).all())
        if self.skipping:
            for parameter in model.parameters():
                parameter.grad = None

    def on_step_end(self, args, state, control, **kwargs):
        self.in_a_row = self.in_a_row + 1 if self.skipping else 0
        if self.skipping:
            print(f"warning: step {state.global_step}: a NaN or inf gradient; the optimizer step was skipped "
                  f"({self.in_a_row} in a row, the run stops at {self.limit})", file=sys.stderr)
        if self.in_a_row >= self.limit:
            self.stopped = control.should_training_stop = True

    def stop_message(self, output_dir, step):
        last = last_complete_checkpoint(output_dir)
        return (f"{self.limit} optimizer steps in a row had a NaN or inf gradient, so the run stopped at step {step} "
                f"(none of them changed the weights). Try a lower --learning_rate or --max_grad_norm; "
                + (f"{last} is intact." if last else "no checkpoint was saved."))


def apply_ddp_timeout(args):
    """Give the process group --ddp_timeout on a CPU too: transformers 5.23 passes it only to GPU process groups
    (TrainingArguments._setup_devices), so gloo would wait 30 minutes for a process that stopped answering."""
    if args.use_cpu and torch.distributed.is_initialized():
        torch.distributed.distributed_c10d._set_pg_timeout(timedelta(seconds=args.ddp_timeout))


def lost_peer(error):
    """Whether `error` is this process giving up on another process of the run: a collective that waited longer than
    --ddp_timeout, or whose peer closed its connection (gloo raises RuntimeErrors from its transport; NCCL with
    TORCH_NCCL_BLOCKING_WAIT=1 and the store raise torch.distributed's errors)."""
    return isinstance(error, torch.distributed.DistError) or "gloo/transport" in str(error)


def lost_peer_message(error, output_dir, timeout, where):
    """What happened `where` (e.g. "step 3") when another process stopped answering, and the checkpoint to resume
    from."""
    reason = str(error).splitlines()[0].split("] ", 1)[-1]  # gloo's message, without its source file
    last = last_complete_checkpoint(output_dir)
    return (f"{where}: process {os.environ.get('RANK', 0)} of {os.environ.get('WORLD_SIZE', 1)} waited for "
            f"another process of the run, which did not answer within --ddp_timeout ({timeout} s) or has ended (its "
            f"own messages say why): {reason}\n  "
            + (f"{last} is intact: run again with --resume_from_checkpoint last" if last else
               "no checkpoint was saved yet"))


def end_process(code=0, result=None):
    """Where a train_paw.py process ends: `result` returned, or sys.exit(code) for an error. Under torchrun (WORLD_SIZE
    > 1) it exits at once instead, after the exit handlers and with its output flushed, without tearing its objects
    down: there PyTorch 2.13 can deadlock. Freeing the DDP model frees its reducer with the GIL held (pybind11), and
    when the reducer holds the last reference to the gloo process group (destroy_process_group dropped the others),
    the group's destructor joins gloo's worker threads, one of which waits for the GIL to free the tensors of a
    finished collective: a process that hangs after its run ended (1 in 30 two-process runs of tests/one_step.py on a
    loaded CPU; README, "Long runs")."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        sys.exit(code)
    return result
