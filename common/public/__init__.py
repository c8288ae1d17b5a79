"""Public models built or converted offline: the tiny model and SmolLM2-135M."""
