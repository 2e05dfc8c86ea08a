"""Toy rule rewards for learning tests."""


def no_space_fraction(prompts, responses):
    """Share of characters that are not spaces: dense, every sample differs, a random policy sits near 0.8."""
    return [sum(not c.isspace() for c in r) / len(r) if r else 0.0 for r in responses]
