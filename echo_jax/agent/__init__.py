"""The model as an agent: decoding, the rollout engine, closed-loop evaluation and capture."""
