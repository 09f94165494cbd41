"""Exporting a model to the formats people run it in: GGUF for llama.cpp, Ollama and LM Studio."""
