"""Text data for the language models (data.name text): sources, tokenizers, token shards, device windows."""
