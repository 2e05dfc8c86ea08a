from openrlaif.data.prompts import DEMO_PROMPTS, Prompt, PromptStream, load_prompts

__all__ = ["DEMO_PROMPTS", "Prompt", "PromptStream", "load_prompts"]
