"""Method-agnostic machinery: configs, registry, targeting, wrapper layers, model ops, io."""
