import re
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from openrlaif.config import Config, ConfigError, RoleResources, RolloutConfig, register_configs, validate

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs")


def composed(*overrides) -> Config:
    register_configs()
    with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base=None):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def test_default_config_is_valid():
    cfg = composed()
    validate(cfg)
    assert cfg.model.path == "smollm2-135m-instruct" and cfg.algorithm.name == "grpo"


def shipped_groups() -> list[list[str]]:
    """Every config file of every group under configs/, as the overrides that select it (and what it needs)."""
    needs = {"feedback=reward_model": ["feedback.reward_model.path=/some/rm"],
             "feedback=judge_http": ["feedback.judge.base_url=http://127.0.0.1:8000/v1"],
             "feedback=env": ["env=tool_use"],
             "env=simulated_user": ["env.kwargs.base_url=http://127.0.0.1:8000/v1"],
             "env=agent": ["env.agent=tests.integration.agents:openai_agent"],
             "algorithm=distill": ["teacher.model=tiny-random-llama"],
             "feedback=none": ["algorithm=distill", "teacher.model=tiny-random-llama"]}
    offline = {"dpo", "cdpo", "robust_dpo", "ipo", "simpo", "orpo", "kto", "bco", "lipo"}
    cases = []
    for group in sorted(os.listdir(CONFIG_DIR)):
        if not os.path.isdir(os.path.join(CONFIG_DIR, group)):
            continue
        for name in sorted(os.listdir(os.path.join(CONFIG_DIR, group))):
            choice = f"{group}={name.removesuffix('.yaml')}"
            pipeline = (["pipeline=preference"] if group == "algorithm" and name[:-5] in offline else
                        ["pipeline=sft"] if choice == "algorithm=sft" else
                        ["pipeline=reward_model"] if choice == "algorithm=bradley_terry" else
                        ["pipeline=online_dpo"] if choice == "feedback=self_judge" else [])
            cases.append([choice, *pipeline, *needs.get(choice, [])])
    return cases


@pytest.mark.parametrize("overrides", shipped_groups(), ids=lambda o: o[0])
def test_every_shipped_group_composes_and_validates(overrides):
    cfg = composed(*overrides)
    validate(cfg)
    group, _, name = overrides[0].partition("=")
    if group == "feedback" and cfg.feedback.source == "function":   # the shipped rule is importable and callable
        from openrlaif.feedback.rules import load_function
        load_function(cfg.feedback.function, cfg.feedback.function_kwargs)


def test_shipped_groups_cover_every_config_file():
    """The list above is built from the folders, so a new config file is composed without editing the test."""
    groups = {case[0].partition("=")[0] for case in shipped_groups()}
    assert groups == {"algorithm", "env", "feedback", "model"} and len(shipped_groups()) >= 32


@pytest.mark.parametrize("override,key", [
    ("rollout.engine=sglang", "rollout.engine"),
    ("actor.zero_stage=4", "actor.zero_stage"),
    ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt"),
    ("actor.micro_batch_size=3", "actor.micro_batch_size"),
    ("feedback.judge.pairwise_strategy=best", "feedback.judge.pairwise_strategy"),
    ("feedback.judge.engine=sglang", "feedback.judge.engine"),
    ("algorithm.kl_estimator=k9", "algorithm.kl_estimator"),
    ("rollout.top_p=1.5", "rollout.top_p"),
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(composed(override))
    assert key in str(err.value)


def test_unknown_key_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="nonsense"):
        composed("actor.nonsense=1")


def test_bad_type_is_rejected_by_the_schema():
    with pytest.raises(Exception, match="actor.lr|lr"):
        composed("actor.lr=fast")


def test_function_feedback_needs_module_and_name():
    with pytest.raises(ConfigError, match="feedback.function"):
        validate(composed("feedback=function", "feedback.function=brevity"))


@pytest.mark.parametrize("algorithm", ["dpo", "cdpo", "robust_dpo", "ipo", "simpo", "orpo", "kto", "bco", "lipo"])
def test_preference_configs_compose_and_validate(algorithm):
    cfg = composed("pipeline=preference", f"algorithm={algorithm}")
    validate(cfg)
    assert cfg.algorithm.loss == algorithm


def test_preference_pairs_must_split_over_workers():
    with pytest.raises(ConfigError, match="actor.micro_batch_size"):
        validate(composed("pipeline=preference", "algorithm=dpo", "data.prompts_per_step=3"))


@pytest.mark.parametrize("pipeline", ["preference", "sft", "reward_model"])
@pytest.mark.parametrize("mini, needle", [
    (6, "actor.mini_batch_size=6 must divide the step batch"),     # 3 accumulation steps over mini-batches of 3 and 1
    # 16 would step the optimizer every other train step, with a doubled gradient
    (16, "actor.mini_batch_size=16 must divide the step batch \\(data.prompts_per_step = 8\\)"),
])
def test_offline_pipelines_check_the_mini_batch_like_the_online_ones(pipeline, mini, needle):
    """One validation serves every pipeline: an offline step's mini-batches must split the step's examples
    exactly, or DeepSpeed's accumulation count and the real micro-steps per optimizer step disagree."""
    algorithm = {"preference": "dpo", "sft": "sft", "reward_model": "bradley_terry"}[pipeline]
    with pytest.raises(ConfigError, match=needle):
        validate(composed(f"pipeline={pipeline}", f"algorithm={algorithm}", "data.prompts_per_step=8",
                          f"actor.mini_batch_size={mini}", "actor.micro_batch_size=2"))
    validate(composed(f"pipeline={pipeline}", f"algorithm={algorithm}", "data.prompts_per_step=8",
                      "actor.mini_batch_size=4", "actor.micro_batch_size=2"))


def test_constitutional_sft_phase_checks_the_mini_batch_too():
    with pytest.raises(ConfigError, match="actor.mini_batch_size=3"):
        validate(composed("pipeline=constitutional", "rollout.samples_per_prompt=1", "data.prompts_per_step=4",
                          "actor.mini_batch_size=3", "actor.micro_batch_size=1"))


def test_k1_in_the_loss_is_refused_but_k1_in_the_reward_is_fine():
    """∇(log π − log π_ref) = ∇log π has expectation 0 under π: k1 in the loss regularises nothing."""
    with pytest.raises(ConfigError, match="kl_estimator=k1 in the loss.*k3.*k2.*kl_in_reward=true"):
        validate(composed("algorithm=grpo", "algorithm.kl_estimator=k1"))
    for estimator in ("k2", "k3"):
        validate(composed("algorithm=grpo", f"algorithm.kl_estimator={estimator}"))
    validate(composed("algorithm=grpo", "algorithm.kl_estimator=k1", "algorithm.kl_coef=0"))   # no KL at all
    validate(composed("algorithm=reinforce_pp"))   # k1 as a per-token reward penalty
    validate(composed("algorithm=ppo"))


def test_sft_config_validates():
    validate(composed("pipeline=sft", "algorithm=sft", "data.pack_length=512"))


@pytest.mark.parametrize("override,key", [("algorithm.dual_clip=1.0", "algorithm.dual_clip"),
                                          ("algorithm.loss_agg=sum", "algorithm.loss_agg"),
                                          ("algorithm.clip_eps_high=-0.1", "algorithm.clip_eps_high")])
def test_policy_loss_options_are_validated(override, key):
    with pytest.raises(ConfigError, match=key):
        validate(composed(override))


def test_policy_loss_options_compose():
    cfg = composed("algorithm.clip_eps_high=0.28", "algorithm.dual_clip=3", "algorithm.entropy_coef=0.001",
                   "algorithm.loss_agg=seq_mean_token_mean")
    validate(cfg)
    assert cfg.algorithm.clip_eps_high == 0.28 and cfg.algorithm.dual_clip == 3.0


def test_kl_in_reward_needs_a_token_level_estimator():
    with pytest.raises(ConfigError, match="kl_in_reward"):
        validate(composed("algorithm=grpo", "algorithm.kl_in_reward=true"))


def test_reward_model_pipeline_and_feedback_compose():
    validate(composed("pipeline=reward_model", "algorithm=bradley_terry", "algorithm.margin=0.5"))
    cfg = composed("feedback=reward_model", "feedback.reward_model.path=/some/rm")
    validate(cfg)
    assert cfg.feedback.source == "reward_model"


@pytest.mark.parametrize("overrides,key", [
    (["feedback.source=reward_model"], "feedback.reward_model.path"),
    (["feedback=lsc_combined", "feedback.weights=[1.0]"], "feedback.weights"),
    (["feedback.transform=exp"], "feedback.transform"),
    (["feedback.extra_functions=[brevity]"], "feedback.extra_functions"),
    (["feedback.reference_quantile=1.5"], "feedback.reference_quantile"),
    (["algorithm=ppo", "critic.micro_batch_size=3"], "critic.micro_batch_size"),
    (["algorithm=ppo", "critic.value_clip=0"], "critic.value_clip"),
    (["algorithm=ppo", "algorithm.lam=1.5"], "algorithm.lam"),
    (["pipeline=reward_model", "data.eval_fraction=1.0"], "data.eval_fraction"),
])
def test_new_keys_are_validated(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(composed(*overrides))


def test_critic_checks_are_skipped_without_a_critic():
    validate(composed("algorithm=grpo", "critic.micro_batch_size=3"))


def test_colocated_plan_merges_the_roles_into_one_bundle_per_rank():
    from openrlaif.workers.group import colocated_plan, reserved_cpus
    plan = {"actor": RoleResources(2, 2.0, 1.0), "reference": RoleResources(2, 1.0, 0.5),
            "rollout": RoleResources(2, 1.0, 1.0), "judge": RoleResources(1, 4.0, 0.0)}
    merged = colocated_plan(plan, ["actor", "reference", "rollout", "critic"])   # no critic in this run: skipped
    assert merged == {"judge": RoleResources(1, 4.0, 0.0), "colocated": RoleResources(2, 2.0, 1.0)}
    assert reserved_cpus(plan, ["actor", "reference", "rollout"]) == 8.0 and reserved_cpus(plan, []) == 12.0
    assert colocated_plan(plan, ["actor", "critic"]) == plan                      # one started role: nothing shared
    with pytest.raises(ConfigError, match="same number of workers.*judge.resources.num_workers=1"):
        colocated_plan(plan, ["actor", "judge"])


@pytest.mark.parametrize("colocate, pipeline, needle", [
    (["actor", "trainer"], "online_rl", "cluster.colocate='trainer' is not one of"),
    (["actor"], "online_rl", "two or more different roles"),
    (["actor", "actor"], "online_rl", "two or more different roles"),
    (["actor", "reference"], "preference", "pipeline=preference runs its roles one after another"),
])
def test_colocation_validation_names_the_fix(colocate, pipeline, needle):
    cfg = Config(pipeline=pipeline)
    cfg.cluster.colocate = colocate
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)


@pytest.mark.parametrize("overrides, needle", [
    ({"rollout.async_steps": -1}, "must be 0 \\(synchronous\\), 1 \\(one-step-off\\) or more"),
    ({"rollout.async_steps": 2, "env.name": "agent", "env.agent": "tests.integration.agents:openai_agent"},
     "play one step ahead at most"),
    ({"rollout.async_steps": 1, "rollout.temperature": 0.7}, "rollout.temperature=1.0 rollout.top_p=1.0"),
    ({"rollout.async_steps": 1, "algorithm.is_cap": 0.0}, "algorithm.is_cap=0.0 must be > 0"),
    ({"rollout.async_steps": 1, "pipeline": "label", "rollout.samples_per_prompt": 2}, "is for pipeline=online_rl"),
])
def test_one_step_off_validation_names_the_fix(overrides, needle):
    cfg = composed(*[f"{key}={value}" for key, value in overrides.items()])
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)


def test_the_label_mass_threshold_defaults_per_judge_model():
    """0.5 for any judge; the shipped SmolLM2-135M (4-24% on the score digits) has its own, measured default."""
    from openrlaif.config import JudgeConfig
    from openrlaif.feedback.judge import Judge
    from openrlaif.models.registry import default_min_label_mass
    assert default_min_label_mass("/models/Qwen2.5-7B-Instruct") == 0.5
    assert default_min_label_mass("smollm2-135m-instruct") == 0.02
    backend = type("B", (), {"name": "b", "identity": {}})()
    assert Judge(backend, JudgeConfig(), model_name="/models/judge").min_label_mass == 0.5
    assert Judge(backend, JudgeConfig(), model_name="smollm2-135m-instruct").min_label_mass == 0.02
    assert Judge(backend, JudgeConfig(min_label_mass=0.3), model_name="smollm2-135m-instruct").min_label_mass == 0.3
    with pytest.raises(ConfigError, match="min_label_mass"):
        validate(composed("feedback.judge.min_label_mass=1.5"))


def test_overwrite_moves_the_old_verdict_cache_aside(tmp_path):
    """A rerun with output.overwrite=true must not be served the earlier run's verdicts."""
    from openrlaif.pipelines.common import prepare_output_dir, release
    cfg = composed(f"output.dir={tmp_path}")
    (tmp_path / "judge_cache.jsonl").write_text('{"key": "k", "reply": {}}\n')
    release(prepare_output_dir(cfg))   # a fresh run without a checkpoint: the cache is reused as it is
    assert (tmp_path / "judge_cache.jsonl").exists()
    cfg.output.overwrite = True
    release(prepare_output_dir(cfg))
    assert not (tmp_path / "judge_cache.jsonl").exists()
    assert (tmp_path / "judge_cache.jsonl.previous").read_text().startswith('{"key": "k"')


@pytest.mark.parametrize("override,needle", [
    ("algorithm.kl_coef=inf", "algorithm.kl_coef=inf must be a finite number"),
    ("actor.lr=nan", "actor.lr=nan must be a finite number"),
    ("feedback.judge.timeout_s=-inf", "feedback.judge.timeout_s=-inf must be a finite number"),
    ("algorithm.clip_eps=-1", r"algorithm.clip_eps=-1.0 must be in \(0, 1\]"),
    ("actor.grad_clip=0", "actor.grad_clip=0.0 must be > 0"),
    ("feedback.max_failed_steps=-1", "feedback.max_failed_steps=-1 must be >= 0"),
])
def test_non_finite_and_out_of_range_numbers_are_refused(override, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(composed(override))


@pytest.mark.parametrize("url", ["ftp://judge:8000/v1", "htp://judge:8000/v1", "judge:8000/v1", "http:///v1"])
def test_a_judge_url_must_be_http_with_a_host(url):
    with pytest.raises(ConfigError, match="is not an http:// or https:// URL with a host"):
        validate(composed("feedback=judge_http", f"feedback.judge.base_url={url}"))
    validate(composed("feedback=judge_http", "feedback.judge.base_url=https://api.example.com/v1"))


def test_a_key_added_with_plus_must_exist_in_the_schema():
    """Hydra's own suggestion, +key=value, used to add a typo'd key that OmegaConf.to_object then dropped."""
    from openrlaif.config import check_known_keys
    register_configs()
    with initialize_config_dir(config_dir=os.path.abspath(CONFIG_DIR), version_base=None):
        typo = compose(config_name="config", overrides=["+data.promts=my.jsonl"])
        free_form = compose(config_name="config", overrides=["+feedback.function_kwargs.scale=2"])
    with pytest.raises(ConfigError, match="data.promts is not a configuration key. Did you mean data.prompts"):
        check_known_keys(typo)
    check_known_keys(free_form)


def test_every_step_failing_stops_the_run_after_the_limit():
    from openrlaif.checkpointing import RunError
    from openrlaif.checkpointing import FailedSteps
    counter = FailedSteps(2)
    all_failed = {"feedback/failure_rate": 1.0, "feedback/failures/endpoint_error": 16.0}
    counter.count(1, all_failed)
    counter.count(2, {"feedback/failure_rate": 0.5})     # one answered verdict resets the count
    counter.count(3, all_failed)
    with pytest.raises(RunError, match=r"step 4: every sample's feedback failed in each of the last 2 steps "
                                       r"\(endpoint_error ×16"):
        counter.count(4, all_failed)
    never = FailedSteps(0)
    for step in range(10):
        never.count(step, all_failed)
    filtered = FailedSteps(1)   # a strict consistency filter that kept no pair: the setting working, no failure
    filtered.count(1, {"feedback/failure_rate": 1.0, "feedback/failures/no_kept_comparison": 8.0})
    with pytest.raises(RunError):
        filtered.count(2, {"feedback/failure_rate": 1.0, "feedback/failures/no_kept_comparison": 8.0,
                           "feedback/comparison_failures/timeout": 4.0})


def test_an_endpoint_judge_refuses_labels_it_cannot_read_but_a_local_judge_takes_any():
    """A local judge teacher-forces labels of any length ("10", "(A)"); an endpoint reads the first token only."""
    validate(composed("feedback.judge.score_max=10"))
    validate(composed("feedback=judge_pairwise", "feedback.judge.pairwise_labels=['(A)','(B)']"))
    for overrides in (["feedback.judge.score_max=10"], ["feedback.judge.mode=pairwise",
                                                        "feedback.judge.pairwise_labels=['(A)','(B)']"]):
        with pytest.raises(ConfigError, match="first token only.*readout=generate"):
            validate(composed("feedback=judge_http", *overrides))
    validate(composed("feedback=judge_http", "feedback.judge.score_max=10", "feedback.judge.readout=generate"))
    with pytest.raises(ConfigError, match="pairwise_labels"):
        validate(composed("feedback.judge.pairwise_labels=[A,A]"))


def test_judge_budget_and_strategy_values_are_checked():
    with pytest.raises(ConfigError, match="pairwise_budget"):
        validate(composed("feedback.judge.pairwise_budget=1"))
    with pytest.raises(ConfigError, match="prices are 0"):
        validate(composed("feedback.judge.budget.cost_total=5"))
    with pytest.raises(ConfigError, match="budget.tokens_per_step"):
        validate(composed("feedback.judge.budget.tokens_per_step=-1"))
    validate(composed("feedback.judge.budget.cost_total=5", "feedback.judge.price_per_mtok_prompt=0.5"))


def test_a_cascade_needs_a_judge_a_cheap_source_and_a_band():
    validate(composed("feedback.cascade.source=function", "feedback.cascade.function=openrlaif.feedback.rules:brevity"))
    with pytest.raises(ConfigError, match="feedback.cascade.source=function escalates"):
        validate(composed("feedback=function", "feedback.cascade.source=function",
                          "feedback.cascade.function=openrlaif.feedback.rules:brevity"))
    with pytest.raises(ConfigError, match="feedback.cascade.function"):
        validate(composed("feedback.cascade.source=function"))
    with pytest.raises(ConfigError, match="feedback.cascade.band"):
        validate(composed("feedback.cascade.source=function", "feedback.cascade.function=a.b:c",
                          "feedback.cascade.band=[0.8,0.2]"))
    with pytest.raises(ConfigError, match="feedback.cascade.source=reward_model needs"):
        validate(composed("feedback.cascade.source=reward_model"))


def test_tensor_parallel_settings_are_checked_at_start_up(tmp_path):
    """rollout.tensor_parallel_size: vLLM only, as many GPUs as shards, and a size that divides the model's heads
    (SmolLM2-135M's 9 attention heads and 3 KV heads cannot go on 2)."""
    import json

    from openrlaif.models.registry import check_tensor_parallel
    validate(composed("rollout.tensor_parallel_size=2"))
    validate(composed("feedback=judge", "feedback.judge.tensor_parallel_size=2"))
    for overrides, needle in ((["rollout.tensor_parallel_size=0"], "rollout.tensor_parallel_size"),
                              (["rollout.tensor_parallel_size=2", "rollout.engine=hf"], "the HF engine runs on one"),
                              (["rollout.tensor_parallel_size=2", "rollout.resources.num_gpus=1"], "num_gpus=2"),
                              (["feedback=judge", "feedback.judge.tensor_parallel_size=2", "feedback.judge.engine=hf"],
                               "feedback.judge.tensor_parallel_size=2 shards"),
                              (["feedback=judge", "feedback.judge.tensor_parallel_size=2",
                                "feedback.judge.resources.num_gpus=1"], "feedback.judge.resources.num_gpus=2")):
        with pytest.raises(ConfigError, match=needle):
            validate(composed(*overrides))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_attention_heads": 9,
                                                      "num_key_value_heads": 3, "hidden_size": 576}))
    with pytest.raises(ConfigError, match=r"num_attention_heads=9, which does not divide by 2.*one of \[1, 3\]"):
        check_tensor_parallel(str(tmp_path), 2)
    check_tensor_parallel(str(tmp_path), 3)
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        check_tensor_parallel(str(tmp_path), 9)


def test_role_placement_settings_are_checked():
    """<role>.resources.strategy is one of Ray's four; colocated roles share one placement group, so their strategy
    and node labels must agree."""
    from openrlaif.config import RoleResources
    from openrlaif.workers.group import colocated_plan
    cfg = composed("+actor.resources.node_labels.pool=train", "rollout.resources.strategy=STRICT_SPREAD")
    validate(cfg)
    assert cfg.actor.resources.node_labels == {"pool": "train"}
    with pytest.raises(ConfigError, match="actor.resources.strategy='RANDOM' is not one of"):
        validate(composed("actor.resources.strategy=RANDOM"))
    plan = {"actor": RoleResources(2, node_labels={"pool": "a"}), "rollout": RoleResources(2)}
    with pytest.raises(ConfigError, match="strategy and node_labels must agree"):
        colocated_plan(plan, ["actor", "rollout"])
    plan["rollout"] = RoleResources(2, num_cpus=2, node_labels={"pool": "a"})
    merged = colocated_plan(plan, ["actor", "rollout"])["colocated"]
    assert merged.node_labels == {"pool": "a"} and merged.num_cpus == 2


def test_weight_sync_options_are_checked_at_start_up():
    with pytest.raises(ConfigError, match="rollout.weight_sync"):
        validate(Config(rollout=RolloutConfig(weight_sync="nccl")))
    for key, value, message in [("sleep_between_steps", 1, "on CPU.*no sleep mode"),
                                ("sleep_between_steps", 3, "must be 0"),
                                ("sleep_between_steps", 2, "rollout.engine=hf has none")]:
        cfg = Config(rollout=RolloutConfig(**{key: value}, engine="hf" if "hf" in message else "vllm"))
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
    from openrlaif.rollout.weight_sync import weight_sync_path
    cfg = Config()
    assert weight_sync_path(cfg) == "object_store"
    cfg.actor.resources.num_gpus = cfg.rollout.resources.num_gpus = 1
    assert weight_sync_path(cfg) == "collective"


@pytest.mark.parametrize("overrides, needle", [
    (["actor.lora.rank=-1"], "actor.lora.rank"),
    (["actor.lora.rank=8", "actor.lora.dropout=1.0"], "actor.lora.dropout"),
    (["actor.lora.rank=8", "actor.lora.target_modules=[]"], "actor.lora.target_modules"),
    (["actor.lora.rank=8", "actor.lora.sync=lazy"], "actor.lora.sync"),
    (["actor.lora.rank=8", "actor.lora.sync=adapter", "rollout.engine=hf"], "rollout.engine=hf takes full weights"),
    (["actor.lora.rank=8", "actor.lora.sync=adapter", "pipeline=online_dpo", "feedback=self_judge"],
     "follows the policy"),
    (["actor.lora.rank=1024", "actor.lora.sync=adapter"], "rank 512 at most"),
    (["reference.from_actor_base=true"], "actor.lora.rank=0"),
    (["actor.lora.rank=8", "pipeline=online_dpo", "reference.update_every=2"], "reference.from_actor_base=false"),
])
def test_lora_settings_are_checked_at_start_up(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(composed(*overrides))


def test_lora_picks_adapters_for_vllm_and_merged_weights_elsewhere_and_drops_the_reference_role():
    from openrlaif.config import lora_sync, reference_from_actor
    from openrlaif.roles import needs_reference
    assert lora_sync(composed()) == "none" and needs_reference(composed())
    lora = composed("actor.lora.rank=8")
    validate(lora)
    assert lora_sync(lora) == "adapter" and reference_from_actor(lora) and not needs_reference(lora)
    assert lora_sync(composed("actor.lora.rank=8", "rollout.engine=hf")) == "merged"
    assert lora_sync(composed("actor.lora.rank=8", "pipeline=online_dpo", "feedback=self_judge")) == "merged"
    kept = composed("actor.lora.rank=8", "reference.from_actor_base=false")
    validate(kept)
    assert not reference_from_actor(kept) and needs_reference(kept)


@pytest.mark.parametrize("overrides, needle", [
    (["algorithm=distill"], "teacher.model is unset"),
    (["teacher.model=tiny-random-llama"], "read only with algorithm.distill_coef > 0"),
    (["feedback=none"], "feedback.source=none gives no reward at all"),
    (["algorithm=distill", "teacher.model=tiny-random-llama", "algorithm.distill_coef=-1"], "algorithm.distill_coef"),
    (["algorithm=distill", "teacher.model=tiny-random-llama", "algorithm.advantage=remax"], "greedy baseline"),
    (["algorithm=distill", "teacher.base_url=ftp://127.0.0.1/v1"], "must be an http(s) URL"),
    (["algorithm=distill", "teacher.base_url=http://127.0.0.1:8000/v1", "rollout.temperature=0.7"],
     "an endpoint gives untempered log-probs"),
    (["algorithm=distill", "feedback=none", "teacher.model=tiny-random-llama",
      "feedback.extra_functions=[openrlaif.feedback.rules:brevity]"], "nothing to combine"),
])
def test_distillation_settings_are_checked_at_start_up(overrides, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        validate(composed(*overrides))


def test_a_teacher_with_another_tokenizer_is_refused_naming_it(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    from openrlaif.models.tiny import build_tokenizer
    from openrlaif.roles import check_same_tokenizer
    check_same_tokenizer(AutoTokenizer.from_pretrained(tiny_model), tiny_model)
    other = build_tokenizer(vocab_size=400)
    other.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="another tokenizer than model.path"):
        check_same_tokenizer(AutoTokenizer.from_pretrained(tiny_model), str(tmp_path))
