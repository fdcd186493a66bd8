"""Built-in methods: one module per method, named by its key (`methods/lora.py` registers "lora").

This folder is importable only as `petlbench.methods` (so every method module has exactly one import name).
"""

if __name__ != "petlbench.methods":
    raise ImportError(f"the methods folder is the package petlbench.methods, not {__name__!r}: pip install -e .")
