"""Pure judge logic: rendering the rubric prompt and turning a reply into a score. No model, no Ray: unit-tested."""
from __future__ import annotations

import math
import re

from openrlaif.feedback.base import JudgeFailure

POINTWISE_TEMPLATE = (
    "{rubric}\n\n"
    "[User message]\n{prompt}\n\n"
    "[Response]\n{response}\n\n"
    "Answer with a single number from {score_min} to {score_max} and nothing else."
)


def pointwise_messages(rubric: str, prompt: str, response: str, score_min: int, score_max: int) -> list[dict]:
    rubric_text = rubric.format(score_min=score_min, score_max=score_max)
    content = POINTWISE_TEMPLATE.format(rubric=rubric_text, prompt=prompt, response=response,
                                        score_min=score_min, score_max=score_max)
    return [{"role": "user", "content": content}]


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(reply: str, score_min: int, score_max: int) -> float:
    """The first number in a judge's reply, checked against the scale. Raises JudgeFailure otherwise.

    "8", "Score: 8", "8/9", "I'd give it 7." parse; "", "great", "eight" are `unparseable`; "12" on a 1..9
    scale is `out_of_range`.
    """
    match = _NUMBER.search(reply)
    if match is None:
        raise JudgeFailure("unparseable", f"no number in judge reply {reply[:80]!r}")
    value = float(match.group())
    if not score_min <= value <= score_max:
        raise JudgeFailure("out_of_range", f"judge score {value:g} outside [{score_min}, {score_max}]")
    return value


def expected_score(label_probs: dict[int, float], min_label_mass: float) -> float:
    """d-RLAIF direct scoring: E[s] = Σ s·P(s) / Σ P(s) over the score tokens' next-token probabilities.

    If the judge puts less than `min_label_mass` on all score tokens together, it did not answer with a score:
    that is a typed `unparseable` failure, not a guess.
    """
    mass = sum(label_probs.values())
    if not math.isfinite(mass) or mass < min_label_mass or mass <= 0:
        raise JudgeFailure("unparseable", f"probability on the score tokens is {mass:.3g} < {min_label_mass}")
    return sum(score * p for score, p in label_probs.items()) / mass


def normalise(score: float, score_min: int, score_max: int) -> float:
    """Map a score on [score_min, score_max] to [0, 1], the reward the trainer sees."""
    return (score - score_min) / (score_max - score_min)


PAIRWISE_TEMPLATE = (
    "{rubric}\n\n"
    "[User message]\n{prompt}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "Which response is better? Answer with a single letter, A or B, and nothing else."
)
PAIRWISE_RUBRIC = "Compare two responses to the user's message for helpfulness, correctness and concision."


def pairwise_messages(rubric: str, prompt: str, response_a: str, response_b: str) -> list[dict]:
    content = PAIRWISE_TEMPLATE.format(rubric=rubric, prompt=prompt, response_a=response_a, response_b=response_b)
    return [{"role": "user", "content": content}]


_CHOICE = re.compile(r"\b([AB])\b")


def parse_choice(reply: str) -> str:
    """'A' or 'B' from a pairwise reply: the first standalone letter ("A", "Response B", "**A**"). Raises
    JudgeFailure('unparseable') when neither appears, or when both appear before any decision can be read."""
    match = _CHOICE.search(reply.replace("*", " "))
    if match is None:
        raise JudgeFailure("unparseable", f"no A/B verdict in judge reply {reply[:80]!r}")
    return match.group(1)


def choice_probability(label_probs: dict[str, float], min_label_mass: float) -> float:
    """P(A) from the next-token probabilities of "A" and "B", renormalised over the two (RLAIF, Lee et al. 2023)."""
    mass = label_probs.get("A", 0.0) + label_probs.get("B", 0.0)
    if not math.isfinite(mass) or mass <= 0 or mass < min_label_mass:
        raise JudgeFailure("unparseable", f"probability on A/B is {mass:.3g} < {min_label_mass}")
    return label_probs.get("A", 0.0) / mass


def swap_debiased(p_first: float, p_second: float) -> tuple[float, bool]:
    """Position-swap debiasing. p_first = P(A) with the responses in order (x, y); p_second = P(A) with them
    swapped (y, x). P(x ≻ y) = (p_first + (1 − p_second)) / 2. A flip: each order's favourite is the response in
    the same position, so the verdict followed the position, not the content."""
    prob = (p_first + (1.0 - p_second)) / 2.0
    flipped = (p_first > 0.5) == (p_second > 0.5) and p_first != 0.5 and p_second != 0.5
    return prob, flipped


# Constitutional AI (Bai et al. 2022), supervised phase: the judge critiques a response against a principle, then
# rewrites it. The conversation is the policy's own, so the judge sees the response as an assistant turn.
def critique_messages(prompt_messages: list[dict], response: str, critique_request: str) -> list[dict]:
    return prompt_messages + [{"role": "assistant", "content": response},
                              {"role": "user", "content": f"Critique request: {critique_request}"}]


def revision_messages(prompt_messages: list[dict], response: str, critique_request: str, critique: str,
                      revision_request: str) -> list[dict]:
    return critique_messages(prompt_messages, response, critique_request) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": f"Revision request: {revision_request}\n\nReply with the rewritten response "
                                    "only."}]


_REVISION_LABEL = re.compile(r"^\s*(?:\*\*)?(?:revision|revised response|rewritten response|revised answer)"
                             r"(?:\*\*)?\s*:(?:\*\*)?\s*", re.IGNORECASE)


def clean_revision(reply: str) -> str:
    """The rewritten response without a leading "Revision:"-style label or wrapping quotes. An empty result is a
    typed `empty_revision` failure: the sample is dropped, not trained on."""
    text = _REVISION_LABEL.sub("", reply.strip(), count=1).strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    if not text:
        raise JudgeFailure("empty_revision", f"no rewritten response in judge reply {reply[:80]!r}")
    return text
