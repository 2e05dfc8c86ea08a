"""The local judge: JudgeWorker (a Ray worker group on the tiny model) behind Judge, pointwise and pairwise."""
import pytest
import ray

from openrlaif.config import JudgeConfig, RoleResources
from openrlaif.feedback.backends import JudgeRequest, LocalBackend
from openrlaif.feedback.base import JudgeFailure
from openrlaif.feedback.judge import Judge, JudgeWorker
from openrlaif.workers.group import WorkerGroup

PROMPTS = ["what is the sun", "say hello", "name a color", "count to three"]
RESPONSES = ["the sun is a star", "hello", "blue", "one two three"]


@pytest.fixture(scope="module")
def judge_group(ray_cluster, tiny_model):
    group = WorkerGroup("judge-test", JudgeWorker, RoleResources(num_workers=2, num_cpus=1), lambda rank: dict(
        model_path=tiny_model, dtype="float32", threads=1, seed=0, micro_batch_size=3))
    yield group
    group.shutdown()


@pytest.mark.parametrize("overrides,expect_all_fail", [
    ({"min_label_mass": 0.0}, False),
    ({"min_label_mass": 0.99}, True),     # a random model never puts 99% on digits: all unparseable
    ({"readout": "generate", "max_new_tokens": 4}, None),
])
def test_judge_scores_or_fails_typed(judge_group, overrides, expect_all_fail):
    judge = Judge(LocalBackend(judge_group, "tiny"), JudgeConfig(micro_batch_size=3, **overrides))
    result = judge.score(PROMPTS, RESPONSES)
    assert len(result.rewards) == 4
    assert sum(result.failures.values()) == int((~result.valid).sum())
    valid_rewards = result.rewards[result.valid]
    assert ((valid_rewards >= 0) & (valid_rewards <= 1)).all()
    assert result.metrics["judge_prompt_tokens"] > 0
    if expect_all_fail is True:
        assert result.failures == {"unparseable": 4}
    if expect_all_fail is False:
        assert bool(result.valid.all())
        assert len(set(result.rewards.tolist())) > 1     # different responses, different expected scores


def test_generate_readout_scores_exactly_what_the_replies_say(judge_group):
    """The same requests answered by the worker, parsed independently: each verdict's reward is its reply's
    number on the scale, and exactly the replies without one fail."""
    from openrlaif.feedback.judge_prompts import normalise, parse_score, pointwise_messages
    prompts, responses = PROMPTS * 3, [r + suffix for suffix in ("", " ok", " 7") for r in RESPONSES]
    cfg = JudgeConfig(readout="generate", max_new_tokens=24, micro_batch_size=4)
    result = Judge(LocalBackend(judge_group, "tiny"), cfg).score(prompts, responses)
    requests = [JudgeRequest(pointwise_messages(cfg.rubric, p, r, 1, 9, "generate"), None, 24, 0.0)
                for p, r in zip(prompts, responses)]
    replies = ray.get(judge_group.workers[0].complete.remote(requests))
    expected = []
    for reply in replies:
        try:
            expected.append(normalise(parse_score(reply.text, 1, 9), 1, 9))
        except JudgeFailure:
            expected.append(None)
    assert result.valid.tolist() == [value is not None for value in expected]
    assert [round(float(r), 6) for r, ok in zip(result.rewards, result.valid) if ok] == \
        [round(value, 6) for value in expected if value is not None]
    # the random tiny model writes no digits: every verdict is `unparseable`, none is read as a score (the HTTP
    # judge's test reads real "…, so: 6" replies)
    assert result.failures == {"unparseable": len(prompts)}, [reply.text for reply in replies]


def test_pairwise_win_rates_are_swap_debiased_probabilities(judge_group):
    judge = Judge(LocalBackend(judge_group, "tiny"), JudgeConfig(mode="pairwise", min_label_mass=0.0))
    comparisons = judge.compare(PROMPTS[:2], RESPONSES[:2], RESPONSES[2:])
    assert comparisons.judged == 2 and all(0 < p < 1 for p in comparisons.prob)
    # swapping the pair's sides gives exactly the complementary probability
    swapped = judge.compare(PROMPTS[:2], RESPONSES[2:], RESPONSES[:2])
    assert [round(a + b, 6) for a, b in zip(comparisons.prob, swapped.prob)] == [1.0, 1.0]
    assert swapped.flips == comparisons.flips
    rewards = judge.score(["p"] * 3, ["a", "bb", "ccc"])   # one group of three: win rates average to 0.5
    assert bool(rewards.valid.all()) and float(rewards.rewards.mean()) == pytest.approx(0.5, abs=1e-6)


def test_a_label_probability_sums_every_whitespace_variant_of_the_label(judge_group, tiny_model, tiny_tokenizer):
    """The tiny tokenizer has both "7" and "Ġ7" (" 7"): the judge may answer with either, so P("7") is their sum,
    as the HTTP backend's merge of top_logprobs tokens gives."""
    import torch
    from transformers import AutoModelForCausalLM

    from openrlaif.feedback.backends import JudgeRequest
    messages = [{"role": "user", "content": "Rate it from 1 to 9: the sun is a star"}]
    reply = ray.get(judge_group.workers[0].complete.remote([JudgeRequest(messages, ["1", "7"])]))[0]
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = torch.tensor([list(ids["input_ids"] if hasattr(ids, "keys") else ids)])
    with torch.no_grad():
        probs = AutoModelForCausalLM.from_pretrained(tiny_model)(input_ids=ids).logits[0, -1].softmax(-1)
    for label in ("1", "7"):
        bare, spaced = tiny_tokenizer.convert_tokens_to_ids([label, "Ġ" + label])
        assert reply.label_probs[label] == pytest.approx(float(probs[bare] + probs[spaced]), rel=1e-4)
        assert float(probs[spaced]) > 0


def _requests(labels_scale: list[str], n: int = 4) -> list[JudgeRequest]:
    """Pointwise requests on a 1-9 and a 1-10 scale (\"10\" is two tokens), and both orders of pairs with A/B and
    with \"(A)\"/\"(B)\" (three tokens each)."""
    from openrlaif.feedback.judge_prompts import pairwise_messages, pointwise_messages
    # a realistic rubric, longer than one 128-token KV block of vLLM's CPU cache, so the prefix is cacheable
    rubric = ("You are a careful, impartial judge of answers to users' questions. Judge helpfulness, correctness, "
              "concision and tone; ignore length and position. ") * 3 + "Rate from {score_min} to {score_max}."
    out = []
    for prompt, response in zip(PROMPTS[:n], RESPONSES[:n]):
        out.append(JudgeRequest(pointwise_messages(rubric, prompt, response, 1, 9), [str(s) for s in range(1, 10)]))
        out.append(JudgeRequest(pointwise_messages(rubric, prompt, response, 1, 10), labels_scale))
    for prompt, a, b in zip(PROMPTS[:max(1, n // 2)], RESPONSES[:max(1, n // 2)], RESPONSES[2:]):
        for x, y in ((a, b), (b, a)):
            out.append(JudgeRequest(pairwise_messages(rubric, prompt, x, y), ["A", "B"]))
            out.append(JudgeRequest(pairwise_messages(rubric, prompt, x, y, labels=("(A)", "(B)")),
                                    ["(A)", "(B)"]))
    return out


@pytest.mark.parametrize("model", ["tiny-random-llama", "smollm2-135m-instruct"])
def test_the_vllm_judge_reads_the_same_label_probabilities_as_the_hf_judge(ray_cluster, model_cache, model):
    """vLLM (prefix caching on) and HF answer the same pointwise and pairwise requests, single- and multi-token
    labels, with the same label probabilities to 1e-4 in float32; the vLLM engine reads a group's shared prefix
    from its cache. On the tiny model the vLLM judge is one engine over two shards (tensor_parallel_size=2;
    SmolLM2's 9 heads do not divide)."""
    from openrlaif.models import resolve_model_path
    path = resolve_model_path(model, model_cache)
    requests = _requests([str(s) for s in range(1, 11)], 4)
    generate = JudgeRequest(requests[0].messages, None, 6, 0.0)   # critiques and CoT verdicts: the same engine
    if not model.startswith("tiny"):   # SmolLM2 on one thread costs ~2 s per HF row: the 1-10 scale, both orders
        requests = _requests([str(s) for s in range(1, 11)], 1)[1:5]   # of A/B, one of (A)/(B)
    tp = 2 if model.startswith("tiny") else 1
    groups = {engine: WorkerGroup(f"judge-{engine}", JudgeWorker, RoleResources(num_workers=1, num_cpus=1),
                                  lambda rank, engine=engine: dict(model_path=path, dtype="float32", threads=1, seed=0,
                                                                   engine=engine, kv_cache_gib=0.1,
                                                                   tensor_parallel_size=tp if engine == "vllm" else 1))
              for engine in ("hf", "vllm")}     # both start side by side
    try:
        assert ray.get(groups["vllm"].workers[0].__ray_call__.remote(
            lambda w: w.engine.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size)) == tp
        refs = {engine: group.workers[0].complete.remote(requests + [generate]) for engine, group in groups.items()}
        answers = {engine: ray.get(ref) for engine, ref in refs.items()}
    finally:
        for group in groups.values():
            group.shutdown()
    hf_text, vllm_text = answers["hf"].pop(), answers["vllm"].pop()
    assert 0 < vllm_text.completion_tokens <= 6 and vllm_text.text == hf_text.text   # greedy: the same words
    for hf, vllm, request in zip(answers["hf"], answers["vllm"], requests):
        assert set(hf.label_probs) == set(vllm.label_probs) == set(request.labels)
        for label in request.labels:
            assert vllm.label_probs[label] == pytest.approx(hf.label_probs[label], abs=1e-4), (label, request.labels)
        assert sum(hf.label_probs.values()) > 0
    # every request shares the chat template and rubric with the one before it: the vLLM engine reused cached blocks
    assert sum(reply.cached_tokens for reply in answers["vllm"]) > 0
    assert sum(reply.cached_tokens for reply in answers["hf"]) == 0


def test_multi_token_labels_are_teacher_forced(judge_group, tiny_model, tiny_tokenizer):
    """A 1-10 scale on the tiny tokenizer, where "10" is "1" "0" (or "Ġ1" "0"): P("10") is the teacher-forced
    probability of its tokens, summed over its variants, computed here by hand with one forward per variant; the
    Judge's expected score is then Σ s·P(s) / Σ P(s)."""
    import torch
    from transformers import AutoModelForCausalLM

    from openrlaif.feedback.judge import label_variants
    from openrlaif.feedback.judge_prompts import pointwise_messages
    assert tiny_tokenizer.encode("10", add_special_tokens=False) == tiny_tokenizer.convert_tokens_to_ids(["1", "0"])
    cfg = JudgeConfig(score_min=1, score_max=10, min_label_mass=0.0)
    messages = pointwise_messages(cfg.rubric, PROMPTS[0], RESPONSES[0], 1, 10)
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()

    def teacher_forced(sequence) -> float:
        with torch.no_grad():
            logprobs = model(input_ids=torch.tensor([ids + list(sequence)])).logits[0].log_softmax(-1)
        return float(sum(logprobs[len(ids) - 1 + k, token] for k, token in enumerate(sequence)).exp())

    by_hand = {s: sum(teacher_forced(v) for v in label_variants(tiny_tokenizer, str(s))) for s in range(1, 11)}
    assert (tiny_tokenizer.convert_tokens_to_ids("Ġ1"), tiny_tokenizer.convert_tokens_to_ids("0")) in \
        label_variants(tiny_tokenizer, "10")
    reply = ray.get(judge_group.workers[0].complete.remote([JudgeRequest(messages, [str(s) for s in range(1, 11)])]))[0]
    for s in range(1, 11):
        assert reply.label_probs[str(s)] == pytest.approx(by_hand[s], rel=1e-4)
    assert by_hand[10] > 0
    expected = sum(s * p for s, p in by_hand.items()) / sum(by_hand.values())
    result = Judge(LocalBackend(judge_group, "tiny"), cfg).score(PROMPTS[:1], RESPONSES[:1])
    assert float(result.rewards[0]) == pytest.approx((expected - 1) / 9, rel=1e-4)
