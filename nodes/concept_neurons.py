"""Concept neurons (Cones): extract, save, load, apply, combine, info. Work in progress."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
