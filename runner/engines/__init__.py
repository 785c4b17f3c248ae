"""Engines behind one interface (base.py): local (diffusers + peft), remote (the text2img HTTP API), a Ray pool.

factory.py picks one from the config; nothing here imports torch until an engine is created.
"""
