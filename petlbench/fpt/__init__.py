"""FPT and FPT+: the frozen LPM, the side network and fusion, the preloaded feature cache, the shared method base."""
