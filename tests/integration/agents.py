"""Agent functions for the black-box agent tests: each gets a client for openrlaif's endpoint and a prompt row."""
import json
import urllib.request

SYSTEM = {"role": "system", "content": "You are a terse assistant."}


def openai_agent(client, row):
    """Two calls with the openai client: an answer, then a follow-up the agent adds itself."""
    messages = [SYSTEM, {"role": "user", "content": row["messages"][-1]["content"]}]
    first = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Check it."}]
    second = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
    return sum(not c.isspace() for c in second.choices[0].message.content) / 24


def raw_http_agent(client, row):
    """The same two calls over raw HTTP (no openai package needed)."""
    url = str(client.base_url).rstrip("/") + "/chat/completions"

    def ask(messages):
        request = urllib.request.Request(url, json.dumps({"model": "policy", "messages": messages,
                                                          "max_tokens": 6}).encode(),
                                         {"Content-Type": "application/json",
                                          "Authorization": f"Bearer {client.api_key}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            return json.loads(response.read())["choices"][0]["message"]["content"]
    messages = [SYSTEM, {"role": "user", "content": row["messages"][-1]["content"]}]
    messages += [{"role": "assistant", "content": ask(messages)}, {"role": "user", "content": "Check it."}]
    return len(ask(messages)) / 48


def crashing_agent(client, row):
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    raise RuntimeError("the agent's own bug")


def rewriting_agent(client, row):
    """Rewrites the assistant's reply before the second call: the endpoint refuses (HTTP 400)."""
    messages = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="policy", messages=messages, max_tokens=4)
    client.chat.completions.create(model="policy", messages=messages + [
        {"role": "assistant", "content": "something else"}, {"role": "user", "content": "more"}], max_tokens=4)
    return 1.0


def long_prompt_agent(client, row):
    """A first request over data.max_prompt_tokens: HTTP 400."""
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "word " * 2000}],
                                   max_tokens=4)
    return 1.0


def streaming_agent(client, row):
    """openai_agent's two calls, the first streamed (`stream=True`): the deltas add up to the message."""
    messages = [SYSTEM, {"role": "user", "content": row["messages"][-1]["content"]}]
    chunks = list(client.chat.completions.create(model="policy", messages=messages, max_tokens=6, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Check it."}]
    second = client.chat.completions.create(model="policy", messages=messages, max_tokens=6)
    return sum(not c.isspace() for c in second.choices[0].message.content) / 24


def tools_agent(client, row):
    """Tool schemas for a model whose chat template takes none: HTTP 400 (they would be dropped)."""
    client.chat.completions.create(model="policy", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                   tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    return 1.0
