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
