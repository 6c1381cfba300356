"""A deterministic test environment and scripted policies, so that rollouts are identical from run to run."""

import os
import time

from envs import Step, parse_action
from rollout import text_policy

ACTIONS = ["look", "open box", "take key from box"]


class ScriptedEnv:
    """A box room: the episode is won by `take key from box` once the box is open. Observations name the turn
    unless numbered=False."""

    system_prompt = "You are in a test room."
    task_type = "Pick"
    walkthrough = ["<action>open box</action>", "<action>take key from box</action>"]

    def __init__(self, game, serial=0, fail_at=None, numbered=True):
        self.game, self.serial, self.fail_at, self.numbered = game, serial, fail_at, numbered
        self.turn, self.open = 0, False

    def reset(self):
        if self.fail_at == "reset":
            raise RuntimeError("the game file is corrupt")
        return Step(f"Room {self.game}. Your task is to: take the key from the box.", ACTIONS)

    def step(self, reply):
        self.turn += 1
        if self.fail_at == self.turn:
            raise RuntimeError("the engine crashed")
        action = parse_action(reply)
        if action not in ACTIONS:
            return Step("Nothing happens.", ACTIONS, action=action, valid=False)
        self.open = self.open or action == "open box"
        won = self.open and action == "take key from box"
        # Unnumbered, the same action gives the same observation: states repeat across and within episodes (GiGPO)
        you = f"Turn {self.turn}: you" if self.numbered else "You"
        feedback = f"{you} {action}." + (" You found the key!" if won else "")
        return Step(feedback, ACTIONS, float(won), won, won, action, True)

    def close(self):
        pass


class HangingEnv(ScriptedEnv):
    """A ScriptedEnv whose step number `hang_at` never returns, like an engine stuck in a loop."""

    def __init__(self, game, serial=0, hang_at=None):
        super().__init__(game, serial)
        self.hang_at = hang_at

    def step(self, reply):
        if self.turn + 1 == self.hang_at:
            time.sleep(10**6)
        return super().step(reply)


class CrashingEnv(ScriptedEnv):
    """A ScriptedEnv whose process dies at the first step, like an engine that segfaults."""

    def step(self, reply):
        os._exit(1)


# Replies per episode (by serial number), turn by turn: wins at turn 2 or 3, loses, or never makes sense.
SCRIPTS = [
    ["<think>open it</think><action>open box</action>", "<action>take key from box</action>"],
    ["<action>look</action>", "<think>hmm, the box</think><action>open box</action>",
     "<action>take key from box</action>"],
    ["<action>look</action>", "no tags at all", "<action>look</action><action>look</action>"],
    ["<think>a long thought about what the key could be and where it is</think><action>take key from box</action>",
     "<action>open box</action>", "<action>dance</action>"],
]


def scripted_policy(chat):
    """Episode with serial k plays SCRIPTS[k % 4], repeating the script's last reply once it runs out."""

    def choose(e):
        script = SCRIPTS[e.env.serial % len(SCRIPTS)]
        return script[min(len(e.turns), len(script) - 1)]

    return text_policy(chat, choose)
