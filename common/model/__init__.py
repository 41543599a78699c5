"""Facts about the served model that every process shares: its spec, block layout, tokenizer and the GGUF converter."""
