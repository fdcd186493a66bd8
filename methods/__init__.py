"""Built-in methods. Adding one = a module here plus one line in this table ("module:Class", lazily imported)."""

BUILTIN_METHODS: dict[str, str] = {
    "full_ft": "petlbench.methods.full_ft:FullFineTuning",
    "linear_probe": "petlbench.methods.linear_probe:LinearProbing",
    "vpt": "petlbench.methods.vpt:PromptTuning",
    "attention_tuning": "petlbench.methods.attention_tuning:AttentionTuning",
    "adapter": "petlbench.methods.adapter:Adapter",
    "bitfit": "petlbench.methods.bitfit:BitFit",
    "lora": "petlbench.methods.lora:LoRA",
    "adalora": "petlbench.methods.adalora:AdaLoRA",
    "fpt": "petlbench.methods.fpt:FPT",
    "fpt_plus": "petlbench.methods.fpt_plus:FPTPlus",
}
