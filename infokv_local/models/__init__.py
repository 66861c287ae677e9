"""Where GGUF files come from: the Hugging Face Hub cache and the offline registry models."""
