"""Prompt token ids the way vLLM computes them, one concern per module.

- `tokenizer`: `Tokenizer`, a Hugging Face `tokenizers.Tokenizer` with its chat template
  and special tokens (encode, decode, render and encode chat); `default_tokenizer()`.
- `loader`: finding a tokenizer's files (`tokenizer.json`, `tokenizer_config.json`,
  `chat_template.jinja`) and the shipped small BPE.
- `chat_template`: the jinja2 sandbox that renders chat templates as transformers does.
- `render`: an OpenAI request body -> what vLLM tokenises (text and whether to add
  special tokens, or the token ids given).
- `token_cache`: `PromptTokenizer`, prompt token ids with an exact shared-prefix cache.
- `boundaries`: byte -> character -> token positions, for the cache's cuts.

Nothing is imported here: `tokenizers` and `jinja2` load only with the module that needs
them (a round-robin proxy imports neither).
"""
