"""Ray stays on loopback: the local cluster advertises 127.0.0.1, not the machine's routable address."""
import ray


def test_local_cluster_is_on_loopback(ray_cluster):
    addresses = {node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}
    assert addresses == {"127.0.0.1"}
