"""Reward sources behind one interface: `score(prompts, responses) -> FeedbackResult`."""
from openrlaif.feedback.base import Feedback, FeedbackResult, JudgeFailure

__all__ = ["Feedback", "FeedbackResult", "JudgeFailure"]
