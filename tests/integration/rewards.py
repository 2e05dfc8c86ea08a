"""Toy rule rewards for learning tests."""


def no_space_fraction(prompts, responses):
    """Share of characters that are not spaces: dense, every sample differs, a random policy sits near 0.8."""
    return [sum(not c.isspace() for c in r) / len(r) if r else 0.0 for r in responses]


def record_listeners(prompts, responses):
    """The brevity rule, which also writes, while the run's Ray cluster is up, the node IP and every address the
    driver's process tree (Ray's GCS, raylet, agents, workers) listens on to $OPENRLAIF_TEST_LISTENERS."""
    import json
    import os

    import ray

    from openrlaif.feedback.rules import brevity
    from tests.listeners import listening
    with open(os.environ["OPENRLAIF_TEST_LISTENERS"], "w") as handle:
        json.dump({"node_ip": ray.util.get_node_ip_address(), "listening": listening()}, handle)
    return brevity(prompts, responses)
