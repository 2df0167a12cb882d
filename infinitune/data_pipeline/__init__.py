"""Instruction data: formats, chat templates and loss masks, packing, shards, and the resumable stream.

Imports none of the other parts of infinitune.
"""
