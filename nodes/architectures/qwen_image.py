"""The qwen_image text-stream adapter (to be written; see the package doc for the interface)."""
