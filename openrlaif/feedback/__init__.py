"""Reward sources behind one interface: `score(prompts, responses, group_ids, conversations) -> FeedbackResult`."""
from openrlaif.feedback.base import Feedback, FeedbackResult, JudgeFailure

__all__ = ["Feedback", "FeedbackResult", "JudgeFailure"]
