"""The OpenAI-compatible HTTP front door: one more client of ingress, over common.client.AsyncClient."""
