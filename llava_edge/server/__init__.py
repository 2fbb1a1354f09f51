"""`llava-edge serve`: OpenAI- and Ollama-compatible HTTP APIs over the runtime's decoder engine. No torch."""
