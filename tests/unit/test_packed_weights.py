"""PackedWeights: the trainer-to-engine weight format that Ray's object store carries without pickling bytes."""
import pickle

import torch

from openrlaif.workers.weights import PackedWeights, named_tensors


def sample_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"embed.weight": torch.randn(64, 32), "norm.weight": torch.randn(32).to(torch.bfloat16),
            "half": torch.randn(3, 5).half(), "step": torch.tensor(7), "transposed": torch.randn(16, 8).t(),
            "counts": torch.arange(10, dtype=torch.int64)}


def test_the_tensors_come_back_with_their_names_dtypes_shapes_and_values():
    state = sample_state()
    back = PackedWeights(state).named_tensors()
    assert [name for name, _ in back] == list(state)
    for name, tensor in back:
        assert tensor.dtype == state[name].dtype and tensor.shape == state[name].shape
        assert torch.equal(tensor, state[name])
    assert named_tensors(state) == list(state.items())          # a plain state dict passes through


def test_the_bytes_travel_out_of_band_so_the_object_store_copies_them_once():
    """Ray serialises with pickle protocol 5 and keeps out-of-band buffers out of the pickle stream; the reader
    maps them (read-only). Plain tensors would put all their bytes in the stream."""
    state = sample_state()
    total = sum(t.numel() * t.element_size() for t in state.values())
    buffers = []
    stream = pickle.dumps(PackedWeights(state), protocol=5, buffer_callback=buffers.append)
    assert sum(buffer.raw().nbytes for buffer in buffers) == total
    assert len(stream) < 2000 < total
    read_only = [pickle.PickleBuffer(bytes(buffer.raw())) for buffer in buffers]   # what a reader maps
    back = pickle.loads(stream, buffers=read_only).named_tensors()
    for name, tensor in back:
        assert torch.equal(tensor, state[name])
    in_band = pickle.dumps(state, protocol=5, buffer_callback=[].append)
    assert len(in_band) > total


def test_sync_buckets_hold_whole_layers_of_about_the_size_asked():
    from openrlaif.workers.weights import weight_buckets
    sizes = [("model.embed_tokens.weight", 100)] + [(f"model.layers.{i}.{p}.weight", 10) for i in range(3)
                                                    for p in ("q_proj", "k_proj", "v_proj")]
    sizes += [("model.layers.10.q_proj.weight", 10), ("model.norm.weight", 1), ("lm_head.weight", 100)]
    buckets = weight_buckets(sizes, 60)
    assert [name for bucket in buckets for name in bucket] == [name for name, _ in sizes]   # every tensor, in order
    assert buckets[0] == ["model.embed_tokens.weight"]                                        # bigger than a bucket
    assert buckets[1] == [f"model.layers.{i}.{p}.weight" for i in (0, 1) for p in ("q_proj", "k_proj", "v_proj")]
    for bucket in buckets:   # a layer never straddles two buckets (layers.1 is not layers.10)
        layers = {name.split(".")[2] for name in bucket if ".layers." in name}
        assert all(sum(f"layers.{layer}." in name for b in buckets for name in b if b is not bucket) == 0
                   for layer in layers)
    assert weight_buckets(sizes, 0) == [[name for name, _ in sizes]] and weight_buckets([], 10) == []
