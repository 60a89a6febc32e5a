"""Seed search (SeedSelect, norm-aware, best-of-N). Work in progress."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
