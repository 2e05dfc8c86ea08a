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


_CALLS = {"count": 0}


def hold_at_step(prompts, responses, target_words: int = 3, step: int = 2):
    """The brevity rule, except that its `step`-th call (that step's feedback, after the previous step's
    checkpoint) waits until the file named by $OPENRLAIF_TEST_RELEASE exists, after writing
    $OPENRLAIF_TEST_RELEASE.held: a test can act at a known point of the run (kill a worker, kill or interrupt
    the run) with no race, however fast the machine is. Without the variable it is the brevity rule."""
    import os
    import time

    from openrlaif.feedback.rules import brevity
    _CALLS["count"] += 1
    release = os.environ.get("OPENRLAIF_TEST_RELEASE")
    if release and _CALLS["count"] == step:
        open(release + ".held", "w").close()
        while not os.path.exists(release):
            time.sleep(0.1)
    return brevity(prompts, responses, target_words=target_words)


def question_gated(prompts, responses):
    """Uninformative on questions (every answer to a prompt ending in '?' scores 0.5, so its group's rewards are
    all equal), the non-space share elsewhere: DAPO's dynamic sampling has groups to drop and refill."""
    return [0.5 if p.rstrip().endswith("?") else score for p, score in zip(prompts, no_space_fraction(prompts, responses))]
