"""The server's routes, one module per concern: answer, openai (chat completions), ops (models, health,
metrics), page; ``common`` holds the dependencies and request fields they share."""
