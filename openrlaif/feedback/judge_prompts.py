"""Pure judge logic: rendering the rubric prompts and turning a reply into a score, a choice or a ranking. No model,
no Ray: unit-tested.

Verdict format. A judge that generates text is asked for a *marked* verdict on its last line: `Score: N`
(pointwise), `Verdict: A` (pairwise), `Ranking: 2 > 1 > 3` (listwise). The parsers read the marked verdict first
and only then fall back to the last number / the final standalone letter, so a judge that reasons before it
answers ("makes 2 small mistakes, so: 6") is read right. A reply that names two different verdicts is
`unparseable`, never silently the first one.

Prompt styles (`feedback.judge.readout` × `chain_of_thought`):
    probs                 the reply's first token is the label ("7", "A"): its probability is read
    generate              one marked verdict line
    generate + CoT        brief reasoning, then the marked verdict line
    probs + CoT           the RLAIF paper's two-step form: (1) generate a rationale without a verdict, (2) append it
                          as the judge's turn, ask for the label alone and read its probability
"""
from __future__ import annotations

import math
import re

from openrlaif.feedback.base import JudgeFailure

STYLES = ("probs", "generate", "cot", "rationale")

POINTWISE_TEMPLATE = (
    "{rubric}\n\n"
    "{conversation}\n\n"
    "[Response]\n{response}\n\n"
    "{ending}"
)
POINTWISE_ENDINGS = {
    "probs": "Answer with a single number from {score_min} to {score_max} and nothing else.",
    "generate": 'Answer with one line of the form "Score: N", where N is a number from {score_min} to {score_max}.',
    "cot": ("First explain briefly what is good and what is bad about the response. Then, on the last line, give "
            'your score as "Score: N", where N is a number from {score_min} to {score_max}.'),
    "rationale": "Explain briefly what is good and what is bad about the response. Do not give a score yet.",
}
POINTWISE_AFTER_RATIONALE = "Now give your score: a single number from {score_min} to {score_max} and nothing else."


def render_conversation(prompt: str, messages: list[dict] | None = None) -> str:
    """What the judge is shown of the prompt: the user message, or the whole conversation when there is more
    than one turn or a system prompt (the response then answers its last user message)."""
    if not messages or (len(messages) == 1 and messages[0]["role"] == "user"):
        text = messages[0]["content"] if messages else prompt
        return f"[User message]\n{text}"
    turns = "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)
    return f"[Conversation]\n{turns}"


def pointwise_messages(rubric: str, prompt: str, response: str, score_min: int, score_max: int,
                       style: str = "probs", conversation: list[dict] | None = None) -> list[dict]:
    rubric_text = rubric.format(score_min=score_min, score_max=score_max)
    ending = POINTWISE_ENDINGS[style].format(score_min=score_min, score_max=score_max)
    content = POINTWISE_TEMPLATE.format(rubric=rubric_text, conversation=render_conversation(prompt, conversation),
                                        response=response, ending=ending)
    return [{"role": "user", "content": content}]


def after_rationale(messages: list[dict], rationale: str, follow_up: str) -> list[dict]:
    """Step 2 of the two-step chain-of-thought readout: the rationale as the judge's own turn, then the question
    whose one-token answer is read (RLAIF, Lee et al. 2023, §3.1: rationale appended, then the label's log-prob)."""
    return messages + [{"role": "assistant", "content": rationale}, {"role": "user", "content": follow_up}]


_NUMBER = r"-?\d+(?:\.\d+)?"
# A marked score: "Score: 8", "Final score = 8", "Rating (1-9): 8", "**Score:** 8/9".
_MARKED_SCORE = re.compile(rf"\b(?:score|rating|grade)\s*(?:\([^)\n]*\))?\s*[:=]\s*({_NUMBER})", re.IGNORECASE)
# Numbers that are not a verdict: the scale's bounds ("1-9", "1 to 9") and denominators ("/9", "out of 9").
_NOT_A_VERDICT = re.compile(rf"\d+\s*(?:-|–|to)\s*\d+|(?:/|\bout of)\s*{_NUMBER}", re.IGNORECASE)


def _clean(reply: str) -> str:
    return reply.replace("*", "").replace("#", "")


def parse_score(reply: str, score_min: int, score_max: int) -> float:
    """The judge's score, checked against the scale. Raises JudgeFailure otherwise.

    A marked verdict wins ("Score: 6", "Rating (1-9): 8"); several marked verdicts must agree. Without one, the
    last number that is not a scale bound or a denominator ("8/9" -> 8; "makes 2 small mistakes, so: 6" -> 6).
    "", "great", "eight", "Score: N/A" are `unparseable`, as are two different marked scores; "12" on a 1..9
    scale is `out_of_range`.
    """
    text = _clean(reply)
    marked = {float(m.group(1)) for m in _MARKED_SCORE.finditer(text)}
    if len(marked) > 1:
        raise JudgeFailure("unparseable", f"judge reply names different scores {sorted(marked)}: {reply[:80]!r}")
    if marked:
        value = marked.pop()
    else:
        unmarked = _NOT_A_VERDICT.sub(" ", text)
        numbers = re.findall(_NUMBER, unmarked)
        if not numbers:
            raise JudgeFailure("unparseable", f"no number in judge reply {reply[:80]!r}")
        value = float(numbers[-1])
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
    "{conversation}\n\n"
    "[Response A]\n{response_a}\n\n"
    "[Response B]\n{response_b}\n\n"
    "{ending}"
)
PAIRWISE_ENDINGS = {
    "probs": "Which response is better? Answer with a single letter, A or B, and nothing else.",
    "generate": 'Which response is better? Answer with one line of the form "Verdict: A" or "Verdict: B".',
    "cot": ("First compare the two responses briefly. Then, on the last line, give your verdict as "
            '"Verdict: A" or "Verdict: B".'),
    "rationale": "Compare the two responses briefly. Do not give a verdict yet.",
}
PAIRWISE_AFTER_RATIONALE = "Now give your verdict: which response is better? A single letter, A or B, and nothing else."
PAIRWISE_RUBRIC = "Compare two responses to the user's message for helpfulness, correctness and concision."


def pairwise_messages(rubric: str, prompt: str, response_a: str, response_b: str, style: str = "probs",
                      conversation: list[dict] | None = None, labels: tuple[str, str] = ("A", "B")) -> list[dict]:
    """`labels`: the answers the probs readout reads for Response A and Response B (A/B by default; e.g. "(A)"/"(B)"
    or "Summary 1"/"Summary 2", read by teacher forcing on a local judge)."""
    ending = PAIRWISE_ENDINGS[style]
    if style == "probs" and tuple(labels) != ("A", "B"):
        ending = pairwise_label_question(labels)
    content = PAIRWISE_TEMPLATE.format(rubric=rubric, conversation=render_conversation(prompt, conversation),
                                       response_a=response_a, response_b=response_b, ending=ending)
    return [{"role": "user", "content": content}]


def pairwise_label_question(labels: tuple[str, str]) -> str:
    return (f"Which response is better? Answer with {labels[0]} for Response A or {labels[1]} for Response B, and "
            "nothing else.")


def pairwise_after_rationale(labels: tuple[str, str]) -> str:
    if tuple(labels) == ("A", "B"):
        return PAIRWISE_AFTER_RATIONALE
    return "Now give your verdict. " + pairwise_label_question(labels)


# A marked verdict: "Verdict: A", "Answer: (B)", "Better response: Response A", MT-Bench's "[[A]]".
_MARKED_CHOICE = re.compile(r"(?i:\b(?:verdict|answer|choice|winner|preferred|preference|better response)\s*:\s*"
                            r"(?:response\s+)?)[(\[]?([AB])\b|\[\[([AB])\]\]")
_STANDALONE = re.compile(r"\b([AB])\b")
_FINAL_LETTER = re.compile(r"\b([AB])\W*$")


def parse_choice(reply: str) -> str:
    """'A' or 'B' from a pairwise reply. A marked verdict wins ("Verdict: B", "[[A]]"); several must agree.
    Without one: the only standalone letter that appears ("A", "**B** is better", "Response B."), or, when both
    appear, the letter the reply ends with ("Response A rambles; Response B answers directly. B"). Anything else
    ("Both A and B are fine", "Both are fine", two different marked verdicts) is JudgeFailure('unparseable')."""
    text = _clean(reply)
    marked = {a or b for a, b in _MARKED_CHOICE.findall(text)}
    if len(marked) == 1:
        return marked.pop()
    if len(marked) > 1:
        raise JudgeFailure("unparseable", f"judge reply gives both verdicts: {reply[:80]!r}")
    letters = set(_STANDALONE.findall(text))
    if len(letters) == 1:
        return letters.pop()
    final = _FINAL_LETTER.search(text.strip())
    if letters and final:
        return final.group(1)
    what = "both A and B, and no final verdict" if letters else "no A/B verdict"
    raise JudgeFailure("unparseable", f"{what} in judge reply {reply[:80]!r}")


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


# Listwise ranking (Repeat Ranking, Devine 2024): the judge ranks K numbered responses; Kendall's W over R rankings
# in shuffled presentation orders measures how consistent its ranking of that prompt is.
LISTWISE_ENDINGS = {
    "generate": ('Rank the responses from best to worst. Answer with one line of the form "Ranking: {example}", '
                 "naming every response number exactly once."),
    "cot": ("First compare the responses briefly. Then, on the last line, rank them from best to worst as "
            '"Ranking: {example}", naming every response number exactly once.'),
}


def listwise_messages(rubric: str, prompt: str, responses: list[str], style: str = "generate",
                      conversation: list[dict] | None = None) -> list[dict]:
    numbered = "\n\n".join(f"[Response {i}]\n{text}" for i, text in enumerate(responses, start=1))
    example = " > ".join(str(i) for i in ([2, 1] + list(range(3, len(responses) + 1)))[:len(responses)])
    ending = LISTWISE_ENDINGS[style].format(example=example)
    content = f"{rubric}\n\n{render_conversation(prompt, conversation)}\n\n{numbered}\n\n{ending}"
    return [{"role": "user", "content": content}]


_MARKED_RANKING = re.compile(r"(?i:\branking\s*:)([^\n]*)")


def parse_ranking(reply: str, size: int) -> list[int]:
    """The 0-based indices of the `size` presented responses, best first, from "Ranking: 2 > 1 > 3" (the last
    marked line), or else from the reply's last line that holds numbers. `unparseable` when there is none;
    `invalid_ranking` when the numbers are not a permutation of 1..size."""
    text = _clean(reply)
    marked = _MARKED_RANKING.findall(text)
    if marked:
        line = marked[-1]
    else:
        lines = [line for line in text.splitlines() if re.search(r"\d", line)]
        if not lines:
            raise JudgeFailure("unparseable", f"no ranking in judge reply {reply[:80]!r}")
        line = lines[-1]
    numbers = [int(n) for n in re.findall(r"\d+", line)]
    if sorted(numbers) != list(range(1, size + 1)):
        raise JudgeFailure("invalid_ranking", f"{numbers} is not a ranking of responses 1..{size}: {reply[:80]!r}")
    return [n - 1 for n in numbers]


def kendalls_w(rankings: list[list[int]]) -> float:
    """Kendall's coefficient of concordance of R rankings of the same K items (no ties):
    W = 12·S / (R²·(K³ − K)), S = Σ_i (R_i − R̄)², R_i the rank sum of item i, R̄ = R·(K + 1)/2.
    `rankings[r][i]` is the rank (1 = best) rater r gives item i. 1 = every ranking identical, 0 = no agreement.
    Fewer than two items: 1 (nothing to disagree on)."""
    raters, items = len(rankings), len(rankings[0])
    if items < 2:
        return 1.0
    sums = [sum(ranking[i] for ranking in rankings) for i in range(items)]
    mean = raters * (items + 1) / 2
    spread = sum((total - mean) ** 2 for total in sums)
    return 12 * spread / (raters ** 2 * (items ** 3 - items))


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
