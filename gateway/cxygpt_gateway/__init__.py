"""CxyGPT gateway: one OpenAI-compatible endpoint in front of every self-hosted model."""
