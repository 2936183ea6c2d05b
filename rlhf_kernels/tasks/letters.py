"""The embedded gold-reward task: "answer with the prompt's letters".

A prompt is a short random string over a 16-letter alphabet followed by ':'
(e.g. ``"dkafm:"``). A response is a string of letters. Its quality is computed
by a program, the *gold reward*::

    gold(prompt, response) = hits / max(len(response), target_len)       in [0, 1]

where ``hits`` counts response characters that occur in the prompt. The best
responses are at least ``target_len`` letters long and use only prompt letters.

Data is deliberately mediocre so that RLHF has something to fix:

* SFT demonstrations copy a prompt letter with probability ``sft_copy_prob``
  (0.35) and otherwise write a uniformly random letter, so a policy that imitates
  them perfectly scores about 0.5 gold reward.
* Preference pairs are two responses of random quality for the same prompt,
  labelled by a simulated annotator that prefers ``a`` over ``b`` with
  probability ``sigmoid((gold(a) - gold(b)) / annotator_temp)`` — Bradley-Terry
  on the gold scores with noise, so the learned reward model is an imperfect
  proxy, as with human labellers.

Everything is deterministic given the seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass
class LettersTask:
    alphabet: str = "abcdefghijklmnop"
    prompt_len: int = 5
    target_len: int = 8
    min_len: int = 6
    max_len: int = 10
    sft_copy_prob: float = 0.35
    pref_min_len: int = 2       # preference pairs span more lengths than the demonstrations,
    pref_max_len: int = 14      # so the reward model learns that length alone does not pay
    annotator_temp: float = 0.1
    name: str = "letters"

    # ---- the program that defines quality -------------------------------------
    def gold_reward(self, prompt: str, response: str) -> float:
        allowed = set(prompt.rstrip(":"))
        hits = sum(c in allowed for c in response)
        return hits / max(len(response), self.target_len)

    # ---- generators ----------------------------------------------------------------
    def _prompt(self, rng: random.Random) -> str:
        return "".join(rng.choice(self.alphabet) for _ in range(self.prompt_len)) + ":"

    def _response(self, rng: random.Random, prompt: str, copy_prob: float, lengths=None) -> str:
        letters = prompt.rstrip(":")
        n = rng.randint(*(lengths or (self.min_len, self.max_len)))
        return "".join(rng.choice(letters) if rng.random() < copy_prob else rng.choice(self.alphabet)
                       for _ in range(n))

    def prompts(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(f"{self.name}-prompts-{seed}")
        return [{"prompt": self._prompt(rng)} for _ in range(n)]

    def sft_data(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(f"{self.name}-sft-{seed}")
        out = []
        for _ in range(n):
            p = self._prompt(rng)
            out.append({"prompt": p, "response": self._response(rng, p, self.sft_copy_prob)})
        return out

    def annotate(self, prompt: str, a: str, b: str, rng: random.Random) -> bool:
        """Simulated annotator: True when it prefers ``a`` (Bradley-Terry on gold, noisy)."""
        d = (self.gold_reward(prompt, a) - self.gold_reward(prompt, b)) / self.annotator_temp
        return rng.random() < 1.0 / (1.0 + math.exp(-d))

    def preference_data(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(f"{self.name}-prefs-{seed}")
        out = []
        for _ in range(n):
            p = self._prompt(rng)
            span = (self.pref_min_len, self.pref_max_len)
            a = self._response(rng, p, rng.random(), span)
            b = self._response(rng, p, rng.random(), span)
            if a == b:
                continue
            c, r = (a, b) if self.annotate(p, a, b, rng) else (b, a)
            out.append({"prompt": p, "chosen": c, "rejected": r})
        return out


def _easy(**kw):
    """A smaller variant for smoke tests: 2-letter prompts over 8 letters (learnable in seconds)."""
    return LettersTask(**{"alphabet": "abcdefgh", "prompt_len": 2, "sft_copy_prob": 0.6, "name": "letters-easy", **kw})


TASKS = {"letters": LettersTask, "letters-easy": _easy}


def get_task(name: str = "letters", **kwargs) -> LettersTask:
    """``letters`` (the demo) or ``letters-easy`` (smoke tests)."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {sorted(TASKS)}")
    return TASKS[name](**kwargs)
