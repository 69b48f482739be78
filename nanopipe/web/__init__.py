"""The web edge: the Flask app (create_app), the guide's chat API, the OpenAI-compatible API,
metrics. It talks to the leader as a client; a worker never imports it."""
