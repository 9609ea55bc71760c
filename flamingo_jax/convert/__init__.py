"""Pretrained LM weights in: GGUF (llama.cpp) and Hugging Face safetensors -> project params."""
