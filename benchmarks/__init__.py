"""Speed, memory and FLOP counts of the engine against diffusers (`python -m benchmarks.bench`)."""
