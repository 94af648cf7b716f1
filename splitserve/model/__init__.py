"""The model both pools run: configs, checkpoint loading (Hugging Face folders and GGUF), the forward pass."""
