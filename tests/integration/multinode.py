"""A GRPO run on a real multi-node Ray cluster on this machine (a head and three worker nodes, each its own raylet,
on loopback), run as a script by test_cluster.py: roles placed by their resources.strategy and node_labels, the
actor's DeepSpeed group spanning two nodes. The run checkpoints every step; at step 2 the rollout's node is
removed, the run stops naming the role, rank and node, and `resume=true` on the two nodes that remain goes on from
the step-1 checkpoint to the end. Prints one JSON line: where each role's workers ran, the error, and the
metrics; with --one-node, the same 3 steps uninterrupted on a single-node cluster (no labels, PACK)."""
import json
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")   # loopback only, as init_local_ray does


def config(tiny_model: str, out_dir: str, spread: bool, rollout_pool: str = "rollout"):
    from openrlaif.config import (ActorConfig, AlgorithmConfig, ClusterConfig, Config, DataConfig, FeedbackConfig,
                                  ModelConfig, OutputConfig, RoleResources, RolloutConfig, validate)

    def resources(workers, pool, strategy="PACK"):
        return RoleResources(num_workers=workers, num_cpus=1, strategy=strategy if spread else "PACK",
                             node_labels={"pool": pool} if spread and pool else {})
    cfg = Config(steps=3, seed=5, model=ModelConfig(path=tiny_model),
                 data=DataConfig(prompts="demo", prompts_per_step=2),
                 rollout=RolloutConfig(engine="hf", samples_per_prompt=2, max_new_tokens=6,
                                       resources=resources(1, rollout_pool)),
                 actor=ActorConfig(zero_stage=2, lr=1e-3, micro_batch_size=2,
                                   resources=resources(2, "train", "STRICT_SPREAD")),
                 algorithm=AlgorithmConfig(advantage="grpo", kl_coef=0.05),
                 feedback=FeedbackConfig(source="function", function="tests.integration.envs:non_space_share"),
                 cluster=ClusterConfig(threads_per_worker=1), output=OutputConfig(dir=out_dir, checkpoint_every=1))
    cfg.reference.resources = resources(1, "train")
    validate(cfg)
    return cfg


def main() -> None:
    import ray

    from openrlaif.pipelines.online_rl import train
    from openrlaif.roles import prepare_run, start_roles
    tiny_model, out_dir, one_node = sys.argv[1], sys.argv[2], "--one-node" in sys.argv
    cluster = None
    if one_node:
        from openrlaif.runtime import init_local_ray
        init_local_ray(4)
    else:
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        handles = [cluster.add_node(num_cpus=cpus, labels={"pool": pool})
                   for pool, cpus in (("train", 2), ("train", 2), ("rollout", 1))]
        ray.init(address=cluster.address)
    nodes = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
    cfg = config(tiny_model, os.path.join(out_dir, "placed"), spread=not one_node)
    roles = start_roles(cfg, prepare_run(cfg))
    try:
        placed = {name: [nodes[nid]["Labels"].get("pool", "") + "@" + nid[:8] for nid in ray.get(
            group.call(lambda w: w.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id())))]
            for name, group in roles.groups().items()}
    finally:
        roles.shutdown()
    run_dir, error = os.path.join(out_dir, "run"), None
    if cluster is None:
        train(config(tiny_model, run_dir, spread=False))
    else:
        from openrlaif.checkpointing import RunError
        from openrlaif.pipelines.online_rl import one_step

        def step_losing_the_rollout_node(cfg, run, roles, stream, step, metrics):
            if step == 2:   # after step 1's checkpoint: the node holding the engine goes down
                cluster.remove_node(handles[2])
            one_step(cfg, run, roles, stream, step, metrics)
        try:
            train(config(tiny_model, run_dir, spread=True), step_fn=step_losing_the_rollout_node)
        except RunError as err:
            error = str(err)
        # the same command with resume=true, the engine now placed on what remains (the two train nodes)
        cfg = config(tiny_model, run_dir, spread=True, rollout_pool="")
        cfg.resume = True
        train(cfg)
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    addresses = sorted({node["NodeManagerAddress"] for node in nodes.values()})
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    print("RESULT " + json.dumps({"placed": placed, "rows": rows, "nodes": len(nodes), "addresses": addresses,
                                  "error": error}))


if __name__ == "__main__":
    main()
