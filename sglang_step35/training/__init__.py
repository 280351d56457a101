"""Training the embedded tiny Step-3.5 checkpoint (plain PyTorch, CPU)."""
