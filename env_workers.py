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
                result = (env.system_prompt, env.task_type)
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

    def __init__(self, conn, env_id, game, system_prompt, task_type):
        self._conn, self._id = conn, env_id
        self.game, self.system_prompt, self.task_type = game, system_prompt, task_type
        self.walkthrough = []

    def submit(self, method, *args):
        """Start `method(*args)` in the worker; return a function that waits for its result (or raises its error).

        Answers come back in request order per worker, so the waits must be called in submission order.
        """
        self._conn.send((self._id, method, args))

        def wait():
            try:
                result = self._conn.recv()
            except EOFError:
                raise RuntimeError("the environment worker process died") from None
            if isinstance(result, Exception):
                raise result
            if method == "reset":
                result, self.walkthrough = result
            return result

        return wait


class EnvWorkers:
    """n worker processes; environments are spread over them in turn. With n = 0 environments live in this process.

    Workers are forked: create them early (before the model is loaded) so that they stay small.
    """

    def __init__(self, n):
        context = multiprocessing.get_context("fork")
        self._conns, self._processes, self._count = [], [], 0
        for _ in range(n):
            parent, child = context.Pipe()
            _PARENT_ENDS.add(parent)
            process = context.Process(target=_serve, args=(child,), daemon=True)
            process.start()
            child.close()
            self._conns.append(parent)
            self._processes.append(process)

    def make(self, env_name, game, options=None):
        if not self._conns:
            return make_env(env_name, game, options)
        self._count += 1
        conn = self._conns[self._count % len(self._conns)]
        conn.send((self._count, "make", (env_name, game, options)))
        answer = conn.recv()
        if isinstance(answer, Exception):
            raise answer
        return RemoteEnv(conn, self._count, game, *answer)

    def close(self):
        for conn in self._conns:
            _PARENT_ENDS.discard(conn)
            conn.close()  # each worker sees EOF and exits
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():  # stuck in an environment call
                process.terminate()
