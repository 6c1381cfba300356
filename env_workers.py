"""Environments in worker processes, so that a batch's resets and steps run in parallel, not one after another.

ALFWorld resets take 0.4-1.6 s of pure-Python work each (PDDL grounding): with 16 episodes that is most of a
rollout. `EnvWorkers(n).make(...)` returns an environment that lives in one of n processes; the episode loop
(rollout.call_all) sends every live episode's request before waiting for any answer. Results are the same as
with local environments: each environment is its own deterministic object; only where it runs changes.
"""

import multiprocessing

from envs import make_env


# The main process's ends of every open worker pipe. A fork copies them all into the new worker, which must close
# its copies: while any process holds a pipe's parent end, that pipe's worker never sees EOF and never exits.
_PARENT_ENDS = set()


def _serve(conn):
    """A worker's loop: requests (env_id, method, args) are answered in order, one answer per request."""
    for parent_end in _PARENT_ENDS:
        parent_end.close()
    envs = {}
    while True:
        try:
            env_id, method, args = conn.recv()
        except EOFError:  # the parent is gone
            return
        try:
            if method == "make":
                env = envs[env_id] = make_env(*args)
                result = (env.game, env.system_prompt, env.task_type)  # its game as made (a generated one: its file)
            elif method == "close":
                result = envs.pop(env_id).close()
            else:
                result = getattr(envs[env_id], method)(*args)
                if method == "reset":  # the walkthrough is known once the game is loaded
                    result = (result, envs[env_id].walkthrough)
        except Exception as error:  # sent back and raised in the caller: it ends that episode only
            result = RuntimeError(f"{type(error).__name__}: {error}")
        conn.send(result)


class RemoteEnv:
    """The episode loop's view of an environment in a worker: the TextEnv attributes, and `submit`."""

    def __init__(self, pool, worker, env_id, game, system_prompt, task_type):
        self._pool, self._worker, self._id = pool, worker, env_id
        self.game, self.system_prompt, self.task_type = game, system_prompt, task_type
        self.walkthrough = []

    def submit(self, method, *args):
        """Start `method(*args)` in the worker; return a function that waits for its result (or raises its error).

        Answers come back in request order per worker, so the waits must be called in submission order.
        """
        worker = self._worker
        if not worker.replaced:  # else wait() raises: the environment is gone
            worker.conn.send((self._id, method, args))

        def wait():
            result = self._pool.answer(worker)
            if method == "reset":
                result, self.walkthrough = result
            return result

        return wait


class _Worker:
    """One worker process and the main process's end of its pipe."""

    def __init__(self, context):
        self.conn, child = context.Pipe()
        _PARENT_ENDS.add(self.conn)
        self.process = context.Process(target=_serve, args=(child,), daemon=True)
        self.process.start()
        child.close()
        self.replaced = False

    def close(self, kill=False):
        _PARENT_ENDS.discard(self.conn)
        self.conn.close()  # the worker sees EOF and exits
        if kill:
            self.process.kill()
        self.process.join(timeout=10)
        if self.process.is_alive():  # stuck in an environment call
            self.process.kill()


class EnvWorkers:
    """n worker processes; environments are spread over them in turn. With n = 0 environments live in this process.

    `timeout`: seconds an environment call may take. A worker that does not answer in time is killed and replaced;
    the call raises, which ends its episode as an environment error, and so do the calls of the other environments
    that lived in that worker (their state died with it). None: wait forever. With n = 0 there is no timeout.

    Workers are forked: create them early (before the model is loaded) so that they stay small.
    """

    def __init__(self, n, timeout=None):
        self._context = multiprocessing.get_context("fork")
        self._workers = [_Worker(self._context) for _ in range(n)]
        self._timeout, self._count = timeout, 0

    def make(self, env_name, game, options=None):
        if not self._workers:
            return make_env(env_name, game, options)
        self._count += 1
        worker = self._workers[self._count % len(self._workers)]
        worker.conn.send((self._count, "make", (env_name, game, options)))
        return RemoteEnv(self, worker, self._count, *self.answer(worker))

    def answer(self, worker):
        """The worker's next answer; raises the environment's error. A worker that died or does not answer in time is
        replaced."""
        if worker.replaced:
            raise RuntimeError("the environment's worker was replaced after an environment on it stopped answering")
        if not worker.conn.poll(self._timeout):
            self._replace(worker)
            raise TimeoutError(f"the environment did not answer in {self._timeout:g} s; its worker was replaced")
        try:
            result = worker.conn.recv()
        except EOFError:  # the worker crashed (e.g. the engine segfaulted): the next environments get a new one
            self._replace(worker)
            raise RuntimeError("the environment worker process died; it was replaced") from None
        if isinstance(result, Exception):
            raise result
        return result

    def _replace(self, worker):
        worker.replaced = True
        worker.close(kill=True)
        self._workers[self._workers.index(worker)] = _Worker(self._context)

    def close(self):
        for worker in self._workers:
            worker.close()
