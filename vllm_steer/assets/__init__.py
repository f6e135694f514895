"""What the package ships or fetches by name: the bundled demo model and its vectors, the
named real model (SmolLM2-135M-Instruct) and its concept vectors."""
